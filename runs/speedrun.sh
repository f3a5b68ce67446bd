#!/usr/bin/env bash
# runs/speedrun.sh: the reference run, a GPT-2-grade ChatGPT clone on one 8xH100 node.
#
#   shards (download in the background) -> tokenizer (32,768 tokens) -> base pretraining of a d24 (1.38B
#   params, 730M of them in matrices + lm_head) on 8 tokens per such param, 5.84B tokens, under torchrun ->
#   base_eval (full CORE: GPT-2 scores 0.256525, this run aims above it) -> midtraining -> SFT -> chat_eval
#   (mid and sft) -> report.md (copied to ./report.md).
#
# Time: base training is 2.8e19 FLOPs, ~2.2 h at 45% MFU on 8xH100 (see the plan printed first, or
# `python -m scripts.base_train --dry-run --depth=24 --target-param-data-ratio=8 --gpus=8`); ~3 h in all,
# ~$70 at $3/GPU-hour. Launch it inside screen/tmux and follow the log:
#
#   screen -L -Logfile speedrun.log -S speedrun bash runs/speedrun.sh
#   WANDB_RUN=speedrun bash runs/speedrun.sh          # with wandb logging (after `wandb login`)
#
# Environment:
#   NANOCHAT_BASE_DIR    where everything is written (default ~/.cache/nanochat): ~17 GB of shards,
#                        tokenizer, checkpoints, report/
#   NANOCHAT_LOCAL_DATA  a local data folder (like ../shared/data) for the eval bundle and chat data
#                        instead of downloading them (pretraining shards are downloaded either way)
#   NPROC                GPUs on this node (default 8); the total batch stays 2^20 tokens, gradient
#                        accumulation makes up for fewer GPUs (the run is then proportionally longer)
#   WANDB_RUN            wandb run name (default dummy = no wandb)
#   SKIP_SETUP=1         do not run runs/setup.sh (use the python environment that is already active)
set -euo pipefail

# shellcheck source=runs/common.sh
source "$(dirname "$0")/common.sh"
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        *) echo "speedrun.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
run_env speedrun.sh
export OMP_NUM_THREADS=1  # torchrun runs one process per GPU; CPU threads would only contend
mkdir -p "$NANOCHAT_BASE_DIR"

# The one dial is the depth; 8 tokens per scaling param is the data:params ratio of the d24 GPT-2 runs
# (upstream leaderboard; CORE 0.2626 averaged over 5 runs on ClimbMix).
DEPTH=24
RATIO=8
TAG=d$DEPTH
launch() { torchrun --standalone --nproc_per_node="$NPROC" -m "$1" -- "${@:2}"; }

setup_venv
python -m nanochat.report reset
# The plan: params, tokens, steps, batch, FLOPs, estimated hours and dollars on this many GPUs.
python -m scripts.base_train --dry-run --depth=$DEPTH --target-param-data-ratio=$RATIO --gpus="$NPROC" --gpu-type=H100

# Shards: 8 now (2B characters for the tokenizer), the rest in the background while the tokenizer trains.
# 5.84B tokens at ~4.3 characters per token is ~100 shards of 250M characters; 170 leaves headroom so no
# document is seen twice.
python -m nanochat.dataset download -n 8
python -m nanochat.dataset download -n 170 > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
DOWNLOAD_PID=$!
python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
python -m scripts.tok_eval
echo "waiting for the shard download (log: $NANOCHAT_BASE_DIR/download.log)"
wait "$DOWNLOAD_PID" || { echo "speedrun.sh: shard download failed, see $NANOCHAT_BASE_DIR/download.log" >&2; exit 1; }

# Base model: 5,568 steps of 2^20 tokens (16 rows x 2,048 tokens x 8 GPUs x 4 accumulation steps).
launch scripts.base_train --depth=$DEPTH --target-param-data-ratio=$RATIO --device-batch-size=16 --run="$WANDB_RUN"
launch scripts.base_eval --model-tag=$TAG --device-batch-size=16
# Chat: midtraining (conversation format, tools, multiple choice), then SFT, each evaluated.
launch scripts.mid_train --model-tag=$TAG --run="$WANDB_RUN"
launch scripts.chat_eval -i mid -g $TAG
launch scripts.chat_sft --model-tag=$TAG --run="$WANDB_RUN"
launch scripts.chat_eval -i sft -g $TAG
python -m nanochat.report generate --gpu-hour-price 3.0

echo
echo "Done. Report: $NANOCHAT_BASE_DIR/report/report.md (copied to ./report.md)"
echo "Talk to it:"
echo "  python -m scripts.chat_cli -p \"Why is the sky blue?\""
echo "  python -m scripts.chat_web     # a ChatGPT-like page on http://<this machine>:8000 (--host 0.0.0.0)"
