#!/usr/bin/env bash
# runs/runcpu.sh: the whole nanochat pipeline, tiny, on CPU (no GPU needed), as a smoke run and a demo:
#
#   tokenizer -> base pretraining (d4, 2.5M tokens) -> base_eval (bpb + CORE on the available tasks, a few
#   items each) -> midtraining -> SFT -> chat_eval (small caps) -> report.md, then one sample chat.
#   The model is tiny and briefly trained: it speaks the chat format, not sense.
#
# Time: ~20 min on 2 idle CPU cores plus ~1.5 min of set-up, more when other jobs share them (every stage
# prints its wall time). Run from anywhere (it cd's to the repo root):
#
#   bash runs/runcpu.sh                                    # online: downloads shards, eval data, ...
#   NANOCHAT_LOCAL_DATA=../shared/data bash runs/runcpu.sh # offline, from a local data folder
#   bash runs/runcpu.sh --local-data ../shared/data        # same as the line above
#
# Environment:
#   NANOCHAT_BASE_DIR    where everything is written (default ~/.cache/nanochat): shards, tokenizer,
#                        checkpoints, report/. Rerunning in the same dir starts the report afresh.
#   NANOCHAT_LOCAL_DATA  a folder laid out like ../shared/data (pretrain_text/, eval_core/, eval_chat/, chat_sft/,
#                        tokenizers/, misc/): nothing is downloaded. Unset: the real sources are (1 ClimbMix
#                        shard + the val shard, the CORE bundle, the chat eval sets, SmolTalk): needs internet.
#   WANDB_RUN            wandb run name for the training stages (default: dummy = no wandb)
#   BASE_STEPS, MID_STEPS, SFT_STEPS  training steps (default 300, 200, and one epoch of the SFT mixture,
#                        ~200 steps); more = better chats, slower
#   SKIP_SETUP=1         do not run runs/setup.sh (use the python environment that is already active)
set -euo pipefail

# shellcheck source=runs/common.sh
source "$(dirname "$0")/common.sh"
while [ $# -gt 0 ]; do
    case "$1" in
        --local-data) export NANOCHAT_LOCAL_DATA="$2"; shift 2 ;;  # run_env resolves and checks it
        --local-data=*) export NANOCHAT_LOCAL_DATA="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "runcpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
run_env runcpu.sh
mkdir -p "$NANOCHAT_BASE_DIR"

# The tiny model: 4 layers of width 256 (4 heads of 64), 512-token context, 8,192-token vocabulary, 8,192
# tokens per optimizer step. Sized so the whole run stays near 20 minutes on 2 idle cores.
# SFT: 192-token rows, one epoch, only the chats whose first reply fits in 128 tokens (the others dropped, not
# cut): a model this small learns its reply length from SFT, and a long reply from it loops and never ends.
# Measured on a d6 after mid (50 held-out chat prompts, replies ending with <|assistant_end|> at the chat CLI's
# T=0.6, top-k 50, three seeds): 512-token rows 25/50 (one seed), 256-token rows 41/40/35, 128-token rows
# 46/43/47; on a d6 pretrained twice as long, 128-token rows 46/46/48 and these settings 45/43/47. The tool-use
# tasks need the longer row: 90% of the SpellingBee counts are longer than 128 tokens, and with 128-token rows
# SFT lost letter counting (49 -> 46 of 50 held-out words on that d6; with these settings 49 -> 49).
DEPTH=4
TAG=d$DEPTH
BASE_STEPS=${BASE_STEPS:-300} MID_STEPS=${MID_STEPS:-200} SFT_STEPS=${SFT_STEPS:-}  # empty SFT_STEPS: one epoch

TIMINGS=() RUN_START=$SECONDS
stage() {  # stage NAME COMMAND...: run it, print and remember its wall time
    local name=$1 t0=$SECONDS
    echo; echo "=== [$name] ${*:2}"
    "${@:2}"
    local dt=$((SECONDS - t0))
    TIMINGS+=("$(printf '%-22s %4dm%02ds' "$name" $((dt / 60)) $((dt % 60)))")
    echo "=== [$name] done in ${dt}s"
}

[ "${SKIP_SETUP:-0}" = 1 ] || stage setup setup_venv
stage report-reset python -m nanochat.report reset

# Pretraining text: the local folder cut into small documents and shards, or one real shard (+ val).
if [ -n "${NANOCHAT_LOCAL_DATA:-}" ]; then
    stage data python -m nanochat.dataset import "$NANOCHAT_LOCAL_DATA/pretrain_text" --doc-chars 2000 --overwrite
else
    stage data python -m nanochat.dataset download -n 1
fi

stage tok_train python -m scripts.tok_train --vocab-size 8192 --max-chars 20000000
stage tok_eval python -m scripts.tok_eval --max-chars 200000

# 20 warmup steps instead of 40: the run is only a few hundred steps long. Val bpb every 100 steps
# (a few seconds each) so the report's bpb plot is a curve, not one point.
stage base_train python -m scripts.base_train --depth=$DEPTH --head-dim=64 --max-seq-len=512 \
    --device-batch-size=16 --total-batch-size=8192 --num-iterations=$BASE_STEPS --warmup-steps=20 \
    --eval-every=100 --eval-tokens=65536 --sample-every=-1 --run="$WANDB_RUN"
stage base_eval python -m scripts.base_eval --model-tag=$TAG --max-per-task=8 --split-tokens=32768 \
    --device-batch-size=16 --num-unconditioned=1

stage mid_train python -m scripts.mid_train --model-tag=$TAG --num-iterations=$MID_STEPS \
    --eval-every=-1 --eval-tokens=32768 --val-size=100 --run="$WANDB_RUN"
stage chat_sft python -m scripts.chat_sft --model-tag=$TAG ${SFT_STEPS:+--num-iterations=$SFT_STEPS} \
    --max-seq-len=192 --device-batch-size=32 --total-batch-size=12288 --overlong=drop \
    --smoltalk-size=-1 --smoltalk-max-tokens=128 --chat-eval-examples=20 \
    --eval-every=-1 --eval-tokens=32768 --val-size=100 --run="$WANDB_RUN"

# Multiple choice is one forward pass per problem (cheap); generation is slow on CPU, so fewer problems there.
# 256 tokens per reply: a SpellingBee count (spell, walk the letters, call the tool, answer) needs ~150, and
# at 96 a d4 that counts right 7 times in 16 scored 0 of 8. Both runs land in report/chat_eval_sft.json.
stage chat_eval_mc python -m scripts.chat_eval -i sft -g $TAG -a "ARC-Easy|ARC-Challenge|MMLU" -x 100 --no-progress
stage chat_eval_gen python -m scripts.chat_eval -i sft -g $TAG -a "GSM8K|HumanEval|SpellingBee" -x 16 -m 256 --no-progress

stage report python -m nanochat.report generate
stage sample_chat python -m scripts.chat_cli -g $TAG -p "Hi! Who are you?" -m 64

total=$((SECONDS - RUN_START))
printf '\nStage wall times:\n'
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-22s %4dm%02ds\n\n' "TOTAL" $((total / 60)) $((total % 60))
echo "Report: $NANOCHAT_BASE_DIR/report/report.md (copied to ./report.md)"
echo "Chat with the model (NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR, venv active):"
echo "  python -m scripts.chat_cli            # in the terminal"
echo "  python -m scripts.chat_web            # then open http://127.0.0.1:8000"
