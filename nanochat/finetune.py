"""
The conversation-training stage that midtraining (packed rows) and SFT (one conversation per row, padded)
both run; they differ only in batching, mixture and defaults (STAGES). Loss on the assistant's tokens only.
Unset batch and LR settings are inherited from the parent checkpoint; LRs (the LR at a 2^19-token batch,
as in every stage) are scaled by batch_lr_scale of this run's batch and by --init-lr-frac. Each
micro-batch's summed cross-entropy is divided by the assistant targets of the whole step (all micro-batches,
all ranks): a micro-batch with few of them is not over-weighted, one with none adds exactly zero (never NaN).
"""

import time
import json
import argparse

import torch

from nanochat.common import print0, get_peak_flops, init_wandb, UserError
from nanochat.scaling import B_REF, add_lr_flags, batch_lr_scale, micro_steps, inherit_lrs
from nanochat.training import (lr_multiplier, muon_momentum, add_run_flags, add_start_flags, start_finetune,
                               set_schedule, check_loss, all_reduce_sum, save, run_loop, eval_due, finish, close,
                               begin, build_optimizer, compile_model)
from nanochat.chat_data import PackedBatcher, PaddedBatcher, new_stats, drop_overlong
from tasks.common import DataUnavailableError
from tasks.mixtures import build_mixtures, chat_eval_sets

# Each stage's defaults; report names follow the script names.
STAGES = {
    "mid": {"report": "mid_train", "sources": ("base",), "packed": True,
            "init_lr_frac": 1.0, "warmdown_ratio": 0.2, "eval_every": 150,
            "mmlu_epochs": 1, "arc_epochs": 1, "gsm8k_epochs": 1, "smoltalk_size": -1, "identity_size": 2000,
            "spelling_size": 80000, "wandb": "nanochat-mid"},
    "sft": {"report": "chat_sft", "sources": ("mid", "base"), "packed": False,
            "init_lr_frac": 0.8, "warmdown_ratio": 0.5, "eval_every": 100,
            "mmlu_epochs": 0, "arc_epochs": 1, "gsm8k_epochs": 1, "smoltalk_size": 10000, "identity_size": 1000,
            "spelling_size": 2000, "wandb": "nanochat-sft"},
}


def get_args(stage, argv=None, description=__doc__):
    d = STAGES[stage]
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("starting point")
    add_start_flags(g, d["sources"], "continue exactly from this stage's latest checkpoint of the tag (all other settings come from it)")
    g.add_argument("--load-optimizer", type=int, choices=[0, 1], default=1, help="1 = warm-start the optimizer's moments from the starting checkpoint when it has them (learning rates are reset)")
    g = p.add_argument_group("batch and horizon (unset = inherited from the starting checkpoint)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; -1 = one epoch of the mixture")
    g.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens; longer conversations are truncated after their last whole turn that fits (and counted)")
    g.add_argument("--overlong", choices=["truncate", "drop"], default="truncate", help="conversations whose first reply does not fit in a row: truncate them inside it (counted in the log), or drop them "
                   "from the mixture up front (counted; renders the whole mixture once) so that every reply trained on shows its end, which a short-context model needs to learn to stop")
    g.add_argument("--device-batch-size", type=int, default=None, help="rows per forward pass per device")
    g.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step across ranks (rows per step = this / max seq len)")
    g = p.add_argument_group("optimization (LRs are scaled by sqrt(batch / 2^19), at least 0.5, then by --init-lr-frac)")
    add_lr_flags(g, default=False, note="the starting checkpoint's")
    g.add_argument("--init-lr-frac", type=float, default=d["init_lr_frac"], help=f"every LR is multiplied by this (default {d['init_lr_frac']})")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (default 0 for finetuning)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the run spent warming the LR up")
    g.add_argument("--warmdown-ratio", type=float, default=d["warmdown_ratio"], help=f"fraction of the run over which the LR decays linearly (default {d['warmdown_ratio']})")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the start")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g = p.add_argument_group("mixture (tasks/mixtures.py)")
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
    add_run_flags(g)
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


def inherit(args, parent_meta):
    """Fill the unset batch/LR flags from the starting checkpoint's meta (base_train's or ours)."""
    pargs = parent_meta.get("train_args", {})
    if args.max_seq_len is None:
        args.max_seq_len = pargs.get("max_seq_len") or parent_meta["model_config"]["sequence_len"]
    if args.device_batch_size is None:
        args.device_batch_size = pargs.get("device_batch_size") or 32
    if args.total_batch_size is None:
        args.total_batch_size = parent_meta.get("total_batch_size") or B_REF
    inherit_lrs(args, parent_meta)
    return args


def lr_schedule(progress, args):
    """LR multiplier at a fraction `progress` in [0, 1) of the run: warmup, flat, linear warmdown to
    --final-lr-frac. lr_multiplier on a 1000-point grid, so it also serves runs whose length is
    one epoch of packed conversations (known only as a fraction, not in steps)."""
    grid = 1000
    return lr_multiplier(min(grid - 1, int(progress * grid)), grid, round(args.warmup_ratio * grid),
                         args.warmdown_ratio, args.final_lr_frac)


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


def chat_evals(model, tokenizer, rt, gen_sets, step, seed):
    """--chat-eval-examples: greedy replies through the Engine (the inference path) with the current
    weights: the turn-end rate on held-out prompts and SpellingBee letter counts (tasks/mixtures.py)."""
    from nanochat.engine import Engine
    from nanochat.task_eval import run_generative, turn_end_rate
    prompts, spelling = gen_sets
    model.eval()
    engine = Engine(model, tokenizer)
    t0 = time.time()
    ended, total = turn_end_rate(engine, tokenizer, rt, prompts)
    row = {"step": step, "turn_end": ended / max(1, total), "turn_end_prompts": total}
    msg = f"replies ending with <|assistant_end|> {ended}/{total} held-out chat prompts"
    if spelling is not None:
        greedy = argparse.Namespace(num_samples=1, max_new_tokens=model.config.sequence_len, temperature=0.0,
                                    top_k=None, seed=seed)
        passed, n, _ = run_generative(spelling, engine, tokenizer, rt, greedy, len(spelling), progress=False)
        row.update(spelling_count=passed / max(1, n), spelling_count_problems=n)
        msg += f" | SpellingBee letter count {passed}/{n} held-out words"
    model.train()
    print0(f"Step {step:05d} | {msg} ({time.time() - t0:.0f}s)")
    return row


def run(stage, argv=None, description=__doc__):
    S = STAGES[stage]
    args = get_args(stage, argv, description)
    rt, tokenizer, t_start = begin(args)
    start = start_finetune(stage, args, tokenizer, rt, load_optimizer=bool(args.load_optimizer))
    args = start.args if args.resume else inherit(start.args, start.meta)
    model, config, meta, parent, ckpt_dir = start.model, start.model.config, start.meta, start.parent, start.ckpt_dir
    T, b, R = args.max_seq_len, args.device_batch_size, args.total_batch_size // args.max_seq_len
    grad_accum = micro_steps(args.total_batch_size, T, b, rt.world_size)
    if T > config.sequence_len:
        print0(f"WARNING: --max-seq-len {T} is longer than the model's training context {config.sequence_len}")
    lr_scale = batch_lr_scale(args.total_batch_size)
    optimizer = build_optimizer(model, args, rt, lr_scale * args.init_lr_frac, args.weight_decay, start)
    loader_states = start.loader_states
    del start
    compiled = compile_model(model, args, rt)

    train_task, val_task, mixture = build_mixtures(args, tokenizer)
    if args.overlong == "drop":
        t0 = time.time()
        train_task, dropped = drop_overlong(train_task, tokenizer, T + 1)
        mixture["dropped_overlong"] = dropped
        print0(f"--overlong=drop: dropped {dropped:,} conversations whose first reply ends beyond {T + 1} tokens ({time.time() - t0:.0f}s)")
        if len(train_task) == 0:
            raise UserError(f"no conversation's first reply fits in --max-seq-len {T} + 1 tokens: raise it or use --overlong=truncate")
    print0(f"Mixture: {len(train_task):,} conversations: " + json.dumps(mixture))
    print0(f"Validation: {len(val_task):,} conversations")
    # Compiled kernels want one fixed shape; eager SFT pads only to each micro-batch's longest row.
    Batcher, extra = (PackedBatcher, {}) if S["packed"] else (PaddedBatcher, {"fixed_length": compiled})
    try:
        batcher = Batcher(train_task, tokenizer, b, T, R, rt.rank, rt.world_size, rt.device, resume_state=loader_states,
                          **extra)
    except ValueError as e:
        raise UserError(f"--resume: {e}") from None
    # Horizon: given, one epoch of rows (SFT: one conversation per row), or one epoch of packed
    # conversations (mid: the packing density is only known as we go, so progress is counted in them).
    N = args.num_iterations if args.num_iterations > 0 else (None if S["packed"] else max(1, len(train_task) // R))
    print0(f"Batch: {R} rows of up to {T} tokens per step ({args.total_batch_size:,} tokens), device batch {b}, "
           f"{grad_accum} micro-step(s); horizon: {f'{N:,} steps' if N else 'one epoch of the mixture'}")
    print0(f"LRs (x{lr_scale:.4f} batch scale x{args.init_lr_frac} init frac): embedding {args.embedding_lr}, "
           f"unembedding {args.unembedding_lr}, matrix {args.matrix_lr}, scalar {args.scalar_lr}")
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
            raise UserError(f"--chat-eval-examples: {e}") from None

    def progress(step):
        return step / N if N else loop["data"]["conversations"] / len(train_task)

    def save_step(step):
        save(ckpt_dir, step, {"stage": stage, "parent": parent, "total_batch_size": args.total_batch_size,
                              "num_iterations": N, "mixture": mixture},
             model, optimizer, rt, tokenizer, loop, args, batcher.state_dict())

    @torch.no_grad()
    def validation_loss():
        """Mean cross-entropy over the assistant tokens of the first validation conversations, one per
        row (for both stages, so mid and SFT losses compare), the same rows whatever the world size."""
        unit = b * rt.world_size
        rows = max(unit, min(max(1, args.eval_tokens // T), len(val_task)) // unit * unit)
        val = PaddedBatcher(val_task, tokenizer, b, T, rows, rt.rank, rt.world_size, rt.device)
        tot = torch.zeros(2, dtype=torch.float64, device=rt.device)
        for x, y in val.next_step()[0]:
            tot[0] += model(x, y, loss_reduction="sum").double()
            tot[1] += (y >= 0).sum()
        all_reduce_sum(tot, rt)
        return (tot[0] / tot[1].clamp(min=1)).item(), int(tot[1].item())

    def evaluate(step, last):
        if eval_due(loop["val_history"], step, last, args.eval_every):
            model.eval()
            loss, n = validation_loss()
            model.train()
            loop["val_history"].append([step, loss])
            print0(f"Step {step:05d} | validation loss {loss:.4f} over {n:,} assistant tokens")
            wandb.log({"step": step, "val/loss": loss})
        if gen_sets and (last or step == 0) and not (loop["chat_evals"] and loop["chat_evals"][-1]["step"] == step):
            loop["chat_evals"].append(chat_evals(model, tokenizer, rt, gen_sets, step, args.seed))

    def train_step(step, steps_this_run):
        t0 = time.time()
        batches, stats = batcher.next_step()
        counts = torch.tensor([sum(int((y >= 0).sum()) for _, y in batches), sum(x.numel() for x, _ in batches),
                               *stats.values()], dtype=torch.float64, device=rt.device)
        all_reduce_sum(counts, rt)
        n_valid = counts[0].item()
        lrm = lr_schedule(progress(step), args)
        set_schedule(optimizer, lrm, muon_momentum(step))
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
        check_loss(train_loss, step)
        dt = time.time() - t0
        if steps_this_run > 0:  # the first step of an invocation includes compilation and warm-up
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
        d = loop["data"]
        print0(f"step {step + 1:05d}{f'/{N:05d}' if N else ''} ({100 * progress(step + 1):.1f}%) | loss "
               f"{'skipped (no assistant tokens)' if train_loss is None else f'{train_loss:.4f}'} | lrm {lrm:.3f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {100 * mfu:.1f}% | truncated "
               f"{d['truncated']}/{d['conversations']} ({d['cut_mid_reply']} mid-reply) | "
               f"pad {100 * d['pad_tokens'] / max(1, d['row_tokens']):.0f}%")
        if (step + 1) % 10 == 0:
            wandb.log({"step": step + 1, "train/loss": train_loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec,
                       "train/mfu": mfu, "train/truncated": d["truncated"]})

    model.train()
    step, last = run_loop(rt, args, loop["step"], lambda s: s >= N if N else progress(s) >= 1.0, train_step,
                          save_step, evaluate)
    if not last:
        return close(wandb)
    d, ce, vh = loop["data"], loop["chat_evals"], loop["val_history"]
    timed = loop["total_training_time"]
    tok_per_sec = loop["timed_tokens"] / timed if timed > 0 else loop.get("last_tok_per_sec", 0.0)
    report = {
        "stage": stage, "model_tag": args.output_tag, "parent": parent, "model_config": config.to_dict(),
        "step": step, "num_iterations": N, "mixture": mixture, "train_conversations": len(train_task),
        "epochs": d["conversations"] / len(train_task), "rows_per_step": R, "max_seq_len": T, "tokens": loop["tokens"],
        "assistant_tokens": loop["valid_targets"], "conversations": d["conversations"],
        "truncated_conversations": d["truncated"], "cut_mid_reply_conversations": d["cut_mid_reply"],
        "padding_fraction": d["pad_tokens"] / max(1, d["row_tokens"]), "skipped_steps": loop["skipped_steps"],
        "val_loss": vh[-1][1] if vh else None, "initial_val_loss": vh[0][1] if vh else None,
        "turn_end_before": ce[0]["turn_end"] if ce else None, "turn_end_after": ce[-1]["turn_end"] if ce else None,
        "spelling_count_before": ce[0].get("spelling_count") if ce else None,
        "spelling_count_after": ce[-1].get("spelling_count") if ce else None, "chat_evals": ce,
        "tok_per_sec": tok_per_sec, "mfu": flops_per_token * tok_per_sec / (peak * rt.world_size),
        "mfu_reference": peak_reason, "total_training_time": timed, "losses": loop["losses"], "val_history": vh,
    }
    path = finish(S["report"], report, rt, t_start, compiled, args, wandb)
    print0(f"Done: val loss {report['initial_val_loss']:.4f} -> {report['val_loss']:.4f}, {d['truncated']} of "
           f"{d['conversations']} conversations truncated ({d['cut_mid_reply']} inside their first reply). Report: {path}")
    if len(ce) > 1:
        print0(f"Turn ends with <|assistant_end|>: {ce[0]['turn_end']:.1%} -> {ce[-1]['turn_end']:.1%}" +
               (f"; SpellingBee letter count: {ce[0]['spelling_count']:.1%} -> {ce[-1]['spelling_count']:.1%}"
                if "spelling_count" in ce[-1] else ""))

