"""
Supervised finetuning (SFT): teach the model the chat format on a small mixture of conversations, one
conversation per row, padded (as the model sees them at inference), loss on the assistant's tokens only.

    python -m scripts.chat_sft                           # from the mid checkpoint, one epoch of the mixture
    python -m scripts.chat_sft --source=base --model-tag=d4 --num-iterations=200
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --model-tag=d20
    python -m scripts.chat_sft --resume                  # continue exactly where the last run stopped

Mixture (tasks/mixtures.py; sizes are flags): ARC-Easy + ARC-Challenge train, GSM8K train (calculator
steps as python tool calls), a SmolTalk slice, Identity, SpellingBee, plus any --custom-json files;
validation on the held-out splits of the same sources. The loop, shared with mid_train, is
nanochat/finetune.py: unset settings are inherited from the parent checkpoint.

A conversation longer than a row is cut after its last whole assistant turn that fits (counted); see
--overlong and --smoltalk-max-tokens for short-context models. Writes chatsft_checkpoints/<tag>/ and
report/chat_sft.json.
"""

from nanochat.common import run_cli
from nanochat.finetune import run


def main(argv=None):
    run("sft", argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
