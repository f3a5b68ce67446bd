#!/usr/bin/env bash
# runs/scaling_laws.sh: a scaling-law sweep. For each FLOPs budget, train base models of several depths for
# exactly that many FLOPs (base_train --target-flops), measure val bpb (at the end of training) and CORE
# (base_eval), and collect everything into one table: for each budget, the depth with the lowest bpb is the
# compute-optimal model size, and its tokens/param the optimal data:params ratio.
#
#   bash runs/scaling_laws.sh            # GPU node: budgets 1e18..1e19, depths 10..20, full CORE
#   bash runs/scaling_laws.sh --cpu      # CPU demo (also CPU=1): budgets 1e12, 4e12, depths 1..4, 8 CORE items
#
# Time: GPU ~10 h on 8xH100 (24 runs, 1.1e20 FLOPs in all at ~45% MFU, plus 24 full CORE evals); CPU ~10-15
# min on 2 idle cores (more on a busy machine). Runs already in the results folder are skipped, so an
# interrupted sweep resumes.
#
# Writes $NANOCHAT_BASE_DIR/scaling_laws_results_<label>/<run>/{train,eval}.log and base_{train,eval}.json, then
# table.md and results.csv there (scripts/scaling_table.py). Each run also leaves base_checkpoints/<run>/ and
# overwrites report/base_{train,eval}.json: do not share a base dir with a run whose report you still need.
#
# Environment:
#   NANOCHAT_BASE_DIR    where everything is written (default ~/.cache/nanochat)
#   NANOCHAT_LOCAL_DATA  a local data folder (like ../shared/data): pretraining text, eval bundle; nothing
#                        is downloaded. Unset: shards and the CORE bundle come from the internet.
#   NPROC                GPUs per node for torchrun (default 8; ignored with --cpu)
#   WANDB_RUN            wandb run name prefix (default dummy = no wandb); each run logs as <prefix>_<run>
#   LABEL                names the results folder (default: gpu or cpu)
#   BUDGETS, DEPTHS      override the sweep, e.g. BUDGETS="1e18 3e18" DEPTHS="8 10 12"
#   CORE_CAP             CORE items per task (default: all on GPU, 8 on CPU; 0 skips CORE)
#   SHARDS               pretraining shards to download when there are none (GPU default 400)
#   SKIP_SETUP=1         do not run runs/setup.sh (use the python environment that is already active)
set -euo pipefail

# shellcheck source=runs/common.sh
source "$(dirname "$0")/common.sh"
CPU=${CPU:-0}
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "scaling_laws.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
run_env scaling_laws.sh

if [ "$CPU" = 1 ]; then  # FLOPs per token are dominated by lm_head in these tiny models
    LABEL="${LABEL:-cpu}" BUDGETS="${BUDGETS:-1e12 4e12}" DEPTHS="${DEPTHS:-1 2 3 4}" CORE_CAP="${CORE_CAP:-8}"
    TRAIN_FLAGS=("${CPU_TRAIN_FLAGS[@]}")
    launch() { python -m "$@"; }
else
    LABEL="${LABEL:-gpu}" BUDGETS="${BUDGETS:-1e18 2.15e18 4.64e18 1e19}" DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
    CORE_CAP="${CORE_CAP:--1}"
    TRAIN_FLAGS=(--device-batch-size=16 --eval-every=-1 --eval-tokens=52428800)
    launch() { torchrun --standalone --nproc_per_node="$NPROC" -m "$1" -- "${@:2}"; }
fi
RESULTS="$NANOCHAT_BASE_DIR/scaling_laws_results_$LABEL"
sweep_data
for budget in $BUDGETS; do
    for d in $DEPTHS; do
        tag="sl_${LABEL}_f${budget}_d${d}"
        sweep_point "$tag" "$tag" --depth="$d" --target-flops="$budget" "${TRAIN_FLAGS[@]}"
    done
done
python -m scripts.scaling_table "$RESULTS" --title "Scaling laws ($LABEL): val bpb and CORE per FLOPs budget and depth"
