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

This file also holds the training loop that scripts/mid_train.py runs with packed rows and its own
mixture; the two differ only in batching, mixture and defaults.

Settings not given are inherited from the parent checkpoint's meta (sequence length, device and total
batch size, learning rates); the learning rates are rescaled to this run's batch with base_train's
sqrt(B / 2^19) rule and multiplied by --init-lr-frac. Loss normalisation: each micro-batch's summed
cross-entropy is divided by the number of assistant targets in the whole optimizer step (all
micro-batches, all ranks), so a micro-batch with few assistant tokens is not over-weighted, and one with
none contributes exactly zero loss and zero gradient (never NaN).

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

import os
import gc
import math
import time
import json
import shutil
import argparse

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, get_peak_flops, get_local_data_dir, init_wandb,
                             write_report_json, git_info, run_cli, GracefulStop)
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import lr_multiplier, muon_momentum
from nanochat.checkpoint import (save_checkpoint, load_checkpoint, resolve_checkpoint, check_tokenizer, stage_dir,
                                 CheckpointError)
from nanochat.chat_data import PackedBatcher, PaddedBatcher, new_stats, drop_overlong
from scripts.base_train import batch_lr_scale
from tasks.common import DataUnavailableError

# Where each stage's loop reads its defaults from; report names follow the script names.
STAGES = {
    "mid": {"report": "mid_train", "source": "base", "sources": ("base",), "packed": True,
            "init_lr_frac": 1.0, "warmdown_ratio": 0.2, "eval_every": 150,
            "mmlu_epochs": 1, "arc_epochs": 1, "gsm8k_epochs": 1, "smoltalk_size": -1, "identity_size": 2000,
            "spelling_size": 80000, "wandb": "nanochat-mid"},
    "sft": {"report": "chat_sft", "source": "mid", "sources": ("mid", "base"), "packed": False,
            "init_lr_frac": 0.8, "warmdown_ratio": 0.5, "eval_every": 100,
            "mmlu_epochs": 0, "arc_epochs": 1, "gsm8k_epochs": 1, "smoltalk_size": 10000, "identity_size": 1000,
            "spelling_size": 2000, "wandb": "nanochat-sft"},
}
# Flags that only steer this invocation; everything else is restored from the checkpoint on --resume.
RUN_CONTROL = ("resume", "max_steps_this_run", "save_every", "keep_checkpoints", "eval_every", "device_type", "run",
               "compile")


def get_args(stage, argv=None, description=__doc__):
    d = STAGES[stage]
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("starting point")
    g.add_argument("--source", choices=d["sources"], default=d["source"], help=f"stage of the checkpoint to start from (default {d['source']})")
    g.add_argument("--model-tag", type=str, default=None, help="tag of the starting checkpoint (required when several exist); also names the output unless --output-tag")
    g.add_argument("--model-step", type=int, default=None, help="step of the starting checkpoint (default: its latest)")
    g.add_argument("--output-tag", type=str, default=None, help="checkpoint directory name for this run (default: the starting checkpoint's tag)")
    g.add_argument("--load-optimizer", type=int, choices=[0, 1], default=1, help="1 = warm-start the optimizer's moments from the starting checkpoint when it has them (learning rates are reset)")
    g.add_argument("--resume", action="store_true", help="continue exactly from this stage's latest checkpoint of the tag (all other settings come from it)")
    g = p.add_argument_group("batch and horizon (unset = inherited from the starting checkpoint)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; -1 = one epoch of the mixture")
    g.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens; longer conversations are truncated after their last whole turn that fits (and counted)")
    g.add_argument("--overlong", choices=["truncate", "drop"], default="truncate", help="conversations whose first reply does not fit in a row: truncate them inside it (counted in the log), or drop them "
                   "from the mixture up front (counted; renders the whole mixture once) so that every reply trained on shows its end, which a short-context model needs to learn to stop")
    g.add_argument("--device-batch-size", type=int, default=None, help="rows per forward pass per device")
    g.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step across ranks (rows per step = this / max seq len)")
    g = p.add_argument_group("optimization (unset learning rates = the starting checkpoint's, rescaled to this batch)")
    g.add_argument("--embedding-lr", type=float, default=None, help="AdamW LR of the embeddings (at width 768 and 2^19-token batches)")
    g.add_argument("--unembedding-lr", type=float, default=None, help="AdamW LR of lm_head (same reference)")
    g.add_argument("--matrix-lr", type=float, default=None, help="Muon LR of the block matrices (same reference)")
    g.add_argument("--scalar-lr", type=float, default=None, help="AdamW LR of the residual scalars")
    g.add_argument("--init-lr-frac", type=float, default=d["init_lr_frac"], help=f"every LR is multiplied by this (default {d['init_lr_frac']})")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (default 0 for finetuning)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the run spent warming the LR up")
    g.add_argument("--warmdown-ratio", type=float, default=d["warmdown_ratio"], help=f"fraction of the run over which the LR decays linearly (default {d['warmdown_ratio']})")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the start")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g = p.add_argument_group("mixture")
    g.add_argument("--smoltalk-size", type=int, default=d["smoltalk_size"], help=f"SmolTalk conversations (-1 = all; offline: the local stand-in) (default {d['smoltalk_size']})")
    g.add_argument("--smoltalk-max-tokens", type=int, default=0, help="keep only the SmolTalk conversations whose first reply ends within this many tokens, like --overlong=drop "
                   "with rows this long, but for the chat data alone: a small model learns the length of its chat replies from SFT, while the tool-use "
                   "tasks (SpellingBee counts, GSM8K) need longer rows (0 = no limit)")
    g.add_argument("--mmlu-epochs", type=int, default=d["mmlu_epochs"], help="passes over MMLU's training split (auxiliary_train; offline only dev exists, so dev)")
    g.add_argument("--arc-epochs", type=int, default=d["arc_epochs"], help="passes over ARC-Easy + ARC-Challenge train")
    g.add_argument("--gsm8k-epochs", type=int, default=d["gsm8k_epochs"], help="passes over GSM8K train")
    g.add_argument("--identity-size", type=int, default=d["identity_size"], help="synthetic identity conversations")
    g.add_argument("--identity-name", type=str, default="nanochat", help="the name the Identity conversations give the model")
    g.add_argument("--identity-author", type=str, default="the nanochat developers", help="who the Identity conversations say made the model")
    g.add_argument("--spelling-size", type=int, default=d["spelling_size"], help="SpellingBee spelling/letter-counting conversations")
    g.add_argument("--custom-json", action="append", default=[], metavar="PATH", help="a .jsonl file of your own conversations (see tasks/customjson.py); repeat for several")
    g.add_argument("--val-size", type=int, default=500, help="conversations per validation source (SmolTalk, MMLU, GSM8K, SpellingBee test)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="steps between validation losses (-1 = only at the start and end)")
    g.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation (rounded to whole micro-batches)")
    g.add_argument("--chat-eval-examples", type=int, default=0, help="before and after training, sample greedy replies to this many held-out prompts: the share of chat prompts "
                   "answered with a reply that ends with <|assistant_end|>, and SpellingBee letter-count accuracy on held-out words (0 = off; costs generation time)")
    g.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep this many most recent checkpoints (0 = all)")
    g.add_argument("--max-steps-this-run", type=int, default=-1, help="stop (with a checkpoint) after this many steps in this invocation; the schedule still targets the full run")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name; 'dummy' (default) disables wandb")
    g.add_argument("--device-type", type=str, default="", help="cuda, mps or cpu (default: autodetect)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the model: auto = on for CUDA and for CPUs with a C++ compiler (rows are then padded to a fixed length)")
    args = p.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} {v}: must be >= 1" for k, v in vars(args).items()
                if k in ("max_seq_len", "device_batch_size", "total_batch_size") and v is not None and v < 1]
    if args.smoltalk_max_tokens < 0:
        problems.append(f"--smoltalk-max-tokens {args.smoltalk_max_tokens}: must be >= 0 (0 = no limit)")
    if args.chat_eval_examples < 0:
        problems.append(f"--chat-eval-examples {args.chat_eval_examples}: must be >= 0")
    if problems:
        p.error("; ".join(problems))
    return args


# -----------------------------------------------------------------------------
# Mixtures


def build_mixtures(args, tokenizer):
    """(train task, val task, description) from the mixture flags. Offline (NANOCHAT_LOCAL_DATA set)
    MMLU has no auxiliary_train, so its small dev split stands in (with ARC train alongside)."""
    from tasks.common import TaskMixture
    from tasks.arc import ARC
    from tasks.mmlu import MMLU
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk
    from tasks.identity import Identity
    from tasks.spellingbee import SpellingBee
    from tasks.customjson import CustomJSON
    offline = get_local_data_dir() is not None
    mmlu_split = "dev" if offline else "auxiliary_train"
    try:
        parts, notes = [], {}
        if args.smoltalk_size != 0:
            smoltalk = SmolTalk("train", stop=None if args.smoltalk_size < 0 else args.smoltalk_size)
            if args.smoltalk_max_tokens > 0:  # + 1: as --max-seq-len T holds T + 1 tokens
                smoltalk, notes["smoltalk_dropped_long"] = drop_overlong(smoltalk, tokenizer, args.smoltalk_max_tokens + 1)
            parts.append(("SmolTalk train", [smoltalk]))
        if args.mmlu_epochs > 0:
            parts.append((f"MMLU {mmlu_split} x{args.mmlu_epochs}", [MMLU("all", mmlu_split)] * args.mmlu_epochs))
        if args.arc_epochs > 0:
            parts.append((f"ARC-Easy train x{args.arc_epochs}", [ARC("ARC-Easy", "train")] * args.arc_epochs))
            parts.append((f"ARC-Challenge train x{args.arc_epochs}", [ARC("ARC-Challenge", "train")] * args.arc_epochs))
        if args.gsm8k_epochs > 0:
            parts.append((f"GSM8K train x{args.gsm8k_epochs}", [GSM8K("main", "train")] * args.gsm8k_epochs))
        if args.identity_size > 0:
            parts.append(("Identity", [Identity(args.identity_name, args.identity_author, size=args.identity_size)]))
        if args.spelling_size > 0:
            parts.append(("SpellingBee train", [SpellingBee(args.spelling_size, "train")]))
        for path in args.custom_json:
            parts.append((f"CustomJSON {path}", [CustomJSON(path)]))
        # Validation mirrors the sources in the mixture, from their held-out splits.
        n = args.val_size
        val_parts = []
        if args.smoltalk_size != 0:
            val_parts.append(SmolTalk("test", stop=n))
        if args.mmlu_epochs > 0 or args.arc_epochs > 0:
            val_parts.append(MMLU("all", "test", stop=n))
        if args.gsm8k_epochs > 0:
            val_parts.append(GSM8K("main", "test", stop=n))
        if args.spelling_size > 0:
            val_parts.append(SpellingBee(n, "test"))
    except (DataUnavailableError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"cannot build the training mixture: {e}")
    tasks = [t for _, ts in parts for t in ts]
    if not tasks:
        raise SystemExit("the training mixture is empty: every size/epochs flag is 0")
    description = {**{name: sum(len(t) for t in ts) for name, ts in parts}, **notes}
    if offline and args.mmlu_epochs > 0:
        description["note"] = "offline: MMLU auxiliary_train is not available locally, MMLU dev is used instead"
    train = TaskMixture(tasks)
    if not val_parts:  # only custom conversations: hold nothing out, report the loss on a training slice
        description["note_val"] = "no held-out source in the mixture: validation loss is on training conversations"
        val_parts = [TaskMixture(tasks, stop=n)]
    return train, TaskMixture(val_parts), description


def chat_eval_sets(args, val_task, tokenizer, context):
    """What --chat-eval-examples measures: (prompts, spelling). prompts: the first n held-out chat
    prompts (the opening user turn of SmolTalk test conversations when SmolTalk is in the mixture, else
    of the validation mixture) whose reference reply fits in the context: where the data itself
    answers at greater length, not ending is right, and a small context would count it as a failure.
    spelling: n SpellingBee letter-count problems on held-out words, or None when SpellingBee is not
    trained on."""
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SpellingBee
    n = args.chat_eval_examples
    source = SmolTalk("test") if args.smoltalk_size != 0 else val_task
    prompts = []
    for conversation in source:
        messages = conversation["messages"]
        head = messages[:3] if messages[0]["role"] == "system" else messages[:2]  # up to the first reply
        if len(tokenizer.render_conversation({"messages": head})[0]) <= context:
            prompts.append(tokenizer.render_for_completion({"messages": head}))
            if len(prompts) == n:
                break
    spelling = SpellingBee(n, "test", count_fraction=1.0) if args.spelling_size > 0 else None
    return prompts, spelling


def lr_schedule(progress, args):
    """LR multiplier at a fraction `progress` in [0, 1) of the run: warmup, flat, linear warmdown to
    --final-lr-frac. optim.lr_multiplier on a 1000-point grid, so it also serves runs whose length is
    one epoch of packed conversations (known only as a fraction, not in steps)."""
    grid = 1000
    return lr_multiplier(min(grid - 1, int(progress * grid)), grid, round(args.warmup_ratio * grid),
                         args.warmdown_ratio, args.final_lr_frac)


# -----------------------------------------------------------------------------
# Starting point


def inherit(args, parent_meta):
    """Fill the unset batch/LR flags from the starting checkpoint's meta (base_train's or ours)."""
    pargs = parent_meta.get("train_args", {})
    cfg = parent_meta["model_config"]
    if args.max_seq_len is None:
        args.max_seq_len = pargs.get("max_seq_len") or cfg["sequence_len"]
    if args.device_batch_size is None:
        args.device_batch_size = pargs.get("device_batch_size") or 32
    if args.total_batch_size is None:
        args.total_batch_size = parent_meta.get("total_batch_size") or 524288
    defaults = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, pargs.get(k) or v)
    return args


def rows_per_step(args, world_size):
    T, b, B = args.max_seq_len, args.device_batch_size, args.total_batch_size
    if B % T:
        raise SystemExit(f"--total-batch-size {B} is not a multiple of --max-seq-len {T}")
    R = B // T
    if R % (b * world_size):
        options = [d for d in range(1, R // world_size + 1) if R % (d * world_size) == 0]
        raise SystemExit(f"{R} rows per step (--total-batch-size {B} / --max-seq-len {T}) do not divide into micro-batches "
                         f"of --device-batch-size {b} x {world_size} rank(s); device batch sizes that divide: {options}")
    return R


def masked_backward(model, batches, scale):
    """Backward of scale x (summed cross-entropy over every non-ignored target of the micro-batches);
    returns that sum. With scale = 1 / (targets in the whole step) the gradient is the mean over all of
    the step's assistant tokens, however they are spread over micro-batches; a micro-batch whose
    targets are all -1 adds exactly zero loss and zero gradient."""
    loss_sum = torch.zeros((), dtype=torch.float32, device=batches[0][0].device)
    for x, y in batches:
        loss = model(x, y, loss_reduction="sum")
        (loss * scale).backward()
        loss_sum += loss.detach()
    return loss_sum


def all_reduce_sum(t, rt):
    if rt.ddp:
        dist.all_reduce(t)
    return t


# -----------------------------------------------------------------------------


def run(stage, argv=None, description=__doc__):
    """The finetuning loop shared by mid_train ("mid": packed rows) and chat_sft ("sft": padded rows)."""
    from nanochat.tokenizer import get_tokenizer
    S = STAGES[stage]
    args = get_args(stage, argv, description)
    rt = compute_init(args.device_type, seed=args.seed)
    master = rt.master
    print0(f"Device: {rt.device} x {rt.world_size} rank(s); compute dtype {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason})")
    tokenizer = get_tokenizer()

    # Starting weights: our own latest checkpoint (--resume) or the parent stage's.
    try:
        if args.resume:
            ckpt_dir, ckpt_step = resolve_checkpoint(stage, args.output_tag or args.model_tag)
            state, meta, optim_shards, loader_states = load_checkpoint(ckpt_dir, ckpt_step, load_optimizer=True,
                                                                       load_loader=True)
            if optim_shards is None or loader_states is None:
                raise SystemExit(f"--resume: {ckpt_dir} step {ckpt_step} lacks optimizer or batcher state")
            # the saved settings; flags newer than the checkpoint keep their defaults
            args = argparse.Namespace(**{**vars(args), **meta["train_args"], **{k: getattr(args, k) for k in RUN_CONTROL}})
            parent = meta["parent"]
            where = f"our own checkpoint {ckpt_dir} step {ckpt_step}"
        else:
            pdir, pstep = resolve_checkpoint(args.source, args.model_tag, args.model_step)
            state, meta, optim_shards, _ = load_checkpoint(pdir, pstep, load_optimizer=bool(args.load_optimizer))
            parent = {"source": args.source, "tag": os.path.basename(pdir), "step": pstep, "dir": pdir}
            args = inherit(args, meta)
            args.output_tag = args.output_tag or parent["tag"]
            ckpt_dir, loader_states = os.path.join(stage_dir(stage), args.output_tag), None
            where = f"{args.source} checkpoint {pdir} step {pstep}"
        check_tokenizer(meta, tokenizer, where)
    except CheckpointError as e:
        raise SystemExit(str(e))
    config = GPTConfig(**meta["model_config"])
    model = build_model(config, rt.device, rt.dtype)
    model.load_state_dict({k.removeprefix("_orig_mod."): v.float() for k, v in state.items()})
    del state
    print0(f"Starting from {where}; writing to {ckpt_dir}")

    T, b = args.max_seq_len, args.device_batch_size
    R = rows_per_step(args, rt.world_size)
    grad_accum = R // (b * rt.world_size)
    if T > config.sequence_len:
        print0(f"WARNING: --max-seq-len {T} is longer than the model's training context {config.sequence_len}")
    lr_scale = batch_lr_scale(args.total_batch_size)  # base_train's LR transfer rule
    optimizer = model.setup_optimizer(
        unembedding_lr=args.unembedding_lr * lr_scale * args.init_lr_frac,
        embedding_lr=args.embedding_lr * lr_scale * args.init_lr_frac,
        matrix_lr=args.matrix_lr * lr_scale * args.init_lr_frac, scalar_lr=args.scalar_lr * lr_scale * args.init_lr_frac,
        weight_decay=args.weight_decay, rank=rt.rank, world_size=rt.world_size)
    if optim_shards is not None:
        try:
            optimizer.load_shard_state_dicts(optim_shards)  # moments only: LRs stay the ones just set
        except (ValueError, KeyError) as e:
            raise SystemExit(f"cannot load the optimizer state of {where}: {e}")
        print0("Optimizer moments " + ("restored" if args.resume else "warm-started from the starting checkpoint"))
    del optim_shards

    use_compile = args.compile == "on" or (args.compile == "auto" and (
        rt.device_type == "cuda" or (rt.device_type == "cpu" and shutil.which(os.environ.get("CXX", "g++")))))
    if use_compile:
        model.compile_for_training()

    train_task, val_task, mixture = build_mixtures(args, tokenizer)
    if args.overlong == "drop":
        t0 = time.time()
        train_task, dropped = drop_overlong(train_task, tokenizer, T + 1)
        mixture["dropped_overlong"] = dropped
        print0(f"--overlong=drop: dropped {dropped:,} conversations whose first reply ends beyond {T + 1} tokens ({time.time() - t0:.0f}s)")
        if len(train_task) == 0:
            raise SystemExit(f"no conversation's first reply fits in --max-seq-len {T} + 1 tokens: raise it or use --overlong=truncate")
    print0(f"Mixture: {len(train_task):,} conversations: " + json.dumps(mixture))
    print0(f"Validation: {len(val_task):,} conversations")

    try:
        if S["packed"]:
            batcher = PackedBatcher(train_task, tokenizer, b, T, R, rt.rank, rt.world_size, rt.device,
                                    resume_state=loader_states)
        else:  # compiled kernels want one fixed shape; eager runs pad only to each micro-batch's longest row
            batcher = PaddedBatcher(train_task, tokenizer, b, T, R, rt.rank, rt.world_size, rt.device,
                                    fixed_length=use_compile, resume_state=loader_states)
    except ValueError as e:
        raise SystemExit(f"--resume: {e}")
    # Horizon: given, one epoch of rows (SFT: one conversation per row), or one epoch of packed
    # conversations (mid: the packing density is only known as we go, so progress is counted in them).
    if args.num_iterations > 0:
        N = args.num_iterations
    elif not S["packed"]:
        N = max(1, len(train_task) // R)
    else:
        N = None
    print0(f"Batch: {R} rows of up to {T} tokens per step ({args.total_batch_size:,} tokens), device batch {b}, "
           f"{grad_accum} micro-step(s); horizon: {f'{N:,} steps' if N else 'one epoch of the mixture'}")
    print0(f"LRs (x{lr_scale:.4f} batch scale x{args.init_lr_frac} init frac): embedding {args.embedding_lr}, "
           f"unembedding {args.unembedding_lr}, matrix {args.matrix_lr}, scalar {args.scalar_lr}")
    print0(f"torch.compile: {'on' if use_compile else 'off'}")
    flops_per_token = model.flops_per_token(T)
    peak, peak_reason = get_peak_flops(rt.device_type, rt.dtype)
    wandb = init_wandb(args.run, S["wandb"], vars(args))

    loop = meta["loop_state"] if args.resume else {
        "step": 0, "losses": [], "val_history": [], "data": new_stats(), "valid_targets": 0, "tokens": 0,
        "timed_tokens": 0, "skipped_steps": 0, "total_training_time": 0.0}
    for k, v in new_stats().items():  # counters added since the checkpoint was written start at 0
        loop["data"].setdefault(k, v)
    loop.setdefault("chat_evals", [])
    gen_sets = None
    if args.chat_eval_examples > 0:
        try:
            gen_sets = chat_eval_sets(args, val_task, tokenizer, config.sequence_len)
        except (DataUnavailableError, ValueError) as e:
            raise SystemExit(f"--chat-eval-examples: {e}")

    def progress(step):
        return step / N if N else loop["data"]["conversations"] / len(train_task)

    def checkpoint(step, loader_state):
        m = {"stage": stage, "model_config": config.to_dict(), "train_args": vars(args), "parent": parent,
             "tokenizer_fingerprint": tokenizer.fingerprint, "total_batch_size": args.total_batch_size,
             "num_iterations": N, "dtype": str(rt.dtype), "git": git_info(), "mixture": mixture,
             "loop_state": {**loop, "step": step}}
        save_checkpoint(ckpt_dir, step, m, model_state=model.state_dict() if master else None,
                        optim_state=optimizer.shard_state_dict(), loader_state=loader_state, rank=rt.rank,
                        world_size=rt.world_size, keep_last=args.keep_checkpoints or None)
        print0(f"Saved checkpoint {ckpt_dir} step {step}")

    @torch.no_grad()
    def evaluate(step):
        """Mean cross-entropy over the assistant tokens of the first validation conversations, one per
        row (for both stages, so mid and SFT losses compare), the same rows whatever the world size."""
        model.eval()
        unit = b * rt.world_size
        rows = min(max(1, args.eval_tokens // T), len(val_task))
        rows = max(unit, rows // unit * unit)
        val = PaddedBatcher(val_task, tokenizer, b, T, rows, rt.rank, rt.world_size, rt.device)
        tot = torch.zeros(2, dtype=torch.float64, device=rt.device)
        for x, y in val.next_step()[0]:
            tot[0] += model(x, y, loss_reduction="sum").double()
            tot[1] += (y >= 0).sum()
        all_reduce_sum(tot, rt)
        model.train()
        loss = (tot[0] / tot[1].clamp(min=1)).item()
        loop["val_history"].append([step, loss])
        print0(f"Step {step:05d} | validation loss {loss:.4f} over {int(tot[1].item()):,} assistant tokens")
        wandb.log({"step": step, "val/loss": loss})
        return loss

    def chat_evals(step):
        """--chat-eval-examples: greedy replies through the Engine (the inference path) with the
        current weights; see chat_eval_sets."""
        from nanochat.engine import Engine
        from scripts.chat_eval import run_generative, turn_end_rate
        prompts, spelling = gen_sets
        model.eval()
        engine = Engine(model, tokenizer)
        t0 = time.time()
        ended, total = turn_end_rate(engine, tokenizer, rt, prompts)
        row = {"step": step, "turn_end": ended / max(1, total), "turn_end_prompts": total}
        msg = f"replies ending with <|assistant_end|> {ended}/{total} held-out chat prompts"
        if spelling is not None:
            greedy = argparse.Namespace(num_samples=1, max_new_tokens=config.sequence_len, temperature=0.0,
                                        top_k=None, seed=args.seed)
            passed, n, _ = run_generative(spelling, engine, tokenizer, rt, greedy, len(spelling), progress=False)
            row.update(spelling_count=passed / max(1, n), spelling_count_problems=n)
            msg += f" | SpellingBee letter count {passed}/{n} held-out words"
        model.train()
        loop["chat_evals"].append(row)
        print0(f"Step {step:05d} | {msg} ({time.time() - t0:.0f}s)")

    stop = GracefulStop().install()  # Ctrl-C / SIGTERM: finish the step, save, exit 130
    step, steps_this_run = loop["step"], 0
    t_start = time.time()
    model.train()
    try:
        while True:
            stop.check()
            last = step >= N if N else progress(step) >= 1.0
            stop_early = args.max_steps_this_run > 0 and steps_this_run >= args.max_steps_this_run
            # Checkpoint first, so a crash in evaluation never loses the trained weights.
            if steps_this_run > 0 and (last or stop_early or (args.save_every > 0 and step % args.save_every == 0)):
                checkpoint(step, batcher.state_dict())
            evaluated = loop["val_history"] and loop["val_history"][-1][0] == step  # e.g. just resumed
            if not evaluated and (last or step == 0 or (args.eval_every > 0 and step % args.eval_every == 0)):
                evaluate(step)
            if gen_sets and (last or step == 0) and not (loop["chat_evals"] and loop["chat_evals"][-1]["step"] == step):
                chat_evals(step)
            if last or stop_early:
                break
            t0 = time.time()
            batches, stats = batcher.next_step()
            counts = torch.tensor([sum(int((y >= 0).sum()) for _, y in batches), sum(x.numel() for x, _ in batches),
                                   *stats.values()], dtype=torch.float64, device=rt.device)
            all_reduce_sum(counts, rt)
            n_valid = counts[0].item()
            lrm = lr_schedule(progress(step), args)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(step)
            # Summed CE / assistant targets of the whole step; x world size because the optimizer
            # averages gradients over ranks.
            loss_sum = masked_backward(model, batches, rt.world_size / max(n_valid, 1.0))
            if n_valid > 0:
                optimizer.step()
            else:  # nothing to learn from in the whole step: don't let momentum move the weights
                loop["skipped_steps"] += 1
            model.zero_grad(set_to_none=True)
            # None (not NaN, which is not JSON) for a step with no assistant token anywhere: nothing was learned
            train_loss = (all_reduce_sum(loss_sum, rt).item() / n_valid) if n_valid > 0 else None
            if train_loss is not None and not math.isfinite(train_loss):
                raise SystemExit(f"loss became {train_loss} at step {step}: lower the learning rates, or check the data")
            dt = time.time() - t0
            step += 1
            steps_this_run += 1
            if steps_this_run > 1:  # the first step of an invocation includes compilation and warm-up
                loop["total_training_time"] += dt
                loop["timed_tokens"] += int(counts[1].item())
            for k, v in zip(stats.keys(), counts[2:].tolist()):
                loop["data"][k] += int(v)
            loop["valid_targets"] += int(n_valid)
            loop["tokens"] += int(counts[1].item())
            loop["losses"].append(train_loss)
            tok_per_sec = counts[1].item() / dt  # every token of the step, padding included (it is computed)
            mfu = flops_per_token * tok_per_sec / (peak * rt.world_size)
            loop["last_tok_per_sec"], loop["last_mfu"] = tok_per_sec, mfu
            pad = loop["data"]["pad_tokens"] / max(1, loop["data"]["row_tokens"])
            print0(f"step {step:05d}{f'/{N:05d}' if N else ''} ({100 * progress(step):.1f}%) | loss {'skipped (no assistant tokens)' if train_loss is None else f'{train_loss:.4f}'} | "
                   f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {100 * mfu:.1f}% | "
                   f"truncated {loop['data']['truncated']}/{loop['data']['conversations']} ({loop['data']['cut_mid_reply']} mid-reply) | pad {100 * pad:.0f}%")
            if step % 10 == 0:
                wandb.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec,
                           "train/mfu": mfu, "train/truncated": loop["data"]["truncated"]})
            if step == 1:
                gc.collect()
                gc.freeze()  # long-lived objects exist now; Python's GC pauses cost ~0.5 s each
    except KeyboardInterrupt as e:
        stop.exit(e, rt, step, steps_this_run, lambda: checkpoint(step, batcher.state_dict()))
    finally:
        stop.restore()

    if last:
        d, ce = loop["data"], loop["chat_evals"]
        timed = loop["total_training_time"]
        tok_per_sec = loop["timed_tokens"] / timed if timed > 0 else loop.get("last_tok_per_sec", 0.0)
        report = {
            "stage": stage, "model_tag": args.output_tag, "parent": parent, "model_config": config.to_dict(),
            "step": step, "num_iterations": N, "world_size": rt.world_size, "mixture": mixture,
            "train_conversations": len(train_task), "epochs": d["conversations"] / len(train_task),
            "rows_per_step": R, "max_seq_len": T, "tokens": loop["tokens"], "assistant_tokens": loop["valid_targets"],
            "conversations": d["conversations"], "truncated_conversations": d["truncated"],
            "cut_mid_reply_conversations": d["cut_mid_reply"],
            "padding_fraction": d["pad_tokens"] / max(1, d["row_tokens"]), "skipped_steps": loop["skipped_steps"],
            "val_loss": loop["val_history"][-1][1] if loop["val_history"] else None,
            "initial_val_loss": loop["val_history"][0][1] if loop["val_history"] else None,
            "turn_end_before": ce[0]["turn_end"] if ce else None, "turn_end_after": ce[-1]["turn_end"] if ce else None,
            "spelling_count_before": ce[0].get("spelling_count") if ce else None,
            "spelling_count_after": ce[-1].get("spelling_count") if ce else None, "chat_evals": ce,
            "tok_per_sec": tok_per_sec, "mfu": flops_per_token * tok_per_sec / (peak * rt.world_size),
            "mfu_reference": peak_reason, "total_training_time": loop["total_training_time"],
            "wall_time": time.time() - t_start, "dtype": str(rt.dtype).removeprefix("torch."), "device": rt.device_type,
            "compile": bool(use_compile), "args": vars(args), "losses": loop["losses"], "val_history": loop["val_history"],
        }
        path = write_report_json(S["report"], report)
        print0(f"Done: val loss {report['initial_val_loss']:.4f} -> {report['val_loss']:.4f}, "
               f"{d['truncated']} of {d['conversations']} conversations truncated ({d['cut_mid_reply']} inside their first reply). Report: {path}")
        if len(ce) > 1:
            print0(f"Turn ends with <|assistant_end|>: {ce[0]['turn_end']:.1%} -> {ce[-1]['turn_end']:.1%}" +
                   (f"; SpellingBee letter count: {ce[0]['spelling_count']:.1%} -> {ce[-1]['spelling_count']:.1%}"
                    if "spelling_count" in ce[-1] else ""))
    wandb.finish()
    compute_cleanup()


def main(argv=None):
    run("sft", argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
