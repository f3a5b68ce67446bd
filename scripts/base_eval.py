"""Evaluate a base model: the CORE metric (nanochat/core_eval.py), bits per byte on the train and val shards,
and a few greedy and sampled completions. Writes base_eval/base_model_<step>.csv (Task, Accuracy, Centered,
CORE) and report/base_eval.json under the base dir.

    python -m scripts.base_eval                                   # everything, full CORE
    python -m scripts.base_eval --eval core --max-per-task 100    # quick CORE estimate
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --device-batch-size 16

The CORE bundle: --bundle-dir, else $NANOCHAT_LOCAL_DATA/eval_core, else downloaded once into the base dir
before any evaluation starts. Tasks without data are named and left out (the output says how many of 22 count).
"""

import os
import time
import argparse

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, write_report_json, run_cli, UserError
from nanochat.checkpoint import load_model, resolve_checkpoint
from nanochat.training import print_samples
from nanochat.engine import prepare_for_inference
from nanochat import core_eval

EVALS = ("core", "bpb", "sample")
# bpb tokens per split. A GPU reads 40 of upstream's 2^19-token batches in seconds; a CPU forwards a d4 at
# ~20K tok/s, so the GPU figure would take over half an hour there, for a bpb that 2^20 tokens already pins
# to ~0.01.
GPU_SPLIT_TOKENS = 40 * 524288
CPU_SPLIT_TOKENS = 2 * 524288


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", type=str, default="core,bpb,sample", help="comma list of: core, bpb, sample (default all)")
    p.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE: at most this many items per task (-1 = all)")
    p.add_argument("--tasks", type=str, default="", help="CORE: comma list of task labels (default: all in core.yaml)")
    p.add_argument("--bundle-dir", type=str, default=None,
                   help="CORE: an unzipped eval bundle (default $NANOCHAT_LOCAL_DATA/eval_core, else download)")
    p.add_argument("--show-prompts", action="store_true", help="CORE: print the first item's prompts per task type")
    p.add_argument("--device-batch-size", type=int, default=32, help="bpb: rows per forward pass")
    p.add_argument("--split-tokens", type=int, default=None,
                   help=f"bpb: tokens per split, rounded down to whole batches (default {GPU_SPLIT_TOKENS:,} "
                        f"on a GPU, {CPU_SPLIT_TOKENS:,} elsewhere)")
    p.add_argument("--num-unconditioned", type=int, default=8, help="sample: 128-token samples drawn from BOS alone")
    p.add_argument("--device-type", type=str, default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    if not args.evals or any(e not in EVALS for e in args.evals):
        p.error(f"--eval {args.eval!r}: choose from {', '.join(EVALS)} (comma-separated)")
    if args.max_per_task == 0 or args.max_per_task < -1:
        p.error(f"--max-per-task {args.max_per_task}: use a positive number, or -1 for all items")
    if args.device_batch_size < 1 or (args.split_tokens is not None and args.split_tokens < 1):
        p.error("--device-batch-size and --split-tokens must be positive")
    return args


def show_prompts(tokenizer, tasks, model):
    """Print every prompt of the first item of the first task of each type, with its scored span."""
    seen = set()
    for task in tasks:
        if task.path is None or task.task_type in seen:
            continue
        seen.add(task.task_type)
        data = core_eval.load_task_data(task.path)
        fewshot = [data[j] for j in core_eval.fewshot_indices(0, len(data), task.num_fewshot)]
        prompts = core_eval.render_prompts(task.task_type, data[0], fewshot, task.delimiter)
        rows, spans = core_eval.tokenize_prompts(tokenizer, task.task_type, prompts)
        print0(f"\n=== {task.label} ({task.task_type}, {task.num_fewshot}-shot, delimiter {task.delimiter!r}) ===")
        for k, prompt in enumerate(prompts):
            print0(f"--- prompt {k + 1}/{len(prompts)} ---\n{prompt}")
        for row, (s, e) in zip(rows, spans):
            print0(f"--- scored tokens [{s}:{e}] of {len(row)} (context {model.config.sequence_len}): "
                   f"{tokenizer.decode(row[s:e])!r}")


def run_core(model, tokenizer, rt, args, bundle_dir):
    tasks = core_eval.load_tasks(bundle_dir)
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [w for w in wanted if w not in {t.label for t in tasks}]
        if unknown:
            raise UserError(f"--tasks: unknown task(s) {unknown}; core.yaml has {', '.join(t.label for t in tasks)}")
        tasks = [t for t in tasks if t.label in wanted]
    no_data = [t.label for t in tasks if t.path is None]
    if no_data:
        print0(f"CORE: no data for {len(no_data)} task(s), left out of the mean: {', '.join(no_data)}")
    if args.show_prompts:
        show_prompts(tokenizer, tasks, model)
    s = core_eval.evaluate_core(model, tokenizer, tasks, rt.device, args.max_per_task, rt.rank, rt.world_size)
    print0(f"CORE {s['core']:.4f} over {s['tasks_used']} of {s['tasks_total']} tasks"
           + (f" (missing: {', '.join(s['missing'])})" if s["missing"] else ""))
    return s


def run_bpb(model, tokenizer, rt, args):
    from nanochat.dataloader import eval_batches
    from nanochat.loss_eval import evaluate_bpb
    B, T, W = args.device_batch_size, model.config.sequence_len, rt.world_size
    if args.split_tokens is None:
        args.split_tokens = GPU_SPLIT_TOKENS if rt.device_type == "cuda" else CPU_SPLIT_TOKENS
    steps = args.split_tokens // (B * T * W)
    if steps < 1:
        raise UserError(f"--split-tokens {args.split_tokens} is less than one batch ({B} x {T} x {W} rank(s) = "
                        f"{B * T * W} tokens): raise it or lower --device-batch-size")
    token_bytes = tokenizer.token_bytes().to(rt.device)
    out = {"bpb_tokens_per_split": steps * B * T * W}
    for split in ("train", "val"):
        batches = eval_batches(tokenizer, B, T, split, steps, rt.rank, W, rt.device)
        out[f"{split}_bpb"] = bpb = evaluate_bpb(model, batches, token_bytes)
        print0(f"{split} bpb: {bpb:.4f} ({steps * B * T * W:,} tokens)")
    return out


def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    rt = compute_init(args.device_type)
    # The bundle before any eval, so that one process per machine fetches it.
    bundle_dir = core_eval.ensure_bundle(args.bundle_dir) if "core" in args.evals else None
    ckpt_dir, step = resolve_checkpoint("base", args.model_tag, args.step)
    model_tag = os.path.basename(ckpt_dir)
    model, tokenizer, meta = load_model("base", rt.device, phase="eval", model_tag=model_tag, step=step,
                                        compute_dtype=rt.dtype)
    prepare_for_inference(model)  # weights in the compute dtype once, rather than cast on every forward
    dtype = str(rt.dtype).removeprefix("torch.")
    print0(f"Compute dtype {dtype} ({rt.dtype_reason}); {rt.world_size} rank(s)")
    report = {"model_tag": model_tag, "step": step, "device": rt.device_type, "dtype": dtype,
              "world_size": rt.world_size, "args": vars(args)}
    if "core" in args.evals:
        t0 = time.time()
        summary = run_core(model, tokenizer, rt, args, bundle_dir)
        csv_path = os.path.join(get_base_dir(), "base_eval", f"base_model_{step:06d}.csv")
        if rt.master:
            core_eval.write_results_csv(csv_path, summary)
            print0(f"Wrote {csv_path}")
        report.update({k if k == "core" else f"core_{k}": v for k, v in summary.items()},
                      max_per_task=args.max_per_task, bundle_dir=bundle_dir, core_time=time.time() - t0)
        write_report_json("base_eval", report)  # now, so that a later part that is killed cannot lose it
    if "bpb" in args.evals:
        report.update(run_bpb(model, tokenizer, rt, args))
        write_report_json("base_eval", report)
    if "sample" in args.evals and rt.master:  # greedy completions of the standard prompts, then unconditioned
        report["samples"], report["unconditioned_samples"] = print_samples(model, tokenizer), []
        for k in range(args.num_unconditioned):
            out = model.generate([tokenizer.get_bos_token_id()], max_tokens=128, temperature=1.0, seed=42 + k)
            report["unconditioned_samples"].append(tokenizer.decode(list(out)))
            print0(f"  [unconditioned {k + 1}] {report['unconditioned_samples'][-1]!r}")
    report["wall_time"] = time.time() - t_start
    print0(f"Report: {write_report_json('base_eval', report)} (wall time {report['wall_time']:.1f}s)")
    compute_cleanup()
    return report


if __name__ == "__main__":
    run_cli(main)
