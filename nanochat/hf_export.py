"""
Writing a HuggingFace export folder: config.json, fp32 model.safetensors, generation_config.json, the tokenizer
and chat template, modeling_nanochat_ext.py when needed, nanochat_export.json (provenance, verification) and a
model card whose metrics come only from the report/*.json files about this checkpoint and its ancestors.
"""

import os
import shutil

from nanochat.common import atomic_write_bytes, atomic_write_json, report_dir
from nanochat.gpt import GPTConfig
from nanochat.checkpoint import resolve_checkpoint
from nanochat.report import fmt_value, load_summaries
from nanochat.hf_convert import (EXT_MODELING_FILE, EXT_TYPE, META_FILE, WEIGHTS_FILE, ExportError, read_json,
                                 builtin_missing_features, choose_model_type, hf_config, hf_name, special_ids,
                                 write_tokenizer)


def checkpoint_lineage(source, model_tag, step, meta):
    """[{source, tag, step}] from the exported checkpoint back through the parents its metas record."""
    chain = [{"source": source, "tag": model_tag, "step": step}]
    parent = (meta or {}).get("parent")
    while isinstance(parent, dict) and len(chain) < 8:
        chain.append({"source": parent.get("source"), "tag": parent.get("tag"), "step": parent.get("step")})
        try:
            ckpt_dir, pstep = resolve_checkpoint(parent["source"], parent["tag"], parent["step"])
            parent = read_json(os.path.join(ckpt_dir, f"meta_{pstep:06d}.json")).get("parent")
        except Exception:
            break  # the parent checkpoint is gone: the chain ends at what its child recorded
    return chain


# report/<name>.json -> the checkpoint stage it describes (chat_eval_<x>.json names its own source), and the
# (label, key) rows it contributes (the other training stages give tokens and loss)
_REPORT_STAGES = {"base_train": "base", "base_eval": "base", "mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}
_METRICS = {"base_train": [("pretraining tokens", "tokens"), ("validation bits per byte", "val_bpb")],
            "base_eval": [("CORE (centered accuracy)", "core"), ("train bits per byte", "train_bpb"),
                          ("validation bits per byte", "val_bpb")]}


def _metric_rows(reports, lineage):
    """Markdown rows from the reports whose (stage, model_tag, step) is in the lineage; the names of the others."""
    rows, skipped = [], []
    for name, r in sorted(reports.items()):
        is_eval = name.startswith("chat_eval_")
        stage = (r.get("source") or name[len("chat_eval_"):]) if is_eval else _REPORT_STAGES.get(name)
        if stage is None:
            continue
        if not any(stage == c["source"] and r.get("model_tag") == c["tag"] and r.get("step") == c["step"]
                   for c in lineage):
            skipped.append(f"{name}.json (tag {r.get('model_tag')}, step {r.get('step')})")
            continue
        if is_eval:
            found = [(f"{task} accuracy", res.get("accuracy")) for task, res in sorted((r.get("results") or {}).items())
                     if isinstance(res, dict)] + [("ChatCORE", r.get("chatcore"))]
        else:
            found = [(label, r.get(key)) for label, key in
                     _METRICS.get(name, [(f"{name} tokens", "tokens"), (f"{name} validation loss", "val_loss")])]
        where = f"report/{name}.json ({stage} {r.get('model_tag')} step {r.get('step')})"
        rows += [f"| {label} | {fmt_value(v)} | {where} |" for label, v in found if v is not None]
    return rows, skipped


_STAGES = {"base": "pretraining", "mid": "pretraining and midtraining", "sft": "pretraining, midtraining and SFT",
           "rl": "pretraining, midtraining, SFT and RL"}


def model_card(info, reports, verification=None):
    """README.md: the model, how to load it, its metrics (each naming its report, tag and step), its verification."""
    cfg, params, custom = GPTConfig(**info["model_config"]), info["num_params"], info["model_type"] == EXT_TYPE
    trust, missing = (", trust_remote_code=True" if custom else ""), builtin_missing_features(cfg)
    stage, tag, step = info.get("source"), info.get("model_tag"), info.get("step")
    kind = ("built into transformers, no remote code" if not custom else
            f"custom code `{EXT_MODELING_FILE}` shipped here, load with `trust_remote_code=True`"
            + ("; the built-in `nanochat` type lacks: " + "; ".join(missing) if missing else ""))
    lines = [f"# nanochat {stage or ''} model{f' {tag}' if tag else ''}{f' (step {step})' if step is not None else ''}",
             "", f"A small {'chat ' if stage in ('mid', 'sft', 'rl') else ''}language model trained from scratch with "
             f"nanochat ({_STAGES.get(stage, 'training')}), exported for HuggingFace transformers.", "",
             "## Architecture", "", f"- transformers model type: `{info['model_type']}` ({kind})",
             f"- {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} query / {cfg.n_kv_head} KV heads of dim "
             f"{cfg.head_dim}, ReLU^2 MLP, context {cfg.sequence_len}; RoPE (base {cfg.rope_base:g}), QK norm, "
             f"parameter-free RMSNorm (eps {cfg.norm_eps:g}), untied lm_head, no biases, logit softcap {cfg.softcap:g}",
             f"- value embeddings: {'yes' if cfg.value_embeds else 'no'}; residual scalars: "
             f"{'yes' if cfg.resid_scalars else 'no'}; attention windows: {cfg.window_pattern}",
             f"- parameters: {params['total']:,} ({params['scaling']:,} in matmuls + lm_head, {params['wte']:,} token "
             f"embedding, {params['value_embeds']:,} value embeddings); {cfg.vocab_size} byte-level BPE tokens, "
             "special: " + ", ".join(f"`{t}`" for t in info.get("special_tokens", [])), "", "## Metrics", ""]
    rows, skipped = _metric_rows(reports, info.get("lineage") or [{"source": stage, "tag": tag, "step": step}])
    lines += (["From report/*.json, only those measured on this checkpoint or the ones it was trained from:", "",
               "| metric | value | source |", "|---|---|---|", *rows] if rows else
              ["No report/*.json about this checkpoint was found, so no metrics are listed."]) + [""]
    if skipped:
        lines += ["Left out because they describe other checkpoints: " + ", ".join(skipped) + ".", ""]
    lines += ["## Usage", "", "```python", "import torch",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"tok = AutoTokenizer.from_pretrained(path{trust})",
              f"model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32{trust})",
              "# chat: the template renders nanochat's conversation format and ends with <|assistant_start|>",
              "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}],",
              "                              add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=64, do_sample=False)  # stops at <|assistant_end|>",
              "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
              "# plain completion: prepend <|bos|> as in training",
              "ids = tok(\"<|bos|>The capital of France is\", return_tensors=\"pt\")", "```", "",
              "With nanochat itself: `python -m scripts.chat_cli --source path/to/this/dir`.", "",
              "Notes: the tokenizer adds no BOS (the chat template does). `tok(...)` and the chat template parse text "
              "spelling a special token (e.g. `<|user_end|>`) as that token, nanochat's renderer as plain text "
              "(`split_special_tokens=True` matches it). Consecutive `text` parts of a message are joined.", "",
              "## Verification", ""]
    if not (v := verification):
        return "\n".join(lines + ["This export was written without verification (--no-verify).", ""])
    return "\n".join(lines + [
        f"Checked with stock transformers {v['transformers_version']} at export time (fp32, CPU):", "",
        f"- logits: max abs difference {v['max_logit_diff']:.2e} over {v['num_prompts']} prompts "
        f"({v['num_positions']} positions; tolerance {v['atol']:g})",
        f"- greedy generation: {v['greedy_tokens']} tokens identical on {v['num_greedy_prompts']} prompts; "
        "generate() with this generation config identical to nanochat's engine",
        f"- tokenizer: identical ids on {v['num_texts']} held-out texts (special-token text as special tokens "
        "and as text), identical decoding",
        f"- chat template: identical to render_conversation on {v['num_conversations']} conversations", ""])


def export_model(model, tokenizer, out_dir, modeling="auto", source=None, model_tag=None, step=None,
                 meta=None, lineage=None):
    """Write an export of `model` (our GPT) into out_dir (absent or empty), unverified (hf_verify.verify_export
    is next); returns the info in nanochat_export.json. lineage selects the reports the card quotes."""
    import transformers
    from safetensors.torch import save_file
    config = model.config
    if config.vocab_size != tokenizer.get_vocab_size():
        raise ExportError(f"model vocab {config.vocab_size} != tokenizer vocab {tokenizer.get_vocab_size()}: "
                          "not the tokenizer this model was trained with")
    model_type = choose_model_type(config, modeling)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not empty: choose a new directory")
    os.makedirs(out_dir, exist_ok=True)
    save_file({hf_name(k): v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_json(os.path.join(out_dir, "config.json"),
                      {**hf_config(config, tokenizer, model_type), "transformers_version": transformers.__version__})
    if model_type == EXT_TYPE:
        shutil.copyfile(os.path.join(os.path.dirname(__file__), EXT_MODELING_FILE),
                        os.path.join(out_dir, EXT_MODELING_FILE))
    bos, eos, pad = special_ids(tokenizer)
    transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                                  do_sample=False).save_pretrained(out_dir)
    write_tokenizer(tokenizer, out_dir, config.sequence_len)
    info = {"format": "nanochat-hf-export-v1", "model_type": model_type, "source": source, "model_tag": model_tag,
            "step": step, "lineage": lineage or [{"source": source, "tag": model_tag, "step": step}],
            "model_config": config.to_dict(), "num_params": model.num_params(),
            "tokenizer_fingerprint": tokenizer.fingerprint, "special_tokens": tokenizer.get_special_tokens(),
            "train_meta": {k: v for k, v in (meta or {}).items()
                           if k in ("git", "total_batch_size", "num_iterations") and v is not None}}
    return record_verification(out_dir, info, None)


def record_verification(out_dir, info, verification):
    """Store the verification figures (None: not yet verified) in nanochat_export.json and the model card."""
    info = {**info, "verification": verification}
    atomic_write_json(os.path.join(out_dir, META_FILE), {k: v for k, v in info.items() if k != "reports"})
    reports = load_summaries(report_dir())[0]  # unreadable ones (being rewritten, damaged) are left out
    info["reports"] = sorted(reports)
    atomic_write_bytes(os.path.join(out_dir, "README.md"), model_card(info, reports, verification).encode("utf-8"))
    return info
