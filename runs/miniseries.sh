#!/usr/bin/env bash
# runs/miniseries.sh: a series of base models of increasing depth, each trained at the same tokens:params
# ratio (base_train --target-param-data-ratio), so every model is trained the way the speedrun trains its own.
# Each gets val bpb (at the end of training) and CORE (base_eval); the table shows how capability grows with
# size and where the series crosses GPT-2 (CORE 0.256525).
#
#   bash runs/miniseries.sh [series]        # GPU node: depths 12,14,...,26 at ratio 12, full CORE
#   bash runs/miniseries.sh --cpu [series]  # CPU demo (also CPU=1): depths 1..4 at ratio 0.1, 8 CORE items
#
# Time: GPU ~20 h on 8xH100 (d26 alone is ~4 h; the sum is ~2.6e20 FLOPs at ~45% MFU, plus evals); CPU ~10
# min on 2 idle cores (more on a busy machine). Runs already in the results folder are skipped.
#
# The series name (argument, else $SERIES_NAME, else today's date, e.g. jan11) names the results folder:
# $NANOCHAT_BASE_DIR/<series>_miniseries_results/<run>/{train,eval}.log and base_{train,eval}.json, then
# table.md and results.csv there (scripts/scaling_table.py). Each run also leaves base_checkpoints/<run>/ and
# overwrites report/base_{train,eval}.json: do not share a base dir with a run whose report you still need.
#
# Environment:
#   NANOCHAT_BASE_DIR    where everything is written (default ~/.cache/nanochat)
#   NANOCHAT_LOCAL_DATA  a local data folder (like ../shared/data): pretraining text, eval bundle; nothing
#                        is downloaded. Unset: shards and the CORE bundle come from the internet.
#   NPROC                GPUs per node for torchrun (default 8; ignored with --cpu)
#   WANDB_RUN            wandb run name prefix (default dummy = no wandb); each run logs as <prefix>_d<depth>
#   DEPTHS, RATIO        override the series, e.g. DEPTHS="10 12 14" RATIO=8
#   CORE_CAP             CORE items per task (default: all on GPU, 8 on CPU; 0 skips CORE)
#   SHARDS               pretraining shards to download when there are none (GPU default 400)
#   SKIP_SETUP=1         do not run runs/setup.sh (use the python environment that is already active)
set -euo pipefail

# shellcheck source=runs/common.sh
source "$(dirname "$0")/common.sh"
CPU=${CPU:-0}
SERIES="${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "miniseries.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) SERIES="$1"; shift ;;
    esac
done
run_env miniseries.sh

if [ "$CPU" = 1 ]; then  # ratio 0.1 is absurdly undertrained; it is what fits in minutes (d4 still takes ~2 min)
    DEPTHS="${DEPTHS:-1 2 3 4}" RATIO="${RATIO:-0.1}" CORE_CAP="${CORE_CAP:-8}"
    train_flags() { echo "${CPU_TRAIN_FLAGS[@]}"; }
    launch() { python -m "$@"; }
else
    DEPTHS="${DEPTHS:-12 14 16 18 20 22 24 26}" RATIO="${RATIO:-12}" CORE_CAP="${CORE_CAP:--1}"
    # Rows per GPU that fit in 80 GB at 2,048 tokens (the optimizer step is the same either way).
    train_flags() { local dbs=32; [ "$1" -ge 20 ] && dbs=16; [ "$1" -ge 28 ] && dbs=8; echo --device-batch-size=$dbs; }
    launch() { torchrun --standalone --nproc_per_node="$NPROC" -m "$1" -- "${@:2}"; }
fi
RESULTS="$NANOCHAT_BASE_DIR/${SERIES}_miniseries_results"
sweep_data
for d in $DEPTHS; do
    # shellcheck disable=SC2046
    sweep_point "${SERIES}_miniseries_d$d" "d$d" --depth="$d" --target-param-data-ratio="$RATIO" $(train_flags "$d")
done
python -m scripts.scaling_table "$RESULTS" --title "Miniseries $SERIES: depths $DEPTHS at tokens:params $RATIO"
