"""Inference benchmark of the engine: prefill throughput, time to first token, decode throughput and time per
output token at several batch sizes, and peak memory, all through Engine.generate (the path the CLI, web
server, evals and RL use) on random prompt tokens. --random-init sizes the model from --depth exactly as
base_train does, so a size can be benchmarked untrained. Prints a table, then one JSON line of every figure.

    python -m scripts.bench_infer --source base --model-tag d4
    python -m scripts.bench_infer --random-init --depth 6 --vocab-size 32768 --max-seq-len 512
    NANOCHAT_DTYPE=float32 python -m scripts.bench_infer --random-init --depth 6   # or --dtype float32
"""

import argparse
import contextlib
import json
import statistics
import time

import torch

from nanochat.common import compute_init, parse_dtype, run_cli, UserError, PeakRSS
from nanochat.engine import Engine, KVCache, prepare_for_inference, last_logits


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model: a checkpoint")
    g.add_argument("-i", "--source", default="base",
                   help="checkpoint stage (base, mid, sft, rl) or the path of an HF export folder (default base)")
    g.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the only one there)")
    g.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    g = p.add_argument_group("model: or an untrained one of a given size")
    g.add_argument("--random-init", action="store_true", help="a random model (needs no checkpoint or tokenizer)")
    g.add_argument("--depth", type=int, default=6, help="layers; width = depth * 64 as in base_train (default 6)")
    g.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size (default 32768)")
    g.add_argument("--max-seq-len", type=int, default=512, help="context length (default 512)")
    g = p.add_argument_group("workload")
    g.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    g.add_argument("--decode-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    g.add_argument("--batch-sizes", default="1,8", help="comma-separated rows decoded together (default 1,8)")
    g.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    g.add_argument("--top-k", type=int, default=None, help="top-k for sampling (default off)")
    g.add_argument("--repeats", type=int, default=3, help="prefill timings to take the median of (default 3)")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto (autodetect), bfloat16, float16 or float32")
    g.add_argument("--device-type", default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r} must be comma-separated integers, e.g. 1,8")
    if min(args.batch_sizes) < 1 or args.prompt_tokens < 1 or args.decode_tokens < 2 or args.repeats < 1:
        p.error("--batch-sizes, --prompt-tokens and --repeats must be >= 1 and --decode-tokens >= 2")
    if args.dtype != "auto":
        try:
            args.dtype = parse_dtype(args.dtype)
        except ValueError as e:
            p.error(f"--dtype: {e}")
    return args


class _NoTokenizer:
    """Just the special-token ids the engine asks for, placed past the vocabulary: a random-init model
    then never finishes early, and no tokenizer has to exist."""

    def __init__(self, vocab_size):
        self.ids, self.vocab_size = {}, vocab_size

    def encode_special(self, s):
        return self.ids.setdefault(s, self.vocab_size + len(self.ids))

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")


def load(args, rt):
    dtype = rt.dtype if args.dtype == "auto" else args.dtype
    if args.random_init:
        from nanochat.scaling import model_config
        from nanochat.gpt import build_model
        torch.manual_seed(0)
        model = build_model(model_config(args.depth, args.vocab_size, max_seq_len=args.max_seq_len), rt.device, dtype)
        return model, _NoTokenizer(args.vocab_size), f"random-init d{args.depth}"
    from nanochat.hf_convert import load_any
    from nanochat.checkpoint import CheckpointError
    try:
        model, tokenizer, meta = load_any(args.source, rt.device, phase="eval", model_tag=args.model_tag,
                                          step=args.step, compute_dtype=dtype)
    except CheckpointError as e:
        raise UserError(f"{e} (or benchmark an untrained model with --random-init)") from None
    return model, tokenizer, f"{args.source} step {meta.get('step')}"


def main(argv=None):
    args = get_args(argv)
    rt = compute_init(args.device_type)
    model, tokenizer, what = load(args, rt)
    prepare_for_inference(model)
    engine = Engine(model, tokenizer)
    cfg, device = model.config, rt.device
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if args.prompt_tokens + args.decode_tokens > cfg.sequence_len:
        raise UserError(f"--prompt-tokens {args.prompt_tokens} + --decode-tokens {args.decode_tokens} exceed the "
                        f"model's context of {cfg.sequence_len}: lower them")
    gen = torch.Generator().manual_seed(0)
    specials = {engine.bos, engine.assistant_end}
    prompt = [t for t in torch.randint(0, cfg.vocab_size, (args.prompt_tokens * 2,), generator=gen).tolist()
              if t not in specials][:args.prompt_tokens]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * model.compute_dtype.itemsize
    dtype = str(model.compute_dtype).removeprefix("torch.")
    threads = torch.get_num_threads() if device.type == "cpu" else None
    mem_kind = {"cuda": "max_memory_allocated", "cpu": "peak RSS"}.get(device.type)
    print(f"model: {what}, {cfg.n_layer} layers, width {cfg.n_embd}, vocab {cfg.vocab_size}, context {cfg.sequence_len}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {weight_bytes / 2**20:.0f} MiB weights, "
          f"dtype {dtype}, device {device}" + (f" ({threads} threads)" if threads else ""))
    sample = dict(temperature=args.temperature, top_k=args.top_k)
    list(engine.generate(prompt, max_tokens=4, **sample))  # warm-up: first calls allocate and pick kernels

    # prefill alone: the prompt through the model into a cache, last-position logits out
    prefill_times = []
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=device)
        for _ in range(args.repeats):
            cache = KVCache.for_model(model, 1, len(prompt))
            sync()
            t0 = time.perf_counter()
            last_logits(model, ids, cache)
            sync()
            prefill_times.append(time.perf_counter() - t0)
    prefill_s = statistics.median(prefill_times)
    results = {"model": what, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
               "sequence_len": cfg.sequence_len, "dtype": dtype, "device": str(device), "threads": threads,
               "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes, "prompt_tokens": len(prompt),
               "decode_tokens": args.decode_tokens, "prefill_tok_per_s": len(prompt) / prefill_s,
               "prefill_ms": prefill_s * 1e3, "batches": []}
    print(f"prefill: {len(prompt)} tokens in {prefill_s * 1e3:.1f} ms = {len(prompt) / prefill_s:,.0f} tok/s")

    print(f"{'batch':>5} | {'TTFT ms':>8} | {'TPOT ms':>8} | {'decode tok/s':>12} | {'steps':>5} | {'peak MiB':>8}")
    for B in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stamps = []
        with (PeakRSS() if device.type == "cpu" else contextlib.nullcontext()) as rss:
            sync()
            t0 = time.perf_counter()
            for _ in engine.generate(prompt, num_samples=B, max_tokens=args.decode_tokens, **sample):
                stamps.append(time.perf_counter())  # the yield follows .tolist(), which synchronises
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak if rss else None
        steps, gaps = len(stamps), [b - a for a, b in zip(stamps, stamps[1:])]
        row = {"batch_size": B, "ttft_ms": (stamps[0] - t0) * 1e3,
               "tpot_ms_median": statistics.median(gaps) * 1e3 if gaps else None,
               "decode_tok_per_s": B * (steps - 1) / (stamps[-1] - stamps[0]) if steps > 1 else None, "steps": steps,
               "peak_memory_bytes": peak, "peak_memory_kind": mem_kind}
        results["batches"].append(row)
        print(f"{B:>5} | {row['ttft_ms']:>8.1f} | {row['tpot_ms_median'] or 0:>8.2f} | "
              f"{row['decode_tok_per_s'] or 0:>12,.0f} | {steps:>5} | {(peak or 0) / 2**20:>8.0f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    run_cli(main)
