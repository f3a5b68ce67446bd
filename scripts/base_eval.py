"""
Evaluate a base model: the CORE metric (nanochat/core_eval.py), bits per byte on the train and val
shards, and a few greedy and sampled completions.

    python -m scripts.base_eval                                   # everything, full CORE
    python -m scripts.base_eval --eval core --max-per-task 100    # quick CORE estimate
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --device-batch-size 16

The CORE eval bundle comes from --bundle-dir, else $NANOCHAT_LOCAL_DATA/eval_core, else it is
downloaded once into the base dir (before any evaluation starts). Tasks without data are named and
left out of CORE; the output says how many of the 22 were used.

Writes base_eval/base_model_<step>.csv (Task, Accuracy, Centered, CORE) and report/base_eval.json
under the base dir.
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


# bpb tokens per split. A GPU reads 40 of upstream's 2^19-token batches in seconds; a CPU forwards a
# d4 at ~20K tok/s, so the GPU figure would take over half an hour there, for a bpb that 2^20 tokens
# already pins to ~0.01.
GPU_SPLIT_TOKENS = 40 * 524288
CPU_SPLIT_TOKENS = 2 * 524288


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", type=str, default="core,bpb,sample", help="comma list of what to run: core, bpb, sample (default all three)")
    p.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE: evaluate at most this many items per task (-1 = all)")
    p.add_argument("--tasks", type=str, default="", help="CORE: comma list of task labels to run (default: every task in core.yaml)")
    p.add_argument("--bundle-dir", type=str, default=None, help="CORE: an unzipped eval bundle (default $NANOCHAT_LOCAL_DATA/eval_core, else download)")
    p.add_argument("--show-prompts", action="store_true", help="CORE: print the prompts of the first item of the first task of each type")
    p.add_argument("--device-batch-size", type=int, default=32, help="bpb: rows per forward pass")
    p.add_argument("--split-tokens", type=int, default=None,
                   help=f"bpb: tokens to evaluate per split, rounded down to whole batches (default {GPU_SPLIT_TOKENS:,} "
                        f"on a GPU, {CPU_SPLIT_TOKENS:,} elsewhere)")
    p.add_argument("--num-unconditioned", type=int, default=8, help="sample: how many 128-token samples to draw from BOS alone")
    p.add_argument("--device-type", type=str, default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    bad = [e for e in evals if e not in EVALS]
    if bad or not evals:
        p.error(f"--eval {args.eval!r}: choose from {', '.join(EVALS)} (comma-separated)")
    args.evals = evals
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
    summary = core_eval.evaluate_core(model, tokenizer, tasks, rt.device, args.max_per_task, rt.rank, rt.world_size)
    print0(f"CORE {summary['core']:.4f} over {summary['tasks_used']} of {summary['tasks_total']} tasks"
           + (f" (missing: {', '.join(summary['missing'])})" if summary["missing"] else ""))
    return summary


def run_bpb(model, tokenizer, rt, args):
    from nanochat.dataloader import eval_batches
    from nanochat.loss_eval import evaluate_bpb
    T = model.config.sequence_len
    B = args.device_batch_size
    if args.split_tokens is None:
        args.split_tokens = GPU_SPLIT_TOKENS if rt.device_type == "cuda" else CPU_SPLIT_TOKENS
    steps = args.split_tokens // (B * T * rt.world_size)
    if steps < 1:
        raise UserError(f"--split-tokens {args.split_tokens} is less than one batch ({B} x {T} x {rt.world_size} "
                         f"rank(s) = {B * T * rt.world_size} tokens): raise it or lower --device-batch-size")
    token_bytes = tokenizer.token_bytes().to(rt.device)
    out = {"bpb_tokens_per_split": steps * B * T * rt.world_size}
    for split in ("train", "val"):
        bpb = evaluate_bpb(model, eval_batches(tokenizer, B, T, split, steps, rt.rank, rt.world_size, rt.device), token_bytes)
        out[f"{split}_bpb"] = bpb
        print0(f"{split} bpb: {bpb:.4f} ({steps * B * T * rt.world_size:,} tokens)")
    return out


def run_samples(model, tokenizer, args):
    """Greedy completions of the standard prompts and a few unconditioned samples (rank 0 only)."""
    samples = print_samples(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    unconditioned = []
    for k in range(args.num_unconditioned):
        out = list(model.generate([bos], max_tokens=128, temperature=1.0, seed=42 + k))
        unconditioned.append(tokenizer.decode(out))
        print0(f"  [unconditioned {k + 1}] {unconditioned[-1]!r}")
    return {"samples": samples, "unconditioned_samples": unconditioned}


def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    rt = compute_init(args.device_type)
    bundle_dir = None
    if "core" in args.evals:
        bundle_dir = core_eval.ensure_bundle(args.bundle_dir)  # before any eval: one process per machine fetches
    ckpt_dir, step = resolve_checkpoint("base", args.model_tag, args.step)
    model_tag = os.path.basename(ckpt_dir)
    model, tokenizer, meta = load_model("base", rt.device, phase="eval", model_tag=model_tag, step=step,
                                        compute_dtype=rt.dtype)
    prepare_for_inference(model)  # weights in the compute dtype once, rather than cast on every forward
    print0(f"Compute dtype {str(rt.dtype).removeprefix('torch.')} ({rt.dtype_reason}); {rt.world_size} rank(s)")
    report = {"model_tag": model_tag, "step": step, "device": rt.device_type,
              "dtype": str(rt.dtype).removeprefix("torch."), "world_size": rt.world_size, "args": vars(args)}
    if "core" in args.evals:
        t0 = time.time()
        summary = run_core(model, tokenizer, rt, args, bundle_dir)
        csv_path = os.path.join(get_base_dir(), "base_eval", f"base_model_{step:06d}.csv")
        if rt.master:
            core_eval.write_results_csv(csv_path, summary)
            print0(f"Wrote {csv_path}")
        report.update(core=summary["core"], core_tasks_used=summary["tasks_used"], core_tasks_total=summary["tasks_total"],
                      core_missing=summary["missing"], core_accuracy=summary["accuracy"],
                      core_centered=summary["centered"], core_items=summary["items"], core_seconds=summary["seconds"],
                      max_per_task=args.max_per_task, bundle_dir=bundle_dir, core_time=time.time() - t0)
        write_report_json("base_eval", report)  # now, so that a later part that is killed cannot lose it
    if "bpb" in args.evals:
        report.update(run_bpb(model, tokenizer, rt, args))
        write_report_json("base_eval", report)
    if "sample" in args.evals and rt.master:
        report.update(run_samples(model, tokenizer, args))
    report["wall_time"] = time.time() - t_start
    path = write_report_json("base_eval", report)
    if path:
        print0(f"Report: {path} (wall time {report['wall_time']:.1f}s)")
    compute_cleanup()
    return report


if __name__ == "__main__":
    run_cli(main)
