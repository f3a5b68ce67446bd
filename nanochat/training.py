"""
What every training stage (base_train, mid_train/chat_sft, chat_rl) shares, so that each script keeps
only what is its own (data, loss, what to log): the starting point (a fresh model, the parent stage's
checkpoint, or our own latest one to resume), whether to torch.compile, the per-step schedule, and the
step loop with its checkpoint / evaluation / Ctrl-C order.
"""

import os
import gc
import math
import time
import shutil
import signal
import argparse
import threading

import torch.distributed as dist

from nanochat.common import UserError, print0, git_info, compute_init, compute_cleanup, write_report_json
from nanochat.scaling import scaled_lrs
from nanochat.checkpoint import (save_checkpoint, load_checkpoint, resolve_checkpoint, check_tokenizer, stage_dir,
                                 model_from_state, list_steps)

# Flags that only steer one invocation; on --resume everything else is restored from the checkpoint.
RUN_CONTROL = ("resume", "max_steps_this_run", "save_every", "keep_checkpoints", "eval_every", "device_type", "run",
               "compile")


class TrainingError(UserError, RuntimeError):
    pass


def add_run_flags(g, save_every=-1, compile_flag=True):
    """The flags of one invocation that every stage has: checkpoints, logging, device, compile."""
    g.add_argument("--save-every", type=int, default=save_every, help=f"steps between checkpoints (-1 = only at the end) (default {save_every})")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep this many most recent checkpoints (0 = keep all)")
    g.add_argument("--max-steps-this-run", type=int, default=-1, help="stop (with a checkpoint) after this many steps in this invocation; the schedule still targets the full horizon (for testing resume)")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name; 'dummy' (default) disables wandb")
    g.add_argument("--device-type", type=str, default="", help="cuda, mps or cpu (default: autodetect)")
    if compile_flag:
        g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the model: auto = on for CUDA and for CPUs with a C++ compiler (SFT rows are then padded to one length)")


def add_start_flags(g, sources, resume_help):
    """Where a finetuning stage (mid, SFT, RL) starts from."""
    g.add_argument("--source", choices=sources, default=sources[0], help=f"stage of the checkpoint to start from (default {sources[0]})")
    g.add_argument("--model-tag", type=str, default=None, help="tag of the starting checkpoint (required when several exist); also names the output unless --output-tag")
    g.add_argument("--model-step", type=int, default=None, help="step of the starting checkpoint (default: its latest)")
    g.add_argument("--output-tag", type=str, default=None, help="checkpoint directory name for this run (default: the starting checkpoint's tag)")
    g.add_argument("--resume", action="store_true", help=resume_help)


def use_compile(choice, device_type):
    """--compile auto: on for CUDA, and on a CPU where inductor has a C++ compiler to build kernels with."""
    return choice == "on" or (choice == "auto" and (
        device_type == "cuda" or (device_type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is not None)))


def all_reduce_sum(t, rt):
    if rt.ddp:
        dist.all_reduce(t)
    return t


def lr_multiplier(step, num_steps, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup over warmup_steps, flat, then linear decay to final_lr_frac over the last
    warmdown_ratio of the run. step counts completed optimizer steps (0 = the first step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown = round(warmdown_ratio * num_steps)
    start = num_steps - warmdown
    if warmdown <= 0 or step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / warmdown)
    return 1.0 - progress * (1.0 - final_lr_frac)


def muon_momentum(step, warmup=300, start=0.85, end=0.95):
    """Muon momentum ramps up over the first steps: low momentum while gradients change fastest."""
    return start + (end - start) * min(1.0, step / warmup)


def set_schedule(optimizer, lrm, momentum=None, weight_decay=None):
    """This step's LR multiplier, Muon momentum and Muon weight decay, on every param group."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay


def check_loss(loss, step):
    if loss is not None and not math.isfinite(loss):
        raise TrainingError(f"loss became {loss} at step {step}: lower the learning rates, or check the data")


# Starting point

class Start(argparse.Namespace):
    """model, meta, optim_shards, loader_states, args, parent, ckpt_dir, where."""

def resume_latest(ckpt_dir, tokenizer, rt, need_loader=True):
    """Our own latest complete checkpoint in ckpt_dir, with optimizer (and loader) state: a Start."""
    steps = list_steps(ckpt_dir)
    if not steps:
        raise TrainingError(f"--resume: no complete checkpoint in {ckpt_dir}")
    state, meta, optim_shards, loader_states = load_checkpoint(ckpt_dir, steps[-1], load_optimizer=True,
                                                               load_loader=need_loader)
    where = f"our own checkpoint {ckpt_dir} step {steps[-1]}"
    if optim_shards is None or (need_loader and loader_states is None):
        raise TrainingError(f"--resume: {ckpt_dir} step {steps[-1]} lacks optimizer or loader state")
    check_tokenizer(meta, tokenizer, where)
    return Start(model=model_from_state(state, meta, rt.device, rt.dtype), meta=meta, optim_shards=optim_shards,
                 loader_states=loader_states, parent=meta.get("parent"), ckpt_dir=ckpt_dir, where=where)


def start_finetune(stage, args, tokenizer, rt, load_optimizer=True, need_loader=True):
    """A finetuning stage's start: with --resume our own latest checkpoint of the tag, whose saved
    settings come back (flags newer than the checkpoint keep their defaults; RUN_CONTROL flags are this
    invocation's); else the --source stage's checkpoint. Returns a Start whose args are the run's."""
    if args.resume:
        s = resume_latest(resolve_checkpoint(stage, args.output_tag or args.model_tag)[0], tokenizer, rt, need_loader)
        s.args = argparse.Namespace(**{**vars(args), **s.meta["train_args"],
                                       **{k: getattr(args, k) for k in RUN_CONTROL if hasattr(args, k)}})
    else:
        pdir, pstep = resolve_checkpoint(args.source, args.model_tag, args.model_step)
        state, meta, optim_shards, _ = load_checkpoint(pdir, pstep, load_optimizer=load_optimizer)
        where = f"{args.source} checkpoint {pdir} step {pstep}"
        check_tokenizer(meta, tokenizer, where)
        parent = {"source": args.source, "tag": os.path.basename(pdir), "step": pstep, "dir": pdir}
        args.output_tag = args.output_tag or parent["tag"]
        s = Start(model=model_from_state(state, meta, rt.device, rt.dtype), meta=meta, optim_shards=optim_shards,
                  loader_states=None, parent=parent, ckpt_dir=os.path.join(stage_dir(stage), args.output_tag),
                  where=where, args=args)
    print0(f"Starting from {s.where}; writing to {s.ckpt_dir}")
    return s


def begin(args):
    """(runtime, tokenizer, start time) of a training stage, with the device line in the log."""
    from nanochat.tokenizer import get_tokenizer
    rt = compute_init(args.device_type, seed=args.seed)
    print0(f"Device: {rt.device} x {rt.world_size} rank(s); compute dtype {str(rt.dtype).removeprefix('torch.')} "
           f"({rt.dtype_reason})")
    return rt, get_tokenizer(), time.time()


def build_optimizer(model, args, rt, lr_factor, weight_decay, start=None, **kwargs):
    """MuonAdamW at each LR flag x lr_factor, with the moments of the starting checkpoint when it has them
    (the learning rates stay the ones just set)."""
    optimizer = model.setup_optimizer(**scaled_lrs(vars(args), lr_factor), weight_decay=weight_decay, rank=rt.rank,
                                      world_size=rt.world_size, **kwargs)
    if start is not None and start.optim_shards is not None:
        try:
            optimizer.load_shard_state_dicts(start.optim_shards)
        except (ValueError, KeyError) as e:
            raise TrainingError(f"cannot load the optimizer state of {start.where}: {e}") from None
        print0("Optimizer moments " + ("restored" if args.resume else "warm-started from the starting checkpoint"))
    return optimizer


def compile_model(model, args, rt):
    """torch.compile per --compile (see use_compile); returns whether it did."""
    compiled = use_compile(getattr(args, "compile", "off"), rt.device_type)
    if compiled:
        model.compile_for_training()
    print0(f"torch.compile: {'on' if compiled else 'off'}")
    return compiled


def save(ckpt_dir, step, meta, model, optimizer, rt, tokenizer, loop, args, loader_state=None):
    """A checkpoint of this step (collective under torchrun), with what every stage's meta holds."""
    meta = {"model_config": model.config.to_dict(), "train_args": vars(args), "tokenizer_fingerprint": tokenizer.fingerprint,
            "dtype": str(rt.dtype), "git": git_info(), **meta, "loop_state": {**loop, "step": step}}
    save_checkpoint(ckpt_dir, step, meta, model_state=model.state_dict() if rt.master else None,
                    optim_state=optimizer.shard_state_dict(), loader_state=loader_state, rank=rt.rank,
                    world_size=rt.world_size, keep_last=args.keep_checkpoints or None)
    print0(f"Saved checkpoint {ckpt_dir} step {step}")


# The step loop

class StopRequested(KeyboardInterrupt):
    """Raised by GracefulStop.check() at a step boundary: the state is a whole step, safe to save."""


class GracefulStop:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler pre-empting the job) only set a flag; the loop calls
    check() between steps, which raises StopRequested, so the checkpoint holds whole steps. Raising where
    the signal lands is not safe: between optimizer.step() and the step counter the checkpoint would be
    mislabelled, and inside a finalizer Python swallows it. A second Ctrl-C before the step ends stops at
    once, unsaved (for a loop stuck elsewhere); once check() fired, signals are ignored so that they
    cannot cut the save short (people press Ctrl-C twice)."""

    def __init__(self):
        self.requested = None  # the signal's name once one arrived
        self.stopping = False  # check() fired: the checkpoint is being written
        self._saved = {}

    def _say(self, text):
        if os.environ.get("RANK", "0") == "0":  # os.write: print() is not safe inside a signal handler
            os.write(2, f"\n{text}\n".encode())

    def _handle(self, signum, frame):
        if self.stopping:
            self._say("saving the checkpoint first; it will exit when done")
            return
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self._say(f"{self.requested}: stopping after this step (Ctrl-C again: stop at once, without saving)")

    def check(self):
        if self.requested is not None:
            self.stopping = True
            raise StopRequested(self.requested)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._saved.items():
            signal.signal(s, handler)


def run_loop(rt, args, step, is_last, train_step, save_step, evaluate):
    """The loop every stage runs, from `step` until is_last(step) or --max-steps-this-run. Each turn:
    checkpoint first (so a crash in evaluation never loses the trained weights), then evaluate(step,
    last), then stop, or train_step(step, steps_this_run) and count the step. Ctrl-C / SIGTERM finish the
    step, save it (one process; under torchrun the ranks may have stopped at different steps, so
    --resume continues from the last periodic checkpoint) and re-raise, which run_cli turns into exit
    130. Returns (step, whether the horizon was reached)."""
    steps_this_run = 0
    with GracefulStop() as stop:
        try:
            while True:
                stop.check()
                last = is_last(step)
                stop_early = args.max_steps_this_run > 0 and steps_this_run >= args.max_steps_this_run
                if steps_this_run > 0 and (last or stop_early or (args.save_every > 0 and step % args.save_every == 0)):
                    save_step(step)
                evaluate(step, last)
                if last or stop_early:
                    return step, last
                train_step(step, steps_this_run)
                step += 1
                steps_this_run += 1
                if step == 1:
                    gc.collect()
                    gc.freeze()  # the long-lived objects exist now; Python's GC pauses cost ~0.5 s each
        except KeyboardInterrupt as e:
            if isinstance(e, StopRequested) and not rt.ddp and steps_this_run > 0:
                print0(f"\n{e}: saving step {step} so --resume can continue from it")
                save_step(step)
            elif not rt.ddp and steps_this_run > 0:
                print0("\nInterrupted in the middle of a step: nothing saved; --resume continues from the last checkpoint")
            compute_cleanup(barrier=False)
            raise


def eval_due(history, step, last, every):
    """Evaluate at step 0, every `every` steps and at the end, once per step (not again just after a
    resume that saved right after evaluating)."""
    done = bool(history) and history[-1][0] == step
    return not done and (last or step == 0 or (every > 0 and step % every == 0))


def finish(stage, report, rt, t_start, use_compiled, args, wandb):
    """Every stage's end: the report with the fields all stages share, wandb closed, process group down."""
    path = write_report_json(stage, {**report, "world_size": rt.world_size, "wall_time": time.time() - t_start,
                                     "dtype": str(rt.dtype).removeprefix("torch."), "device": rt.device_type,
                                     "compile": bool(use_compiled), "args": vars(args)})
    close(wandb)
    return path


def close(wandb):
    """The end of every invocation, finished or stopped early."""
    wandb.finish()
    compute_cleanup()


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def print_samples(model, tokenizer, max_tokens=16):
    """Greedy continuations of SAMPLE_PROMPTS: what the model says, at a glance."""
    was_training = model.training
    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        text = tokenizer.decode(list(model.generate(ids, max_tokens=max_tokens, temperature=0)))
        out.append(prompt + text)
        print0(f"  {prompt!r} -> {text!r}")
    model.train(was_training)
    return out
