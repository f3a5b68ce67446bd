"""Training throughput and MFU of one configuration: full optimizer steps (forward, fused loss, backward,
MuonAdamW) on random tokens, timed after warm-up (and compilation). The data loader is not included
(base_train's logged tok/s includes it). Prints one JSON line per run; --compare-dtypes runs bf16 then fp32
back to back in this process and then prints their throughput ratio.

    python -m scripts.bench_train --depth=6 --max-seq-len=512 --device-batch-size=32 [--compare-dtypes]
"""

import json
import time
import argparse

import torch

from nanochat.common import compute_init, get_peak_flops, parse_dtype, autodetect_dtype, run_cli, PeakRSS
from nanochat.gpt import build_model
from nanochat.attention import fa3_available
from nanochat.scaling import add_model_flags, config_from_args
from nanochat.training import use_compile


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, depth=6, seq_len=512)
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per step")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (the best is reported with the mean)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--dtype", type=str, default="auto", help="compute dtype: auto, bfloat16 or float32")
    p.add_argument("--compare-dtypes", action="store_true", help="run bfloat16 and float32 and print the ratio")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="as in base_train")
    p.add_argument("--device-type", type=str, default="", help="cuda, mps or cpu (default: autodetect)")
    return p.parse_args(argv)


def bench(args, rt, dtype, compiled):
    config = config_from_args(args, args.vocab_size, fa3=fa3_available(rt.device_type))
    torch.manual_seed(0)
    model = build_model(config, rt.device, dtype)
    optimizer = model.setup_optimizer()
    if compiled:
        model.compile_for_training()
    B, T = args.device_batch_size, args.max_seq_len
    x, y = (torch.randint(0, args.vocab_size, (B, T), device=rt.device) for _ in range(2))
    times = []
    with PeakRSS() as mem:
        for _ in range(args.warmup + args.steps):
            t0 = time.time()
            loss = model(x, y)
            loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            loss.item()  # synchronises
            times.append(time.time() - t0)
    warmup_s, times = sum(times[:args.warmup]), times[args.warmup:]
    peak, peak_reason = get_peak_flops(rt.device_type, dtype)
    bf16_peak, _ = get_peak_flops(rt.device_type, torch.bfloat16)
    mean, best = sum(times) / len(times), min(times)
    tok_s, fpt = B * T / mean, model.flops_per_token()
    peak_mem = torch.cuda.max_memory_allocated() if rt.device_type == "cuda" else mem.peak
    return {"depth": args.depth, "width": config.n_embd, "heads": config.n_embd // args.head_dim, "seq_len": T,
            "batch": B, "vocab": args.vocab_size, "dtype": str(dtype).removeprefix("torch."), "compile": compiled,
            "device": rt.device_type, "threads": torch.get_num_threads(), "num_params": model.num_params()["total"],
            "flops_per_token": fpt, "step_s_mean": mean, "step_s_best": best, "tok_per_sec": tok_s,
            "tok_per_sec_best": B * T / best, "mfu": fpt * tok_s / peak, "mfu_vs_bf16_peak": fpt * tok_s / bf16_peak,
            "peak_flops": peak, "peak_flops_source": peak_reason, "peak_memory_gb": peak_mem / 1e9,
            "warmup_s": warmup_s}


def main(argv=None):
    args = get_args(argv)
    rt = compute_init(args.device_type)
    compiled = use_compile(args.compile, rt.device_type)
    dtypes = ([torch.bfloat16, torch.float32] if args.compare_dtypes else
              [autodetect_dtype(rt.device_type)[0] if args.dtype == "auto" else parse_dtype(args.dtype)])
    results = []
    for dtype in dtypes:
        results.append(bench(args, rt, dtype, compiled))
        print(json.dumps(results[-1]), flush=True)
    if args.compare_dtypes:
        bf16, fp32 = (r["tok_per_sec"] for r in results)
        print(json.dumps({"compare_dtypes": True, "bf16_tok_per_sec": bf16, "fp32_tok_per_sec": fp32,
                          "bf16_over_fp32": bf16 / fp32}), flush=True)
    return results


if __name__ == "__main__":
    run_cli(main)
