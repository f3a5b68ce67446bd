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
import math
import time
import argparse

import torch
import torch.distributed as dist

from nanochat.common import print0, get_peak_flops, init_wandb, run_cli, UserError
from nanochat.gpt import build_model
from nanochat.attention import fa3_available
from nanochat.scaling import (add_model_flags, add_lr_flags, check_model_flags, config_from_args, derive_plan,
                              describe_plan, micro_steps, estimate_memory, warn_memory, device_memory, dry_run)
from nanochat.training import (all_reduce_sum, lr_multiplier, muon_momentum, add_run_flags, set_schedule, check_loss, resume_latest,
                               save, run_loop, finish, close, print_samples, TrainingError, begin, build_optimizer,
                               compile_model)
from nanochat.checkpoint import stage_dir

# Validation tokens per evaluation. 20 of upstream's 2^19-token batches take seconds on a GPU; on a
# CPU (~20K tok/s forward at d4) they would take minutes at every --eval-every.
GPU_EVAL_TOKENS = 20 * 524288
CPU_EVAL_TOKENS = 524288


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p.add_argument_group("model (all derived from --depth unless given)"))
    g = p.add_argument_group("horizon (first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps")
    g.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs")
    g.add_argument("--target-param-data-ratio", type=float, default=12.0, help="tokens = ratio * (matrix params + lm_head) (default 12)")
    g = p.add_argument_group("optimization (learning rates are scaled by sqrt(batch / 2^19), at least 0.5)")
    g.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per device; lower it if you run out of memory (gradient accumulation keeps the result the same)")
    g.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step across all ranks; -1 = derived from depth (Power Lines, B ~ D^0.383)")
    add_lr_flags(g)
    g.add_argument("--weight-decay", type=float, default=0.28, help="Muon cautious weight decay at the reference size; scaled with batch and horizon, decayed to 0 over the run")
    g.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    g.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of the run over which LR decays linearly")
    g.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end as a fraction of the peak")
    g.add_argument("--ortho", choices=["polar", "ns"], default="polar", help="Muon orthogonalisation: Polar Express or Newton-Schulz")
    g.add_argument("--seed", type=int, default=42, help="random seed for initialisation")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=250, help="steps between val bits-per-byte evaluations (-1 = only at the end)")
    g.add_argument("--eval-tokens", type=int, default=None,
                   help=f"validation tokens per evaluation (default {GPU_EVAL_TOKENS:,} on a GPU, {CPU_EVAL_TOKENS:,} elsewhere)")
    g.add_argument("--sample-every", type=int, default=2000, help="steps between printing greedy samples (-1 = only at the end)")
    g.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint of --model-tag")
    g.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    add_run_flags(g)
    g = p.add_argument_group("plan only")
    g.add_argument("--dry-run", action="store_true", help="print the derived plan (params, tokens, steps, FLOPs, time and cost estimate) and exit")
    g.add_argument("--gpus", type=int, default=8, help="[dry run] number of GPUs for the estimate")
    g.add_argument("--gpu-type", type=str, default="H100", help="[dry run] GPU model, looked up in the peak-FLOPs table")
    g.add_argument("--mfu", type=float, default=0.45, help="[dry run] assumed model FLOPs utilisation")
    g.add_argument("--gpu-hour-price", type=float, default=3.0, help="[dry run] $ per GPU-hour")
    args = p.parse_args(argv)
    check_model_flags(p, args)
    if args.device_batch_size < 1:
        p.error(f"--device-batch-size {args.device_batch_size}: must be >= 1")
    return args


def optimizer_state_bytes(optimizer, rt):
    """Optimizer state bytes held by each rank (a collective under torchrun): ZeRO-2 sharding makes each
    rank's share about 1/world_size of the single-process total."""
    mine = torch.tensor([optimizer.state_bytes()], dtype=torch.long, device=rt.device)
    if not rt.ddp:
        return [int(mine.item())]
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def main(argv=None):
    args = get_args(argv)
    from nanochat.tokenizer import get_tokenizer, get_token_bytes
    if args.dry_run:
        try:
            vocab = get_tokenizer().get_vocab_size()
        except UserError:
            vocab = 32768  # no tokenizer yet: plan with the default vocabulary
        config = config_from_args(args, vocab, fa3=True)
        return dry_run(args, config, derive_plan(args, config))

    rt, tokenizer, t_start = begin(args)
    if args.eval_tokens is None:
        args.eval_tokens = GPU_EVAL_TOKENS if rt.device_type == "cuda" else CPU_EVAL_TOKENS
    token_bytes = get_token_bytes(rt.device)
    fa3 = fa3_available(rt.device_type)
    config = config_from_args(args, tokenizer.get_vocab_size(), fa3=fa3)
    if config.window_pattern != "L" and not fa3:
        print0(f"WARNING: window pattern {config.window_pattern} without FlashAttention-3: SDPA masks sliding windows explicitly, which is slow")
    plan = derive_plan(args, config)
    B, T, N = plan["total_batch_size"], args.max_seq_len, plan["num_iterations"]
    grad_accum = micro_steps(B, T, args.device_batch_size, rt.world_size)
    ckpt_dir = os.path.join(stage_dir("base"), args.model_tag or f"d{args.depth}")
    describe_plan(plan, config, args.device_batch_size, grad_accum)
    warn_memory(*estimate_memory(config, plan, args.device_batch_size, rt.dtype), device_memory(rt.device_type),
                B // T // rt.world_size)

    loop = {"step": 0, "losses": [], "val_bpb_history": [], "total_training_time": 0.0, "min_val_bpb": float("inf")}
    start = loader_states = None
    if args.resume:
        start = resume_latest(ckpt_dir, tokenizer, rt)
        meta = start.meta
        if meta["model_config"] != config.to_dict():
            raise TrainingError(f"--resume: the checkpoint's model config {meta['model_config']} differs from the one "
                                f"these flags give {config.to_dict()}; pass the same model flags")
        if meta.get("total_batch_size") != B or meta.get("num_iterations") != N:
            raise TrainingError(f"--resume: the checkpoint was trained with total batch {meta.get('total_batch_size')} "
                                f"and {meta.get('num_iterations')} steps, these flags give {B} and {N}; pass the same flags")
        model, loop, loader_states = start.model, meta["loop_state"], start.loader_states
        print0(f"Resumed from {ckpt_dir} step {loop['step']}")
    else:
        model = build_model(config, rt.device, rt.dtype)
    optimizer = build_optimizer(model, args, rt, plan["lr_scale"], plan["weight_decay"], start, ortho=args.ortho)
    compiled = compile_model(model, args, rt)

    from nanochat.dataloader import DataLoader, eval_batches
    loader = DataLoader(tokenizer, args.device_batch_size, T, "train", rows_per_step=B // T, rank=rt.rank,
                        world_size=rt.world_size, device=rt.device, resume_states=loader_states)
    peak, peak_reason = get_peak_flops(rt.device_type, rt.dtype)
    print0(f"MFU reference: {peak_reason}")
    wandb = init_wandb(args.run, "nanochat", {**vars(args), **{k: v for k, v in plan.items() if k != 'num_params'}})
    state_bytes = None

    def save_step(step):
        save(ckpt_dir, step, {"total_batch_size": B, "num_iterations": N}, model, optimizer, rt, tokenizer, loop, args, loader.state_dict())

    def evaluate(step, last):
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            from nanochat.loss_eval import evaluate_bpb
            model.eval()
            steps = max(1, args.eval_tokens // (args.device_batch_size * rt.world_size * T))
            bpb = evaluate_bpb(model, eval_batches(tokenizer, args.device_batch_size, T, "val", steps, rt.rank,
                                                   rt.world_size, rt.device), token_bytes)
            model.train()
            loop["val_bpb_history"].append([step, bpb])
            loop["min_val_bpb"] = min(loop["min_val_bpb"], bpb)
            print0(f"Step {step:05d} | validation bpb {bpb:.4f}")
            wandb.log({"step": step, "val/bpb": bpb})
        if rt.master and (last or (args.sample_every > 0 and step % args.sample_every == 0 and step > 0)):
            print_samples(model, tokenizer)

    def train_step(step, steps_this_run):
        nonlocal state_bytes
        t0 = time.time()
        lrm = lr_multiplier(step, N, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        set_schedule(optimizer, lrm, muon_momentum(step), plan["weight_decay"] * 0.5 * (1 + math.cos(math.pi * step / N)))
        loss_sum = torch.zeros((), device=rt.device)
        for _ in range(grad_accum):  # micro-batches per rank, averaged
            x, y = next(loader)
            loss = model(x, y)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        # .item() also synchronises the device, so dt is honest
        train_loss = all_reduce_sum(loss_sum / grad_accum, rt).item() / rt.world_size
        check_loss(train_loss, step)
        dt = time.time() - t0
        if step >= 10:  # the first steps include compilation and warm-up (leaderboard convention)
            loop["total_training_time"] += dt
        loop["losses"].append(train_loss)
        tok_per_sec = B / dt  # the whole step's tokens, not one micro-batch's
        mfu = plan["flops_per_token"] * tok_per_sec / (peak * rt.world_size)
        loop["last_tok_per_sec"], loop["last_mfu"] = tok_per_sec, mfu
        print0(f"step {step + 1:05d}/{N:05d} ({100 * (step + 1) / N:.1f}%) | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {100 * mfu:.1f}% | epoch {loader.epoch():.2f} | "
               f"time {loop['total_training_time'] / 60:.2f}m")
        if (step + 1) % 100 == 0 or step + 1 == N:
            wandb.log({"step": step + 1, "train/loss": train_loss, "train/lrm": lrm, "train/dt": dt,
                       "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        if steps_this_run == 0:  # the optimizer state exists from the first step on
            state_bytes = optimizer_state_bytes(optimizer, rt)
            print0(f"Optimizer state bytes per rank: {', '.join(f'{b:,}' for b in state_bytes)} "
                   f"({rt.world_size} rank(s), {sum(state_bytes):,} in total)")

    model.train()
    step, last = run_loop(rt, args, loop["step"], lambda s: s == N, train_step, save_step, evaluate)
    if not last:
        return close(wandb)
    timed = loop["total_training_time"]
    tok_per_sec = B * max(0, step - 10) / timed if timed > 0 else loop.get("last_tok_per_sec", 0.0)
    mfu = plan["flops_per_token"] * tok_per_sec / (peak * rt.world_size)
    val_bpb = loop["val_bpb_history"][-1][1] if loop["val_bpb_history"] else None
    path = finish("base_train", {
        "depth": args.depth, "model_tag": os.path.basename(ckpt_dir), "model_config": config.to_dict(),
        "num_params": plan["num_params"]["total"], "num_params_by_group": plan["num_params"],
        "flops_per_token": plan["flops_per_token"], "total_batch_size": B, "device_batch_size": args.device_batch_size,
        "step": step, "num_iterations": N, "tokens": B * N, "val_bpb": val_bpb, "min_val_bpb": loop["min_val_bpb"],
        "tok_per_sec": tok_per_sec, "mfu": mfu, "mfu_reference": peak_reason, "total_training_time": timed,
        "total_training_flops": plan["flops_per_token"] * B * N,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if rt.device_type == "cuda" else None,
        "optimizer_state_bytes_per_rank": state_bytes, "losses": loop["losses"],
        "val_bpb_history": loop["val_bpb_history"]}, rt, t_start, compiled, args, wandb)
    print0(f"Done: val bpb {val_bpb:.4f}, {tok_per_sec:,.0f} tok/s, MFU {100 * mfu:.1f}%, "
           f"training time {timed / 60:.2f} min. Report: {path}")


if __name__ == "__main__":
    run_cli(main)
