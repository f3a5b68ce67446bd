"""
Pretrain the base model. One dial: --depth derives width, heads, batch size, learning rates, the
training horizon and weight decay; every other flag has a default that follows from it.

    python -m scripts.base_train --depth=4 --max-seq-len=512 --total-batch-size=16384 --num-iterations=200
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24
    python -m scripts.base_train --depth=24 --dry-run --gpus=8      # the plan only, no training

Writes base_checkpoints/<tag>/ (model, per-rank optimizer and loader state, meta) and
report/base_train.json under the base dir.
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

from nanochat.common import (compute_init, compute_cleanup, print0, get_peak_flops, init_wandb,
                             write_report_json, git_info, run_cli, GPU_PEAK_BF16_FLOPS, GracefulStop)
from nanochat.gpt import GPTConfig, GPT, build_model
from nanochat.optim import lr_multiplier, muon_momentum
from nanochat.checkpoint import save_checkpoint, load_checkpoint, list_steps, check_tokenizer, stage_dir

# Reference point for transferring batch size, LR and weight decay across sizes (upstream nanochat's
# d12 tuning): 2^19 tokens per step at d12 with the same tokens:params ratio.
B_REF = 2 ** 19
REF_DEPTH = 12
LR_SCALE_FLOOR = 0.5  # see batch_lr_scale
WD_CAP_FACTOR = 10  # derived Muon weight decay is capped at this multiple of --weight-decay
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


# Validation tokens per evaluation. 20 of upstream's 2^19-token batches take seconds on a GPU; on a
# CPU (~20K tok/s forward at d4) they would take minutes at every --eval-every.
GPU_EVAL_TOKENS = 20 * 524288
CPU_EVAL_TOKENS = 524288


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (all derived from --depth unless given)")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers: the one dial (default 20)")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio, rounded up to a multiple of the head dim (default 64)")
    g.add_argument("--head-dim", type=int, default=128, help="attention head size; width / head dim = number of heads (default 128)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens (default 2048)")
    g.add_argument("--window-pattern", type=str, default="auto", help="per-layer attention windows tiled over layers, S = quarter context, L = full; 'auto' = SSSL with FlashAttention-3, else L (SDPA has no fast sliding window)")
    g.add_argument("--no-value-embeds", action="store_true", help="disable value embeddings (makes the model exportable as transformers' built-in nanochat type)")
    g.add_argument("--no-resid-scalars", action="store_true", help="disable the per-layer residual scalars (same reason)")
    g = p.add_argument_group("horizon (first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps")
    g.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs")
    g.add_argument("--target-param-data-ratio", type=float, default=12.0, help="tokens = ratio * (matrix params + lm_head) (default 12)")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per device; lower it if you run out of memory (gradient accumulation keeps the result the same)")
    g.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step across all ranks; -1 = derived from depth (Power Lines, B ~ D^0.383)")
    g.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of the token and value embeddings (at width 768 and 2^19-token batches)")
    g.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR of lm_head (same reference)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices (same reference)")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the residual scalars")
    g.add_argument("--weight-decay", type=float, default=0.28, help="Muon cautious weight decay at the reference size; scaled with batch and horizon, decayed to 0 over the run")
    g.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    g.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of the run over which LR decays linearly")
    g.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end as a fraction of the peak")
    g.add_argument("--ortho", choices=["polar", "ns"], default="polar", help="Muon orthogonalisation: Polar Express or Newton-Schulz")
    g.add_argument("--seed", type=int, default=42, help="random seed for initialisation")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=250, help="steps between val bits-per-byte evaluations (-1 = only at the end)")
    g.add_argument("--eval-tokens", type=int, default=None,
                   help=f"validation tokens per evaluation (default {GPU_EVAL_TOKENS:,} on a GPU, {CPU_EVAL_TOKENS:,} "
                        f"elsewhere)")
    g.add_argument("--sample-every", type=int, default=2000, help="steps between printing greedy samples (-1 = only at the end)")
    g.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep this many most recent checkpoints (0 = keep all)")
    g.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint of --model-tag")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name; 'dummy' (default) disables wandb")
    g.add_argument("--device-type", type=str, default="", help="cuda, mps or cpu (default: autodetect)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the model: auto = on for CUDA and for CPUs with a C++ compiler")
    g.add_argument("--max-steps-this-run", type=int, default=-1, help="stop (with a checkpoint) after this many steps in this invocation; the schedule still targets the full horizon (for testing resume)")
    g = p.add_argument_group("plan only")
    g.add_argument("--dry-run", action="store_true", help="print the derived plan (params, tokens, steps, FLOPs, time and cost estimate) and exit")
    g.add_argument("--gpus", type=int, default=8, help="[dry run] number of GPUs for the estimate")
    g.add_argument("--gpu-type", type=str, default="H100", help="[dry run] GPU model, looked up in the peak-FLOPs table")
    g.add_argument("--mfu", type=float, default=0.45, help="[dry run] assumed model FLOPs utilisation")
    g.add_argument("--gpu-hour-price", type=float, default=3.0, help="[dry run] $ per GPU-hour")
    args = p.parse_args(argv)
    problems = []
    if args.depth < 1:
        problems.append(f"--depth {args.depth}: must be >= 1")
    if args.max_seq_len < 8:
        problems.append(f"--max-seq-len {args.max_seq_len}: must be >= 8")
    if args.device_batch_size < 1:
        problems.append(f"--device-batch-size {args.device_batch_size}: must be >= 1")
    if args.head_dim < 2 or args.head_dim % 2:
        problems.append(f"--head-dim {args.head_dim}: must be an even number >= 2")
    if problems:
        p.error("; ".join(problems))
    return args


# -----------------------------------------------------------------------------
# Everything that follows from --depth

def model_config(args, vocab_size, fa3=False):
    head_dim = args.head_dim
    width = math.ceil(args.depth * args.aspect_ratio / head_dim) * head_dim
    pattern = args.window_pattern if args.window_pattern != "auto" else ("SSSL" if fa3 else "L")
    return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth,
                     n_head=width // head_dim, n_kv_head=width // head_dim, n_embd=width, window_pattern=pattern,
                     value_embeds=not args.no_value_embeds, resid_scalars=not args.no_resid_scalars)


def batch_lr_scale(B):
    """LR multiplier for a total batch of B tokens: AdamW's sqrt(B / 2^19) rule (applied to Muon too),
    but never below 0.5. The rule shrinks LRs 8x at the 8K-token batches of CPU runs, which trains far
    slower; measured with d4, 8,192-token batches, 150 steps (val bpb): scale 0.125 (the plain rule)
    2.014, 0.25 1.949, 0.5 1.916, 1.0 1.911. Batches of 2^17 tokens and more are unaffected."""
    return max(LR_SCALE_FLOOR, (B / B_REF) ** 0.5)


def scaling_params(config):
    with torch.device("meta"):
        return GPT(config).num_params()["scaling"]


def derive_plan(args, config, world_size):
    """Batch size, horizon, LR and weight-decay scaling, all from the model size."""
    with torch.device("meta"):
        model = GPT(config)
    n_scaling = model.num_params()["scaling"]
    flops_per_token = model.flops_per_token()
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 12.0
    ref_args = argparse.Namespace(**{**vars(args), "depth": REF_DEPTH, "head_dim": 128})
    D = ratio * n_scaling
    D_ref = ratio * scaling_params(model_config(ref_args, config.vocab_size))
    if args.total_batch_size > 0:
        B = args.total_batch_size
        batch_reason = "given"
    else:
        # Power Lines (Bergsma et al. 2025): the best batch grows as D^0.383; round to a power of 2.
        B = 2 ** round(math.log2(B_REF * (D / D_ref) ** 0.383))
        batch_reason = f"auto: 2^19 * (D/D_ref)^0.383 with D/D_ref = {D / D_ref:.3f}"
    if args.num_iterations > 0:
        steps, horizon = args.num_iterations, "given --num-iterations"
    elif args.target_flops > 0:
        steps, horizon = max(1, round(args.target_flops / (flops_per_token * B))), f"--target-flops {args.target_flops:.3g}"
    else:
        steps, horizon = max(1, int(D // B)), f"tokens:params ratio {ratio}"
    lr_scale = batch_lr_scale(B)
    # Weight decay transfers so that the decay timescale 1 / (lr * lambda), in steps, stays the same
    # fraction of the run as at the reference (T_epoch rule): lambda = lambda_ref * (B/B_ref) / lr_scale
    # * (D_ref/D), i.e. lambda_ref * sqrt(B/B_ref) * D_ref/D where the sqrt LR rule applies.
    weight_decay = args.weight_decay * (B / B_REF) / lr_scale * (D_ref / (steps * B))
    # The rule extrapolates to absurd values (hundreds) for runs 10^4x smaller than the reference,
    # like the CPU demos, where the decay would wipe the weights out in a few steps. Beyond 10x the
    # reference value there is no evidence for it, so cap there (and say so in the plan).
    wd_uncapped = weight_decay
    weight_decay = min(weight_decay, WD_CAP_FACTOR * args.weight_decay)
    rows = B // args.max_seq_len
    return {"n_scaling": n_scaling, "flops_per_token": flops_per_token, "total_batch_size": B,
            "batch_reason": batch_reason, "num_iterations": steps, "horizon": horizon, "lr_scale": lr_scale,
            "weight_decay": weight_decay, "weight_decay_uncapped": wd_uncapped, "rows_per_step": rows, "tokens": steps * B,
            "total_flops": flops_per_token * steps * B, "num_params": model.num_params()}


def check_batch(args, plan, world_size):
    B, T, b = plan["total_batch_size"], args.max_seq_len, args.device_batch_size
    per_micro = b * T * world_size
    if B % T:
        raise SystemExit(f"--total-batch-size {B} is not a multiple of --max-seq-len {T}")
    if B % per_micro:
        rows = B // T // world_size
        options = [d for d in range(1, rows + 1) if rows % d == 0]
        raise SystemExit(f"--total-batch-size {B} does not divide into micro-batches of --device-batch-size {b} "
                         f"x --max-seq-len {T} x {world_size} rank(s) = {per_micro} tokens. "
                         f"Device batch sizes that divide: {options}")
    return B // per_micro


def estimate_memory(config, plan, args, dtype):
    """Rough peak bytes per device: fp32 weights + grads + optimizer state, compute-dtype weight copies,
    activations kept for backward, and one loss chunk. Calibrated against measured CPU peaks."""
    P = plan["num_params"]["total"]
    adam = P - plan["num_params"]["transformer_matrices"]
    bpe = torch.finfo(dtype).bits // 8
    static = 4 * P + 4 * P + 8 * adam + 4 * (P - adam) + bpe * P
    tokens = args.device_batch_size * args.max_seq_len
    # Saved activations per token per layer, in units of n_embd compute-dtype values (q, k, v, attention
    # out, norms, residuals, and the 4x-wide MLP hidden twice), plus the fp32 embedding output.
    act = tokens * config.n_layer * 26 * config.n_embd * bpe + tokens * config.n_embd * 8
    from nanochat.gpt import chunk_rows
    loss_chunk = chunk_rows(config.vocab_size) * config.vocab_size * (4 * 3 + 2 * bpe)
    return static + act + loss_chunk, static, act / args.device_batch_size


def device_memory(device_type):
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[1]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return None


def print_dry_run(args, config, plan):
    peak = dict(GPU_PEAK_BF16_FLOPS).get(args.gpu_type)
    if peak is None:
        peak = next((f for k, f in GPU_PEAK_BF16_FLOPS if k.lower() in args.gpu_type.lower()), None)
    if peak is None:
        raise SystemExit(f"--gpu-type {args.gpu_type!r} is not in the peak table; known: {', '.join(k for k, _ in GPU_PEAK_BF16_FLOPS)}")
    seconds = plan["total_flops"] / (peak * args.gpus * args.mfu)
    hours = seconds / 3600
    out = {
        "depth": args.depth, "model_config": config.to_dict(), "num_params": plan["num_params"],
        "scaling_params": plan["n_scaling"], "flops_per_token": plan["flops_per_token"],
        "total_batch_size": plan["total_batch_size"], "batch_reason": plan["batch_reason"],
        "num_iterations": plan["num_iterations"], "horizon": plan["horizon"], "tokens": plan["tokens"],
        "tokens_per_param": plan["tokens"] / plan["n_scaling"], "total_flops": plan["total_flops"],
        "lr_scale": plan["lr_scale"], "weight_decay": plan["weight_decay"],
        "estimate": {"gpus": args.gpus, "gpu_type": args.gpu_type, "peak_flops_per_gpu": peak, "mfu": args.mfu,
                     "hours": hours, "cost_usd": hours * args.gpus * args.gpu_hour_price,
                     "gpu_hour_price": args.gpu_hour_price},
    }
    print(f"Plan for depth {args.depth}: {plan['num_params']['total']:,} params ({plan['n_scaling']:,} scaling), "
          f"width {config.n_embd}, {config.n_head} heads, seq {config.sequence_len}")
    print(f"  batch {plan['total_batch_size']:,} tokens ({plan['batch_reason']}), {plan['num_iterations']:,} steps "
          f"({plan['horizon']}), {plan['tokens']:,} tokens ({out['tokens_per_param']:.1f} per scaling param)")
    print(f"  {plan['flops_per_token']:.3e} FLOPs/token, {plan['total_flops']:.3e} FLOPs total")
    print(f"  on {args.gpus}x {args.gpu_type} at {args.mfu:.0%} MFU: {hours:.2f} h, ${out['estimate']['cost_usd']:,.0f} "
          f"at ${args.gpu_hour_price}/GPU-hour")
    print(json.dumps(out))
    return out


def optimizer_state_bytes(optimizer, rt):
    """Optimizer state bytes held by each rank (a collective under torchrun): ZeRO-2 sharding makes each
    rank's share about 1/world_size of the single-process total."""
    mine = torch.tensor([optimizer.state_bytes()], dtype=torch.long, device=rt.device)
    if not rt.ddp:
        return [int(mine.item())]
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    from nanochat.tokenizer import get_tokenizer, get_token_bytes
    from nanochat.gpt import _fa3_func
    if args.dry_run:
        try:
            vocab = get_tokenizer().get_vocab_size()
        except SystemExit:
            vocab = 32768  # no tokenizer yet: plan with the default vocabulary
        config = model_config(args, vocab, fa3=True)
        plan = derive_plan(args, config, args.gpus)
        return print_dry_run(args, config, plan)

    rt = compute_init(args.device_type, seed=args.seed)
    master = rt.master
    if args.eval_tokens is None:
        args.eval_tokens = GPU_EVAL_TOKENS if rt.device_type == "cuda" else CPU_EVAL_TOKENS
    print0(f"Device: {rt.device} x {rt.world_size} rank(s); compute dtype {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason})")
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(rt.device)
    config = model_config(args, tokenizer.get_vocab_size(), fa3=_fa3_func is not None and rt.device_type == "cuda")
    if config.window_pattern != "L" and _fa3_func is None:
        print0(f"WARNING: window pattern {config.window_pattern} without FlashAttention-3: SDPA masks sliding windows explicitly, which is slow")
    plan = derive_plan(args, config, rt.world_size)
    grad_accum = check_batch(args, plan, rt.world_size)
    B, T, N = plan["total_batch_size"], args.max_seq_len, plan["num_iterations"]
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = os.path.join(stage_dir("base"), model_tag)

    print0(f"Model: {json.dumps(config.to_dict())}")
    print0("Parameters: " + ", ".join(f"{k} {v:,}" for k, v in plan["num_params"].items()))
    print0(f"FLOPs per token: {plan['flops_per_token']:.3e}")
    print0(f"Total batch size: {B:,} tokens ({plan['batch_reason']}); device batch {args.device_batch_size} x {T}, "
          f"{grad_accum} micro-step(s) per step")
    print0(f"Horizon: {N:,} steps ({plan['horizon']}), {plan['tokens']:,} tokens, "
          f"{plan['tokens'] / plan['n_scaling']:.2f} tokens per scaling param, {plan['total_flops']:.3e} FLOPs")
    capped = plan["weight_decay_uncapped"] > plan["weight_decay"]
    print0(f"LR scale {plan['lr_scale']:.4f} (sqrt(B/2^19), at least {LR_SCALE_FLOOR}); Muon weight decay {plan['weight_decay']:.4f}"
           + (f" (capped at {WD_CAP_FACTOR}x --weight-decay; the transfer rule gave "
              f"{plan['weight_decay_uncapped']:.4g} for this short run)" if capped else ""))
    need, static, per_row = estimate_memory(config, plan, args, rt.dtype)
    have = device_memory(rt.device_type)
    print0(f"Estimated peak memory: {need / 2**30:.2f} GiB" + (f" of {have / 2**30:.1f} GiB available" if have else ""))
    if have and need > 0.9 * have:
        fit = int((0.9 * have - static) // per_row) if 0.9 * have > static else 0
        rows = B // T // rt.world_size
        options = [d for d in range(1, min(fit, rows) + 1) if rows % d == 0]
        hint = f"--device-batch-size {options[-1]}" if options else "a smaller --depth or --max-seq-len"
        print0(f"WARNING: this will likely not fit in memory; try {hint}")

    # Model and optimizer
    model = build_model(config, rt.device, rt.dtype)
    optimizer = model.setup_optimizer(
        unembedding_lr=args.unembedding_lr * plan["lr_scale"], embedding_lr=args.embedding_lr * plan["lr_scale"],
        matrix_lr=args.matrix_lr * plan["lr_scale"], scalar_lr=args.scalar_lr * plan["lr_scale"],
        weight_decay=plan["weight_decay"], rank=rt.rank, world_size=rt.world_size, ortho=args.ortho)
    loop = {"step": 0, "losses": [], "val_bpb_history": [], "total_training_time": 0.0, "min_val_bpb": float("inf")}
    loader_states = None
    if args.resume:
        steps = list_steps(ckpt_dir)
        if not steps:
            raise SystemExit(f"--resume: no complete checkpoint in {ckpt_dir}")
        state, meta, optim_shards, loader_states = load_checkpoint(ckpt_dir, steps[-1], load_optimizer=True,
                                                                   load_loader=True)
        check_tokenizer(meta, tokenizer, f"checkpoint {ckpt_dir} step {steps[-1]}")
        if meta["model_config"] != config.to_dict():
            raise SystemExit(f"--resume: the checkpoint's model config {meta['model_config']} differs from the one these "
                             f"flags give {config.to_dict()}; pass the same model flags")
        if meta.get("total_batch_size") != B or meta.get("num_iterations") != N:
            raise SystemExit(f"--resume: the checkpoint was trained with total batch {meta.get('total_batch_size')} and "
                             f"{meta.get('num_iterations')} steps, these flags give {B} and {N}; pass the same flags")
        model.load_state_dict(state)
        if optim_shards is None:
            raise SystemExit(f"--resume: optimizer state missing in {ckpt_dir} step {steps[-1]}")
        optimizer.load_shard_state_dicts(optim_shards)
        loop = meta["loop_state"]
        print0(f"Resumed from {ckpt_dir} step {loop['step']}")
    use_compile = args.compile == "on" or (args.compile == "auto" and (
        rt.device_type == "cuda" or (rt.device_type == "cpu" and shutil.which(os.environ.get("CXX", "g++")))))
    if use_compile:
        model.compile_for_training()
    print0(f"torch.compile: {'on' if use_compile else 'off'}")

    from nanochat.dataloader import DataLoader, eval_batches
    loader = DataLoader(tokenizer, args.device_batch_size, T, "train", rows_per_step=B // T, rank=rt.rank,
                        world_size=rt.world_size, device=rt.device, resume_states=loader_states)
    peak, peak_reason = get_peak_flops(rt.device_type, rt.dtype)
    print0(f"MFU reference: {peak_reason}")
    wandb = init_wandb(args.run, "nanochat", {**vars(args), **{k: v for k, v in plan.items() if k != 'num_params'}})

    def checkpoint(step):
        meta = {"model_config": config.to_dict(), "train_args": vars(args), "tokenizer_fingerprint": tokenizer.fingerprint,
                "total_batch_size": B, "num_iterations": N, "dtype": str(rt.dtype), "git": git_info(),
                "loop_state": {**loop, "step": step}}
        save_checkpoint(ckpt_dir, step, meta, model_state=model.state_dict() if master else None,
                        optim_state=optimizer.shard_state_dict(), loader_state=loader.state_dict(),
                        rank=rt.rank, world_size=rt.world_size, keep_last=args.keep_checkpoints or None)
        print0(f"Saved checkpoint {ckpt_dir} step {step}")

    def evaluate(step):
        model.eval()
        eval_rows = args.device_batch_size * rt.world_size
        steps = max(1, args.eval_tokens // (eval_rows * T))
        from nanochat.loss_eval import evaluate_bpb
        bpb = evaluate_bpb(model, eval_batches(tokenizer, args.device_batch_size, T, "val", steps, rt.rank,
                                               rt.world_size, rt.device), token_bytes)
        model.train()
        loop["val_bpb_history"].append([step, bpb])
        loop["min_val_bpb"] = min(loop["min_val_bpb"], bpb)
        print0(f"Step {step:05d} | validation bpb {bpb:.4f}")
        wandb.log({"step": step, "val/bpb": bpb})
        return bpb

    def sample():
        if not master:
            return
        model.eval()
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            out = list(model.generate(ids, max_tokens=16, temperature=0))
            print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")
        model.train()

    stop = GracefulStop().install()  # Ctrl-C / SIGTERM: finish the step, save, exit 130
    step = loop["step"]
    steps_this_run = 0
    state_bytes = None
    smooth = None
    t_start = time.time()
    model.train()
    try:
        while True:
            stop.check()
            last = step == N
            stop_early = args.max_steps_this_run > 0 and steps_this_run >= args.max_steps_this_run
            # Checkpoint first, so a crash in evaluation never loses the trained weights.
            if steps_this_run > 0 and (last or stop_early or (args.save_every > 0 and step % args.save_every == 0)):
                checkpoint(step)
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                evaluate(step)
            if master and (last or (args.sample_every > 0 and step % args.sample_every == 0 and step > 0)):
                sample()
            if last or stop_early:
                break
            # One optimizer step: grad_accum micro-batches per rank, averaged.
            t0 = time.time()
            lrm = lr_multiplier(step, N, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(step)
                    group["weight_decay"] = plan["weight_decay"] * 0.5 * (1 + math.cos(math.pi * step / N))
            loss_sum = torch.zeros((), device=rt.device)
            for _ in range(grad_accum):
                x, y = next(loader)
                loss = model(x, y)
                (loss / grad_accum).backward()
                loss_sum += loss.detach()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            train_loss = loss_sum / grad_accum
            if rt.ddp:
                dist.all_reduce(train_loss)
                train_loss /= rt.world_size
            train_loss = train_loss.item()  # also synchronises the device, so dt is honest
            if not math.isfinite(train_loss):
                raise SystemExit(f"loss became {train_loss} at step {step}: lower the learning rates, or check the data")
            dt = time.time() - t0
            step += 1
            steps_this_run += 1
            if step > 10:  # the first steps include compilation and warm-up (leaderboard convention)
                loop["total_training_time"] += dt
            loop["losses"].append(train_loss)
            smooth = train_loss if smooth is None else 0.9 * smooth + 0.1 * train_loss
            tok_per_sec = B / dt  # the whole step's tokens, not one micro-batch's (upstream bug #13)
            mfu = plan["flops_per_token"] * tok_per_sec / (peak * rt.world_size)
            loop["last_tok_per_sec"], loop["last_mfu"] = tok_per_sec, mfu
            print0(f"step {step:05d}/{N:05d} ({100 * step / N:.1f}%) | loss {train_loss:.4f} | lrm {lrm:.3f} | "
                   f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {100 * mfu:.1f}% | epoch {loader.epoch():.2f} | "
                   f"time {loop['total_training_time'] / 60:.2f}m")
            if step % 100 == 0 or step == N:
                wandb.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/dt": dt,
                           "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
            if step == 1:
                gc.collect()
                gc.freeze()  # the long-lived objects are allocated now; Python's GC pauses cost ~0.5 s each
            if steps_this_run == 1:  # the optimizer state exists from the first step on
                state_bytes = optimizer_state_bytes(optimizer, rt)
                print0(f"Optimizer state bytes per rank: {', '.join(f'{b:,}' for b in state_bytes)} "
                       f"({rt.world_size} rank(s), {sum(state_bytes):,} in total)")
    except KeyboardInterrupt as e:
        stop.exit(e, rt, step, steps_this_run, lambda: checkpoint(step))
    finally:
        stop.restore()

    timed_steps = max(0, step - 10)
    tok_per_sec = B * timed_steps / loop["total_training_time"] if loop["total_training_time"] > 0 else loop.get("last_tok_per_sec", 0.0)
    mfu = plan["flops_per_token"] * tok_per_sec / (peak * rt.world_size)
    if step == N:
        peak_mem = torch.cuda.max_memory_allocated() if rt.device_type == "cuda" else None
        report = {
            "depth": args.depth, "model_tag": model_tag, "model_config": config.to_dict(),
            "num_params": plan["num_params"]["total"], "num_params_by_group": plan["num_params"],
            "flops_per_token": plan["flops_per_token"], "total_batch_size": B, "device_batch_size": args.device_batch_size,
            "world_size": rt.world_size, "step": step, "num_iterations": N, "tokens": B * N,
            "val_bpb": loop["val_bpb_history"][-1][1] if loop["val_bpb_history"] else None,
            "min_val_bpb": loop["min_val_bpb"], "tok_per_sec": tok_per_sec, "mfu": mfu, "mfu_reference": peak_reason,
            "total_training_time": loop["total_training_time"], "total_training_flops": plan["flops_per_token"] * B * N,
            "wall_time": time.time() - t_start, "dtype": str(rt.dtype).removeprefix("torch."), "device": rt.device_type,
            "compile": use_compile, "peak_memory_bytes": peak_mem, "optimizer_state_bytes_per_rank": state_bytes,
            "args": vars(args),
            "losses": loop["losses"], "val_bpb_history": loop["val_bpb_history"],
        }
        path = write_report_json("base_train", report)
        print0(f"Done: val bpb {report['val_bpb']:.4f}, {tok_per_sec:,.0f} tok/s, MFU {100 * mfu:.1f}%, "
               f"training time {loop['total_training_time'] / 60:.2f} min. Report: {path}")
    wandb.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
