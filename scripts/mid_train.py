"""
Midtraining: continue the base model on a large mixture of conversations so it learns the chat format,
multiple choice, tool use (python calls in GSM8K solutions and letter counting), its identity and
spelling. Rows are packed: whole conversations, BOS-aligned best fit, the tail of a row padded, never
a conversation cropped to fill a row (nanochat/chat_data.PackedBatcher); one longer than a whole row is
truncated after its last whole turn that fits and counted (one whose first reply does not fit can be
dropped up front with --overlong=drop). Loss on assistant tokens only.

    python -m scripts.mid_train --model-tag=d20          # one epoch of the mixture
    python -m scripts.mid_train --model-tag=d4 --num-iterations=300 --smoltalk-size=20000
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --model-tag=d20
    python -m scripts.mid_train --resume                 # continue exactly where the last run stopped

Mixture (tasks/mixtures.py; sizes are flags): SmolTalk train, MMLU auxiliary_train (offline only the
small dev split exists, so ARC train is in by default too), GSM8K train, Identity, SpellingBee, plus any
--custom-json files. Unset batch and LR settings come from the base checkpoint; LR flat for 80% of the
run, then linear to 0. The loop, shared with SFT, is nanochat/finetune.py. Writes mid_checkpoints/<tag>/
and report/mid_train.json.
"""

from nanochat.common import run_cli
from nanochat.finetune import run


def main(argv=None):
    run("mid", argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
