"""
Evaluate a chat model on the chat tasks and compute ChatCORE.

    python -m scripts.chat_eval -i sft                          # all six tasks
    python -m scripts.chat_eval -i sft -a "GSM8K|HumanEval" -x 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Two kinds of task:
  categorical (ARC-Easy, ARC-Challenge, MMLU): one forward pass over the prompt (the conversation up
      to <|assistant_start|>); the answer is the allowed letter (the task's `letters`) with the
      highest logit at that last position. No sampling, so it measures knowledge, not formatting.
  generative (GSM8K, HumanEval, SpellingBee): the Engine writes a reply (with its python/calculator
      tool) and the task grades it (GSM8K/SpellingBee: the number after "####"; HumanEval: run the
      unit tests in the sandbox). With --num-samples k a problem passes if any sample does (pass@k).
ChatCORE = mean over the six tasks of the centered accuracy (acc - b) / (1 - b), with b = 0.25 for the
4-way multiple-choice tasks and 0 for the generative ones. It is reported when all six have a result.

Problems are strided across torchrun ranks and the counts summed. Task data: $NANOCHAT_LOCAL_DATA
(eval_chat/...) when set, else downloaded from the HuggingFace hub (see tasks/).

Writes report/chat_eval_<source>.json under the base dir. Results of an earlier run on the same
checkpoint are kept for tasks not evaluated this time, so tasks can be run one at a time.
"""

import os
import json
import time
import argparse

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, write_report_json
from nanochat.checkpoint import load_model, resolve_checkpoint, CheckpointError, STAGE_DIRS
from nanochat.engine import Engine, prepare_for_inference
from tasks.common import DataUnavailableError


def _arc_easy():
    from tasks.arc import ARC
    return ARC("ARC-Easy", "test")


def _arc_challenge():
    from tasks.arc import ARC
    return ARC("ARC-Challenge", "test")


def _mmlu():
    from tasks.mmlu import MMLU
    return MMLU("all", "test")


def _gsm8k():
    from tasks.gsm8k import GSM8K
    return GSM8K("main", "test")


def _humaneval():
    from tasks.humaneval import HumanEval
    return HumanEval()


def _spellingbee():
    from tasks.spellingbee import SpellingBee
    return SpellingBee(size=256, split="test")


# name -> (constructor, random-guess accuracy used for centering)
TASKS = {
    "ARC-Easy": (_arc_easy, 0.25),
    "ARC-Challenge": (_arc_challenge, 0.25),
    "MMLU": (_mmlu, 0.25),
    "GSM8K": (_gsm8k, 0.0),
    "HumanEval": (_humaneval, 0.0),
    "SpellingBee": (_spellingbee, 0.0),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", required=True, choices=list(STAGE_DIRS), help="which checkpoint stage to evaluate: base, mid, sft or rl")
    p.add_argument("-a", "--task", type=str, default="", help=f"tasks to run, separated by | or , (default all: {', '.join(TASKS)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="generative tasks: sampling temperature (0 = greedy)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=512, help="generative tasks: token budget per reply")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="generative tasks: replies per problem; a problem passes if any does")
    p.add_argument("-k", "--top-k", type=int, default=50, help="generative tasks: sample among the k most likely tokens (0 = all)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="categorical tasks: problems per forward pass")
    p.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag (default: the only one there)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems per task (default all)")
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
    if args.max_problems is not None and args.max_problems < 1:
        p.error(f"--max-problems {args.max_problems}: must be >= 1")
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--num-samples, --batch-size and --max-new-tokens must be >= 1")
    if args.num_samples > 1 and args.temperature == 0:
        p.error("--num-samples > 1 with --temperature 0 would repeat the same greedy reply: set a temperature")
    return args


def _progress(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _sum_across_ranks(passed, total, device):
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0]), int(counts[1])


def letter_token_ids(tokenizer, letters, cache):
    """Token id of each answer letter; each must be a single token (it is, for any BPE trained on text)."""
    out = []
    for letter in letters:
        if letter not in cache:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer; categorical "
                                 f"scoring needs single-token letters")
            cache[letter] = ids[0]
        out.append(cache[letter])
    return out


@torch.no_grad()
def run_categorical(task, model, tokenizer, rt, batch_size, num_problems, progress=True, desc=""):
    """Pick the allowed letter with the highest logit after <|assistant_start|>. Returns (passed, total)
    summed over ranks."""
    bos = tokenizer.get_bos_token_id()
    T = model.config.sequence_len
    cache = {}
    mine = list(range(rt.rank, num_problems, rt.world_size))
    passed = 0
    bar = _progress(len(mine), desc, progress and rt.master)
    for b0 in range(0, len(mine), batch_size):
        convs = [task[i] for i in mine[b0:b0 + batch_size]]
        # Long prompts keep their end: the answer is read at the last position.
        prompts = [tokenizer.render_for_completion(c)[-T:] for c in convs]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), bos, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        logits = model(ids.to(rt.device))
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            allowed = letter_token_ids(tokenizer, conv["letters"], cache)
            scores = logits[r, len(p) - 1, allowed]
            answer = conv["letters"][int(scores.argmax())]
            passed += bool(task.evaluate(conv, answer))
        bar.update(len(convs))
        bar.set_postfix(acc=f"{passed / max(1, min(b0 + batch_size, len(mine))):.3f}")
    bar.close()
    return _sum_across_ranks(passed, len(mine), rt.device)


def completion_text(tokenizer, tokens):
    """Decode a generated reply, stopping at the first <|assistant_end|> or <|bos|> if the engine
    left one in."""
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    for k, t in enumerate(tokens):
        if t in stops:
            tokens = tokens[:k]
            break
    return tokenizer.decode(tokens)


def run_generative(task, engine, tokenizer, rt, args, num_problems, progress=True, desc=""):
    """Generate num_samples replies per problem with the Engine; pass if any is correct. A prompt that
    leaves no room for a reply in the model's context counts as failed (and is counted). Returns
    (passed, total, too_long) summed over ranks."""
    limit = engine.model.config.sequence_len
    mine = list(range(rt.rank, num_problems, rt.world_size))
    passed = too_long = 0
    bar = _progress(len(mine), desc, progress and rt.master)
    for done, i in enumerate(mine, 1):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        if len(prompt) >= limit:
            too_long += 1
        else:
            sequences, _ = engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                                 temperature=args.temperature, top_k=args.top_k or None,
                                                 seed=args.seed + i)
            completions = [completion_text(tokenizer, list(seq[len(prompt):])) for seq in sequences]
            passed += any(task.evaluate(conv, c) for c in completions)
        bar.update(1)
        bar.set_postfix(acc=f"{passed / done:.3f}")
    bar.close()
    passed, total = _sum_across_ranks(passed, len(mine), rt.device)
    too_long, _ = _sum_across_ranks(too_long, 0, rt.device)
    return passed, total, too_long


def turn_end_rate(engine, tokenizer, rt, prompts, max_new_tokens=None, temperature=0.0, top_k=None, seed=42):
    """Does the model know when to stop? Of `prompts` (token ids ending with <|assistant_start|>), how
    many replies (greedy by default; prompt i sampled with seed + i) end with <|assistant_end|> before
    max_new_tokens or the context runs out (a <|bos|> is not a proper end). Prompts are strided across
    ranks; returns (ended, total) summed."""
    end = tokenizer.encode_special("<|assistant_end|>")
    mine = list(range(rt.rank, len(prompts), rt.world_size))
    ended = 0
    for i in mine:
        for column, _ in engine.generate(prompts[i], 1, max_tokens=max_new_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed + i):
            if column[0] == end:
                ended += 1
                break
    return _sum_across_ranks(ended, len(mine), rt.device)


def chatcore(results):
    """Mean centered accuracy over all six tasks, or None if any is missing."""
    if any(name not in results for name in TASKS):
        return None
    return sum(results[name]["centered"] for name in TASKS) / len(TASKS)


def previous_report(source, model_tag, step):
    """An earlier chat_eval report of the same checkpoint (its per-task results are merged with this
    run's), or {}."""
    path = os.path.join(get_base_dir(), "report", f"chat_eval_{source}.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    if old.get("model_tag") != model_tag or old.get("step") != step:
        return {}
    return old


def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    rt = compute_init(args.device_type, seed=args.seed)
    try:
        ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        model_tag = os.path.basename(ckpt_dir)
        model, tokenizer, meta = load_model(args.source, rt.device, phase="eval", model_tag=model_tag, step=step,
                                            compute_dtype=rt.dtype)
    except CheckpointError as e:
        raise SystemExit(str(e))
    prepare_for_inference(model)  # weights in the compute dtype once, rather than cast on every forward
    engine = Engine(model, tokenizer)
    results = {}
    for name in args.tasks:
        make, baseline = TASKS[name]
        try:
            task = make()
        except DataUnavailableError as e:
            raise SystemExit(f"{name}: {e}")
        n = len(task) if args.max_problems is None else min(args.max_problems, len(task))
        t0 = time.time()
        too_long = 0
        if task.eval_type == "categorical":
            passed, total = run_categorical(task, model, tokenizer, rt, args.batch_size, n,
                                            not args.no_progress, desc=name)
        else:
            passed, total, too_long = run_generative(task, engine, tokenizer, rt, args, n, not args.no_progress, desc=name)
        acc = passed / total if total else float("nan")
        results[name] = {"accuracy": acc, "passed": passed, "total": total, "of": len(task),
                         "eval_type": task.eval_type, "baseline": baseline,
                         "centered": (acc - baseline) / (1 - baseline), "seconds": time.time() - t0}
        if too_long:
            results[name]["prompt_too_long"] = too_long
        print0(f"{name:<14} {passed:>5}/{total:<5} = {100 * acc:6.2f}%  (centered {results[name]['centered']:+.4f}, "
               f"{time.time() - t0:.1f}s)" + (f"; {too_long} prompt(s) longer than the model's context counted as "
                                              f"failed" if too_long else ""))
    old = previous_report(args.source, model_tag, step)
    merged = {**old.get("results", {}), **results}
    # Wall time of every run that contributed a kept result (tasks may be evaluated one run at a time).
    kept_old = any(name not in results for name in old.get("results", {}))
    wall_time = time.time() - t_start + (old.get("wall_time", 0.0) if kept_old else 0.0)
    score = chatcore(merged)
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")
    else:
        have = [n for n in TASKS if n in merged]
        print0(f"ChatCORE needs all of {', '.join(TASKS)}; have {', '.join(have) or 'none'}")
    report = {"source": args.source, "model_tag": model_tag, "step": step, "results": merged,
              "evaluated_now": list(results), "chatcore": score, "device": rt.device_type,
              "dtype": str(rt.dtype).removeprefix("torch."), "world_size": rt.world_size,
              "args": vars(args), "wall_time": wall_time}
    path = write_report_json(f"chat_eval_{args.source}", report)
    if path:
        print0(f"Report: {path}")
    compute_cleanup()
    return report


if __name__ == "__main__":
    main()
