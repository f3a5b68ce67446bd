"""
Export a checkpoint as a HuggingFace transformers model directory, and prove it.

    python -m scripts.export_hf --source sft --out exports/nanochat-d20-sft
    python -m scripts.export_hf --source base --model-tag d4 --step 2000 --out /tmp/d4 --compare-hf
    python -m scripts.export_hf --source base --out /tmp/d2 --modeling builtin   # refuse rather than ship code

Writes config.json, model.safetensors, generation_config.json, the tokenizer with its chat template and a
model card README.md with the run's metrics from report/*.json. A model transformers' built-in `nanochat` type
represents exactly (trained with --no-value-embeds --no-resid-scalars --window-pattern L) is exported as that
type; any other ships modeling_nanochat_ext.py (trust_remote_code=True), unless --modeling builtin refuses.

Verification (unless --no-verify) loads the export with stock transformers and checks fp32 logits (<= 1e-4 on
>= 8 prompts), 32 greedy tokens, generate() vs our engine, token ids on held-out text and the chat template.
Only a passing export moves from <out>.partial to <out>; a failing one is kept at <out>.rejected (exit 1).
Load it back with any script's --source <out> (chat_cli, bench_infer, ...).
"""

import os
import json
import shutil
import argparse

import torch

from nanochat.common import print0, get_local_data_dir, run_cli, autodetect_dtype
from nanochat.checkpoint import load_model, resolve_checkpoint, STAGE_DIRS
from nanochat.hf_convert import BUILTIN_TYPE, ExportError, builtin_missing_features
from nanochat.hf_export import checkpoint_lineage, export_model, record_verification
from nanochat.hf_verify import VerificationError, heldout_texts, measure_generate_speed, verify_export


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=list(STAGE_DIRS), default="sft", help="checkpoint stage (default sft)")
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")
    p.add_argument("--modeling", choices=["auto", "builtin", "custom"], default="auto",
                   help="auto: the built-in type when it fits, else ship our code; builtin: refuse unless it fits; "
                        "custom: always ship our code (default auto)")
    p.add_argument("--no-verify", action="store_true", help="skip checking the export with transformers (not advised)")
    p.add_argument("--compare-hf", action="store_true", help="also measure batch-1 greedy decode speed, our engine "
                   "vs transformers' generate, in fp32 and in this machine's autodetected compute dtype")
    p.add_argument("--local-data", default=None,
                   help="held-out text to verify on, laid out like shared/data (default $NANOCHAT_LOCAL_DATA)")
    p.add_argument("--device-type", default="cpu", help="device of our model in verification (transformers: CPU)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.force:
        raise ExportError(f"--out {out} already exists: choose another directory or pass --force to replace it")
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    tag = os.path.basename(ckpt_dir)
    model, tokenizer, meta = load_model(args.source, torch.device(args.device_type), phase="eval", model_tag=tag,
                                        step=step, compute_dtype=torch.float32)
    partial, rejected = out + ".partial", out + ".rejected"
    shutil.rmtree(partial, ignore_errors=True)
    info = export_model(model, tokenizer, partial, modeling=args.modeling, source=args.source, model_tag=tag,
                        step=step, meta=meta, lineage=checkpoint_lineage(args.source, tag, step, meta))
    kind = ("transformers' built-in 'nanochat' type (no trust_remote_code)" if info["model_type"] == BUILTIN_TYPE
            else "custom modeling code modeling_nanochat_ext.py (load with trust_remote_code=True); the built-in "
                 "type lacks: " + "; ".join(builtin_missing_features(model.config) or ["nothing (--modeling custom)"]))
    print0(f"Exported {args.source}/{tag} step {step} as {kind}")
    if not args.no_verify:
        texts = heldout_texts(args.local_data or get_local_data_dir())
        try:
            verification = verify_export(partial, model, tokenizer, texts=texts)
        except VerificationError as e:
            shutil.rmtree(rejected, ignore_errors=True)
            os.replace(partial, rejected)
            raise VerificationError(f"{e}\nThe rejected export is kept at {rejected} for inspection.") from None
        info = record_verification(partial, info, verification)
        print0("Verified: max abs logit difference {max_logit_diff:.2e} (tolerance {atol:g}); greedy {greedy_tokens} "
               "tokens, tokenizer on {num_texts} texts, chat template identical".format(**verification))
    shutil.rmtree(out, ignore_errors=True)  # --force
    os.replace(partial, out)
    print0(f"Wrote {out}: " + ", ".join(sorted(os.listdir(out))))
    result = {"out": out, "model_type": info["model_type"], "source": args.source, "model_tag": tag, "step": step,
              "verification": info.get("verification")}
    if args.compare_hf:  # fp32 and the compute dtype of the CPU, where transformers runs
        result["speed"] = {str(d).removeprefix("torch."): measure_generate_speed(model, tokenizer, out, dtype=d)
                           for d in dict.fromkeys([torch.float32, autodetect_dtype("cpu")[0]])}
    print0(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
