"""Evaluate a chat model on the chat tasks, and ChatCORE once all six have a result (nanochat/task_eval.py).

    python -m scripts.chat_eval -i sft                          # all six tasks
    python -m scripts.chat_eval -i sft -a "GSM8K|HumanEval" -x 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Problems are strided across torchrun ranks and the counts summed. Task data: $NANOCHAT_LOCAL_DATA/eval_chat
when set, else the HuggingFace hub (see tasks/). Writes report/chat_eval_<source>.json under the base dir,
keeping an earlier run's results on the same checkpoint for tasks not evaluated now (run them one at a time).
"""

import os
import json
import time
import argparse

from nanochat.common import compute_init, compute_cleanup, print0, report_dir, write_report_json, run_cli, UserError
from nanochat.checkpoint import load_model, resolve_checkpoint, STAGE_DIRS
from nanochat.engine import Engine, prepare_for_inference
from nanochat.task_eval import TASKS, run_categorical, run_generative, chatcore
from tasks.common import DataUnavailableError


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", required=True, choices=list(STAGE_DIRS), help="checkpoint stage to evaluate")
    p.add_argument("-a", "--task", type=str, default="", help=f"tasks, | or , separated (default: {', '.join(TASKS)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="generative: sampling temperature (0 = greedy)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=512, help="generative: token budget per reply")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="generative: replies per problem, pass if any does")
    p.add_argument("-k", "--top-k", type=int, default=50, help="generative: sample among the top k tokens (0 = all)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="categorical: problems per forward pass")
    p.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag (default: the only one there)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="problems per task at most (default: all)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (problem i uses seed + i)")
    p.add_argument("--device-type", type=str, default="", help="cuda, mps or cpu (default: autodetect)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    names = [t.strip() for t in args.task.replace("|", ",").split(",") if t.strip()] or list(TASKS)
    lookup = {n.lower(): n for n in TASKS}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        p.error(f"--task: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    args.tasks = [lookup[n.lower()] for n in names]
    if any(v is not None and v < 1 for v in (args.num_samples, args.batch_size, args.max_new_tokens, args.max_problems)):
        p.error("--num-samples, --batch-size, --max-new-tokens and --max-problems must be >= 1")
    if args.num_samples > 1 and args.temperature == 0:
        p.error("--num-samples > 1 with --temperature 0 would repeat the same greedy reply: set a temperature")
    return args


def previous_report(source, model_tag, step):
    """An earlier report of the same checkpoint (this run's per-task results are merged into it), or {}."""
    try:
        with open(os.path.join(report_dir(), f"chat_eval_{source}.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    return old if (old.get("model_tag"), old.get("step")) == (model_tag, step) else {}


def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    rt = compute_init(args.device_type, seed=args.seed)
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model_tag = os.path.basename(ckpt_dir)
    model, tokenizer, meta = load_model(args.source, rt.device, phase="eval", model_tag=model_tag, step=step,
                                        compute_dtype=rt.dtype)
    prepare_for_inference(model)  # weights in the compute dtype once, rather than cast on every forward
    engine, show, results = Engine(model, tokenizer), not args.no_progress, {}
    for name in args.tasks:
        make, baseline = TASKS[name]
        try:
            task = make()
        except DataUnavailableError as e:
            raise UserError(f"{name}: {e}") from None
        n = len(task) if args.max_problems is None else min(args.max_problems, len(task))
        t0 = time.time()
        if task.eval_type == "categorical":
            (passed, total), too_long = run_categorical(task, model, tokenizer, rt, args.batch_size, n, show, name), 0
        else:
            passed, total, too_long = run_generative(task, engine, tokenizer, rt, args, n, show, desc=name)
        acc = passed / total if total else float("nan")
        r = results[name] = {"accuracy": acc, "passed": passed, "total": total, "of": len(task),
                             "eval_type": task.eval_type, "baseline": baseline,
                             "centered": (acc - baseline) / (1 - baseline), "seconds": time.time() - t0}
        if too_long:
            r["prompt_too_long"] = too_long
        print0(f"{name:<14} {passed:>5}/{total:<5} = {100 * acc:6.2f}%  (centered {r['centered']:+.4f}, "
               f"{r['seconds']:.1f}s)" + (f"; {too_long} prompt(s) longer than the model's context counted as failed"
                                          if too_long else ""))
    old = previous_report(args.source, model_tag, step)
    merged = {**old.get("results", {}), **results}
    # Wall time of every run that contributed a kept result (tasks may be evaluated one run at a time).
    kept_old = any(name not in results for name in old.get("results", {}))
    wall_time = time.time() - t_start + (old.get("wall_time", 0.0) if kept_old else 0.0)
    score = chatcore(merged)
    print0(f"ChatCORE: {score:.4f}" if score is not None else
           f"ChatCORE needs all of {', '.join(TASKS)}; have {', '.join(n for n in TASKS if n in merged) or 'none'}")
    report = {"source": args.source, "model_tag": model_tag, "step": step, "results": merged,
              "evaluated_now": list(results), "chatcore": score, "device": rt.device_type,
              "dtype": str(rt.dtype).removeprefix("torch."), "world_size": rt.world_size,
              "args": vars(args), "wall_time": wall_time}
    print0(f"Report: {write_report_json(f'chat_eval_{args.source}', report)}")  # rank 0 writes and prints
    compute_cleanup()
    return report


if __name__ == "__main__":
    run_cli(main)
