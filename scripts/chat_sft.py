"""
Supervised finetuning (SFT): teach the model the chat format on a small mixture of conversations, one
conversation per row, padded (as the model sees them at inference), loss on the assistant's tokens only.

    python -m scripts.chat_sft                           # from the mid checkpoint, one epoch of the mixture
    python -m scripts.chat_sft --source=base --model-tag=d4 --num-iterations=200
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --model-tag=d20
    python -m scripts.chat_sft --resume                  # continue exactly where the last run stopped

Mixture (sizes are flags): ARC-Easy + ARC-Challenge train, GSM8K train (calculator steps as python tool
calls), a SmolTalk slice (offline: the local stand-in conversations), Identity, SpellingBee, plus any
--custom-json files. Validation: the held-out splits of the same sources (SmolTalk test, MMLU test,
GSM8K test, SpellingBee test words), one conversation per row in both stages so the losses compare.

The loop, shared with scripts/mid_train.py (packed rows, its own mixture), is nanochat/finetune.py:
settings not given are inherited from the parent checkpoint, and the loss is normalised over the
assistant tokens of the whole step.

Conversations longer than a row are truncated after their last whole assistant turn that fits, so the
replies kept still end with <|assistant_end|>; one whose first reply alone is too long is cut inside it.
Both are counted in the log ("cut mid-reply" separately). --overlong=drop leaves the latter out
instead, which a short-context model needs: a reply cut inside never shows its end, and many of them
teach the model to talk until the context is full. --smoltalk-max-tokens does the same to the chat data
alone at a shorter length: a small model learns how long its chat replies are from SFT, while the
tool-use tasks (a SpellingBee count is ~150 tokens) need the longer row.

With --chat-eval-examples N the model also writes greedy replies through the Engine before and after
training: the share of N held-out chat prompts whose reply ends with <|assistant_end|> (does it know
when to stop?) and SpellingBee letter-count accuracy on N held-out words (is a skill learned?).

Writes <stage>_checkpoints/<tag>/ (model, per-rank optimizer and batcher state, meta with the full
model config) and report/<stage>.json (losses, val loss, truncation counts, turn-end and spelling
rates before/after, timings, args).
"""

from nanochat.common import run_cli
from nanochat.finetune import run


def main(argv=None):
    run("sft", argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
