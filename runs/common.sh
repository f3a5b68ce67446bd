#!/usr/bin/env bash
# runs/common.sh: what the run scripts share, sourced by them, never run on its own: --help, the environment
# and the venv, and for the two sweeps (scaling_laws.sh, miniseries.sh) the CPU demo's training flags, the data
# and tokenizer set-up and one sweep point's train + CORE steps. Environment: as documented in the run scripts.

# --help: the calling script's header comment, up to its `set -euo pipefail`.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# $1: the calling script's name, for messages. A relative NANOCHAT_LOCAL_DATA is resolved before the cd
# to the repository root, so ../shared/data means what the caller meant.
run_env() {
    if [ -n "${NANOCHAT_LOCAL_DATA:-}" ]; then
        [ -d "$NANOCHAT_LOCAL_DATA" ] || { echo "$1: NANOCHAT_LOCAL_DATA=$NANOCHAT_LOCAL_DATA is not a directory" >&2; exit 2; }
        export NANOCHAT_LOCAL_DATA="$(cd "$NANOCHAT_LOCAL_DATA" && pwd)"
    fi
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    WANDB_RUN="${WANDB_RUN:-dummy}"
    NPROC="${NPROC:-8}"
}

# runs/setup.sh and its .venv, unless SKIP_SETUP=1 (then the python environment already active is used).
setup_venv() {
    # shellcheck disable=SC1091
    if [ "${SKIP_SETUP:-0}" != 1 ]; then bash runs/setup.sh && source .venv/bin/activate; fi
}

# The sweeps' CPU demo: tiny models (width 64 * depth, heads of 64), 4,096-token steps, no torch.compile (its
# start-up cost is larger than these runs), a short warmup.
CPU_TRAIN_FLAGS=(--head-dim=64 --max-seq-len=256 --device-batch-size=16 --total-batch-size=4096 --warmup-steps=5
                 --compile=off --eval-every=-1 --eval-tokens=65536)

# The results folder $RESULTS; shards and a tokenizer, unless this base dir already has them (e.g. from
# runcpu.sh or speedrun.sh).
sweep_data() {
    mkdir -p "$RESULTS"
    setup_venv
    if ! ls "$NANOCHAT_BASE_DIR"/base_data/*.parquet > /dev/null 2>&1; then
        if [ -n "${NANOCHAT_LOCAL_DATA:-}" ]; then
            python -m nanochat.dataset import "$NANOCHAT_LOCAL_DATA/pretrain_text" --doc-chars 2000
        else
            python -m nanochat.dataset download -n "$([ "$CPU" = 1 ] && echo 1 || echo "${SHARDS:-400}")"
        fi
    fi
    if [ ! -d "$NANOCHAT_BASE_DIR/tokenizer" ]; then
        if [ "$CPU" = 1 ]; then
            python -m scripts.tok_train --vocab-size 8192 --max-chars 20000000
        else
            python -m scripts.tok_train
        fi
    fi
}

# One point of a sweep, in $RESULTS/<tag>: $1 tag, $2 the wandb run name's suffix after $WANDB_RUN, then
# base_train's flags. A point whose base_train.json (or base_eval.json) is already there is not run again.
sweep_point() {
    local tag=$1 out=$RESULTS/$1 run_name=dummy
    [ "$WANDB_RUN" = dummy ] || run_name="${WANDB_RUN}_$2"
    shift 2
    mkdir -p "$out"
    if [ -f "$out/base_train.json" ]; then
        echo "=== $tag: already trained, skipping"
    else
        echo "=== $tag: $*"
        launch scripts.base_train "$@" --sample-every=-1 --save-every=-1 --keep-checkpoints=1 --model-tag="$tag" \
            --run="$run_name" 2>&1 | tee "$out/train.log"
        cp "$NANOCHAT_BASE_DIR/report/base_train.json" "$out/base_train.json"
    fi
    if [ "$CORE_CAP" != 0 ] && [ ! -f "$out/base_eval.json" ]; then
        launch scripts.base_eval --model-tag="$tag" --eval=core --max-per-task="$CORE_CAP" 2>&1 | tee "$out/eval.log"
        cp "$NANOCHAT_BASE_DIR/report/base_eval.json" "$out/base_eval.json"
    fi
}
