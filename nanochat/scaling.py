"""
The recipe, the one dial: --depth -> model shape, batch size, learning-rate scale, horizon and weight
decay, with the default learning rates written once. Also the dry-run plan (cost before paying) and the
memory estimate. Every training stage reads its LRs with the same meaning: the LR at the reference
batch of 2^19 tokens, multiplied by batch_lr_scale of the batch it trains with.
"""

import json
import math

import torch

from nanochat.common import UserError, GPU_PEAK_BF16_FLOPS, print0
from nanochat.gpt import GPTConfig, GPT, chunk_rows

# Reference point for transferring batch size, LR and weight decay across sizes (upstream nanochat's
# d12 tuning): 2^19 tokens per step at d12 with the same tokens:params ratio.
B_REF = 2 ** 19
REF_DEPTH = 12
LR_SCALE_FLOOR = 0.5  # see batch_lr_scale
WD_CAP_FACTOR = 10  # derived Muon weight decay is capped at this multiple of --weight-decay
# AdamW LRs of embeddings, lm_head and residual scalars, Muon LR of the block matrices, at width 768
# and B_REF-token batches.
DEFAULT_LRS = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}
LR_HELP = {"embedding_lr": "AdamW LR of the token and value embeddings", "unembedding_lr": "AdamW LR of lm_head",
           "matrix_lr": "Muon LR of the block matrices", "scalar_lr": "AdamW LR of the residual scalars"}


def add_model_flags(g, depth=20, seq_len=2048):
    """The flags that shape a model from --depth (base_train, bench_train, bench_infer)."""
    g.add_argument("--depth", type=int, default=depth, help=f"number of transformer layers: the one dial (default {depth})")
    g.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio, rounded up to a multiple of the head dim (default 64)")
    g.add_argument("--head-dim", type=int, default=128, help="attention head size; width / head dim = number of heads (default 128)")
    g.add_argument("--max-seq-len", type=int, default=seq_len, help=f"context length in tokens (default {seq_len})")
    g.add_argument("--window-pattern", type=str, default="auto", help="per-layer attention windows tiled over layers, S = quarter context, L = full; 'auto' = SSSL with FlashAttention-3, else L (SDPA has no fast sliding window)")
    g.add_argument("--no-value-embeds", action="store_true", help="disable value embeddings (makes the model exportable as transformers' built-in nanochat type)")
    g.add_argument("--no-resid-scalars", action="store_true", help="disable the per-layer residual scalars (same reason)")


def add_lr_flags(g, default=True, note=""):
    """The four learning-rate flags, one meaning in every stage: the LR at a B_REF-token batch (the
    stage multiplies it by batch_lr_scale of its own batch). default=False: unset = inherited."""
    for k, v in DEFAULT_LRS.items():
        flag = "--" + k.replace("_", "-")
        g.add_argument(flag, type=float, default=v if default else None,
                       help=f"{LR_HELP[k]} at 2^19-token batches (default {v if default else note})")


def check_model_flags(p, args):
    problems = [msg for bad, msg in [(args.depth < 1, f"--depth {args.depth}: must be >= 1"),
                                     (args.max_seq_len < 8, f"--max-seq-len {args.max_seq_len}: must be >= 8"),
                                     (args.head_dim < 2 or args.head_dim % 2,
                                      f"--head-dim {args.head_dim}: must be an even number >= 2")] if bad]
    if problems:
        p.error("; ".join(problems))


def model_config(depth, vocab_size, aspect_ratio=64, head_dim=128, max_seq_len=2048, window_pattern="auto",
                 value_embeds=True, resid_scalars=True, fa3=False):
    """GPTConfig for a depth: width = depth * aspect ratio rounded up to whole heads."""
    width = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    pattern = window_pattern if window_pattern != "auto" else ("SSSL" if fa3 else "L")
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=width // head_dim,
                     n_kv_head=width // head_dim, n_embd=width, window_pattern=pattern,
                     value_embeds=value_embeds, resid_scalars=resid_scalars)


def config_from_args(args, vocab_size, fa3=False):
    return model_config(args.depth, vocab_size, args.aspect_ratio, args.head_dim, args.max_seq_len,
                        args.window_pattern, not getattr(args, "no_value_embeds", False),
                        not getattr(args, "no_resid_scalars", False), fa3)


def batch_lr_scale(B):
    """LR multiplier for a total batch of B tokens: AdamW's sqrt(B / 2^19) rule (applied to Muon too),
    but never below 0.5. The rule shrinks LRs 8x at the 8K-token batches of CPU runs, which trains far
    slower; measured with d4, 8,192-token batches, 150 steps (val bpb): scale 0.125 (the plain rule)
    2.014, 0.25 1.949, 0.5 1.916, 1.0 1.911. Batches of 2^17 tokens and more are unaffected."""
    return max(LR_SCALE_FLOOR, (B / B_REF) ** 0.5)


def scaled_lrs(lrs, factor):
    """setup_optimizer's keyword arguments: each of the four LRs times factor."""
    return {k: lrs[k] * factor for k in DEFAULT_LRS}


def inherit_lrs(args, parent_meta):
    """Unset LR flags (None) take the starting checkpoint's, else the defaults."""
    saved = parent_meta.get("train_args", {})
    for k, v in DEFAULT_LRS.items():
        if getattr(args, k) is None:
            setattr(args, k, saved.get(k) or v)


def micro_steps(B, T, b, world_size):
    """Gradient-accumulation steps for B tokens per step in rows of T tokens, b rows per device."""
    if B % T:
        raise UserError(f"--total-batch-size {B} is not a multiple of --max-seq-len {T}")
    rows = B // T
    if rows % (b * world_size):
        options = [d for d in range(1, rows // world_size + 1) if rows % (d * world_size) == 0]
        raise UserError(f"--total-batch-size {B} ({rows} rows of --max-seq-len {T}) does not divide into "
                        f"micro-batches of --device-batch-size {b} x {world_size} rank(s); device batch sizes "
                        f"that divide: {options}")
    return rows // (b * world_size)


def derive_plan(args, config):
    """Batch size, horizon, LR and weight-decay scaling, all from the model size."""
    with torch.device("meta"):
        model = GPT(config)
        n_ref = GPT(model_config(REF_DEPTH, config.vocab_size, args.aspect_ratio, 128, args.max_seq_len,
                                 args.window_pattern, not args.no_value_embeds,
                                 not args.no_resid_scalars)).num_params()["scaling"]
    n_scaling = model.num_params()["scaling"]
    flops_per_token = model.flops_per_token()
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 12.0
    D, D_ref = ratio * n_scaling, ratio * n_ref
    if args.total_batch_size > 0:
        B, batch_reason = args.total_batch_size, "given"
    else:
        # Power Lines (Bergsma et al. 2025): the best batch grows as D^0.383; round to a power of 2.
        B = 2 ** round(math.log2(B_REF * (D / D_ref) ** 0.383))
        batch_reason = f"auto: 2^19 * (D/D_ref)^0.383 with D/D_ref = {D / D_ref:.3f}"
    if args.num_iterations > 0:
        steps, horizon = args.num_iterations, "given --num-iterations"
    elif args.target_flops > 0:
        steps = max(1, round(args.target_flops / (flops_per_token * B)))
        horizon = f"--target-flops {args.target_flops:.3g}"
    else:
        steps, horizon = max(1, int(D // B)), f"tokens:params ratio {ratio}"
    lr_scale = batch_lr_scale(B)
    # Weight decay transfers so that the decay timescale 1 / (lr * lambda), in steps, stays the same
    # fraction of the run as at the reference (T_epoch rule): lambda = lambda_ref * (B/B_ref) / lr_scale
    # * (D_ref/D), i.e. lambda_ref * sqrt(B/B_ref) * D_ref/D where the sqrt LR rule applies.
    wd_uncapped = args.weight_decay * (B / B_REF) / lr_scale * (D_ref / (steps * B))
    # The rule extrapolates to absurd values (hundreds) for runs 10^4x smaller than the reference,
    # like the CPU demos, where the decay would wipe the weights out in a few steps. Beyond 10x the
    # reference value there is no evidence for it, so cap there (and say so in the plan).
    weight_decay = min(wd_uncapped, WD_CAP_FACTOR * args.weight_decay)
    return {"n_scaling": n_scaling, "flops_per_token": flops_per_token, "total_batch_size": B,
            "batch_reason": batch_reason, "num_iterations": steps, "horizon": horizon, "lr_scale": lr_scale,
            "weight_decay": weight_decay, "weight_decay_uncapped": wd_uncapped,
            "rows_per_step": B // args.max_seq_len, "tokens": steps * B, "total_flops": flops_per_token * steps * B,
            "num_params": model.num_params()}


def describe_plan(plan, config, device_batch_size, grad_accum=None):
    """The plan's lines, in a training log and a dry run."""
    B, N = plan["total_batch_size"], plan["num_iterations"]
    print0(f"Model: {json.dumps(config.to_dict())}")
    print0("Parameters: " + ", ".join(f"{k} {v:,}" for k, v in plan["num_params"].items()))
    print0(f"Total batch size: {B:,} tokens ({plan['batch_reason']}); device batch {device_batch_size} x "
           f"{config.sequence_len}" + (f", {grad_accum} micro-step(s) per step" if grad_accum else ""))
    print0(f"Horizon: {N:,} steps ({plan['horizon']}), {plan['tokens']:,} tokens, "
           f"{plan['tokens'] / plan['n_scaling']:.2f} tokens per scaling param; {plan['flops_per_token']:.3e} "
           f"FLOPs per token, {plan['total_flops']:.3e} FLOPs")
    capped = plan["weight_decay_uncapped"] > plan["weight_decay"]
    print0(f"LR scale {plan['lr_scale']:.4f} (sqrt(B/2^19), at least {LR_SCALE_FLOOR}); Muon weight decay "
           f"{plan['weight_decay']:.4f}" + (f" (capped at {WD_CAP_FACTOR}x --weight-decay; the transfer rule gave "
                                           f"{plan['weight_decay_uncapped']:.4g} for this short run)" if capped else ""))


def estimate_memory(config, plan, device_batch_size, dtype):
    """Rough peak bytes per device: fp32 weights + grads + optimizer state, compute-dtype weight copies,
    activations kept for backward, and one loss chunk. Calibrated against measured CPU peaks.
    Returns (total, static part, activation bytes per row)."""
    P = plan["num_params"]["total"]
    adam = P - plan["num_params"]["transformer_matrices"]
    bpe = torch.finfo(dtype).bits // 8
    static = 4 * P + 4 * P + 8 * adam + 4 * (P - adam) + bpe * P
    tokens = device_batch_size * config.sequence_len
    # Saved activations per token per layer, in units of n_embd compute-dtype values (q, k, v, attention
    # out, norms, residuals, and the 4x-wide MLP hidden twice), plus the fp32 embedding output.
    act = tokens * config.n_layer * 26 * config.n_embd * bpe + tokens * config.n_embd * 8
    loss_chunk = chunk_rows(config.vocab_size) * config.vocab_size * (4 * 3 + 2 * bpe)
    return static + act + loss_chunk, static, act / device_batch_size


def device_memory(device_type):
    """Bytes the device can hold: a GPU's total memory, or the host's available RAM."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info()[1]
    import psutil
    return psutil.virtual_memory().available


def warn_memory(need, static, per_row, have, rows_per_rank):
    """Print the estimate against what the device has, with a device batch that would fit."""
    print0(f"Estimated peak memory: {need / 2**30:.2f} GiB" + (f" of {have / 2**30:.1f} GiB available" if have else ""))
    if have and need > 0.9 * have:
        fit = int((0.9 * have - static) // per_row) if 0.9 * have > static else 0
        options = [d for d in range(1, min(fit, rows_per_rank) + 1) if rows_per_rank % d == 0]
        hint = f"--device-batch-size {options[-1]}" if options else "a smaller --depth or --max-seq-len"
        print0(f"WARNING: this will likely not fit in memory; try {hint}")


def dry_run(args, config, plan):
    """Print the plan with its time and cost on --gpus x --gpu-type at --mfu; returns it as a dict."""
    peak = dict(GPU_PEAK_BF16_FLOPS).get(args.gpu_type)
    if peak is None:
        peak = next((f for k, f in GPU_PEAK_BF16_FLOPS if k.lower() in args.gpu_type.lower()), None)
    if peak is None:
        raise UserError(f"--gpu-type {args.gpu_type!r} is not in the peak table; known: "
                        f"{', '.join(k for k, _ in GPU_PEAK_BF16_FLOPS)}")
    hours = plan["total_flops"] / (peak * args.gpus * args.mfu) / 3600
    out = {
        "depth": args.depth, "model_config": config.to_dict(),
        **{k: plan[k] for k in ("num_params", "flops_per_token", "total_batch_size", "batch_reason", "num_iterations",
                                "horizon", "tokens", "total_flops", "lr_scale", "weight_decay")},
        "scaling_params": plan["n_scaling"], "tokens_per_param": plan["tokens"] / plan["n_scaling"],
        "estimate": {"gpus": args.gpus, "gpu_type": args.gpu_type, "peak_flops_per_gpu": peak, "mfu": args.mfu,
                     "hours": hours, "cost_usd": hours * args.gpus * args.gpu_hour_price,
                     "gpu_hour_price": args.gpu_hour_price},
    }
    print(f"Plan for depth {args.depth}: width {config.n_embd}, {config.n_head} heads, seq {config.sequence_len}")
    describe_plan(plan, config, args.device_batch_size)
    print(f"On {args.gpus}x {args.gpu_type} at {args.mfu:.0%} MFU: {hours:.2f} h, ${out['estimate']['cost_usd']:,.0f} "
          f"at ${args.gpu_hour_price}/GPU-hour")
    print(json.dumps(out))
    return out
