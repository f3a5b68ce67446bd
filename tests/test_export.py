"""HuggingFace export: both model types exported and verified against stock transformers, the round trip
back into our engine, the tokenizer and chat template against ours on real held-out text, and the
refusals and failure modes (unsupported features, a tokenizer out of sync, a bad chat template)."""

import gzip
import json
import os
import shutil

import pytest
import torch

from nanochat import hf_convert, hf_export, hf_verify
from nanochat.checkpoint import CheckpointError, load_model, save_checkpoint, stage_dir
from nanochat.hf_convert import load_any
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory, shared_data):
    """A writable copy of the tiny pipeline with a second base checkpoint "d2plain" that the built-in
    transformers type can represent: the trained d2's shared weights in a config without value
    embeddings and residual scalars (not retrained: the export only needs non-trivial weights)."""
    base = tmp_path_factory.mktemp("export_run") / "base"
    shutil.copytree(tiny_run, base)
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(base))
    model, tokenizer, meta = load_model("base", "cpu", model_tag="d2")
    config = GPTConfig(**{**meta["model_config"], "value_embeds": False, "resid_scalars": False})
    plain = build_model(config, "cpu")
    state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(state, strict=True)
    save_checkpoint(os.path.join(stage_dir("base"), "d2plain"), meta["step"],
                    {"model_config": config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint},
                    model_state=plain.state_dict())
    out = tmp_path_factory.mktemp("exports")
    from scripts import export_hf
    results = {}
    for tag in ("d2", "d2plain"):
        results[tag] = export_hf.main(["--source", "base", "--model-tag", tag, "--out", str(out / tag),
                                       "--local-data", str(shared_data)])
    yield {"base": base, "out": out, "results": results, "tokenizer": tokenizer}
    mp.undo()


def _original(tag):
    model, tokenizer, _ = load_model("base", "cpu", model_tag=tag)
    return model, tokenizer


def test_builtin_type_export_verified(run):
    r = run["results"]["d2plain"]
    d = run["out"] / "d2plain"
    assert r["model_type"] == "nanochat"
    v = r["verification"]
    assert v["ok"] and v["max_logit_diff"] <= 1e-4 and v["num_prompts"] >= 8 and v["greedy_tokens"] == 32
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "nanochat" and "auto_map" not in cfg
    assert not (d / hf_convert.EXT_MODELING_FILE).exists()
    assert not (run["out"] / "d2plain.partial").exists()
    # stock transformers, no remote code
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    assert type(hf).__name__ == "NanoChatForCausalLM"


def test_custom_type_export_verified_and_says_so(run):
    r = run["results"]["d2"]
    d = run["out"] / "d2"
    assert r["model_type"] == "nanochat_ext"
    assert r["verification"]["ok"] and r["verification"]["max_logit_diff"] <= 1e-4
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat_ext.NanoChatExtForCausalLM"
    code = (d / hf_convert.EXT_MODELING_FILE).read_text()
    assert "import nanochat" not in code and "from nanochat" not in code  # self-contained
    card = (d / "README.md").read_text()
    assert "trust_remote_code=True" in card and "value embeddings" in card and "residual scalars" in card
    # metrics come from report/base_train.json, which describes exactly this checkpoint (tag d2)
    bt = json.loads((run["base"] / "report" / "base_train.json").read_text())
    assert f"{bt['val_bpb']:.4f}" in card and "max abs difference" in card


@pytest.mark.parametrize("tag", ["d2", "d2plain"])
def test_round_trip_into_engine(run, tag):
    original, tokenizer = _original(tag)
    imported, imported_tok, meta = load_any(str(run["out"] / tag), "cpu")
    assert imported_tok.fingerprint == tokenizer.fingerprint
    assert meta["model_config"] == original.config.to_dict()
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.equal(imported(ids), original(ids))  # same fp32 weights: bit-identical logits
    prompt = ids[0].tolist()
    a = [c[0] for c, _ in Engine(original, tokenizer).generate(prompt, max_tokens=16, temperature=0)]
    b = [c[0] for c, _ in Engine(imported, imported_tok).generate(prompt, max_tokens=16, temperature=0)]
    assert a == b


@pytest.mark.parametrize("tag", ["d2", "d2plain"])
def test_stock_generate_matches_engine(run, tag):
    model, tokenizer = _original(tag)
    hf, hf_tok = hf_verify.load_hf(str(run["out"] / tag))
    conv = {"messages": [{"role": "user", "content": "Tell me about the sea."}]}
    prompt = hf_tok.apply_chat_template(conv["messages"], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    assert prompt["input_ids"][0].tolist() == tokenizer.render_for_completion(
        {"messages": conv["messages"] + [{"role": "assistant", "content": ""}]})
    out = hf.generate(**prompt, max_new_tokens=24, do_sample=False)
    theirs = out[0, prompt["input_ids"].shape[1]:].tolist()
    ours = [c[0] for c, _ in Engine(model, tokenizer).generate(prompt["input_ids"][0].tolist(), max_tokens=24,
                                                                temperature=0)]
    assert theirs == ours


def _sharegpt_texts(shared_data, n=300):
    texts = []
    with gzip.open(shared_data / "chat_sft" / "sharegpt" / "sharegpt_v3_complete_records.jsonl.gz", "rt") as f:
        for line in f:
            for m in json.loads(line).get("conversations", []):
                texts.append(m.get("value", ""))
            if len(texts) >= n:
                break
    return texts


def test_autotokenizer_ids_and_chat_template(run, shared_data):
    tokenizer = run["tokenizer"]
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(run["out"] / "d2plain"))
    texts = _sharegpt_texts(shared_data) + ["emoji 👨‍👩‍👧 naïve 日本語 <|bos|>x<|assistant_end|>", "\r\n\t  \u00a0"]
    ours = tokenizer.encode(texts)
    theirs = hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert sum(map(len, ours)) > 10_000 and theirs == ours
    for t in texts[-2:]:
        assert hf(t, add_special_tokens=False)["input_ids"] == tokenizer.enc.encode(t, allowed_special="all")
        assert hf.decode(tokenizer.encode(t)) == t
    assert hf.bos_token == "<|bos|>" and hf.eos_token == "<|assistant_end|>"
    assert hf("hello", add_special_tokens=True)["input_ids"] == tokenizer.encode("hello")  # no implicit BOS
    conversations = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": texts[0][:300]},
                      {"role": "assistant", "content": texts[1][:300]}, {"role": "user", "content": "thanks 🙏"},
                      {"role": "assistant", "content": [{"type": "text", "text": "Checking: "},
                                                        {"type": "python", "text": "print(2**10)"},
                                                        {"type": "python_output", "text": "1024\n"},
                                                        {"type": "text", "text": " done."}]}]},
    ]
    for conv in conversations:
        ids, _ = tokenizer.render_conversation(conv)
        assert hf_verify._hf_ids(hf.apply_chat_template(conv["messages"], tokenize=True)) == ids
        prompt = tokenizer.render_for_completion(conv)
        assert hf_verify._hf_ids(hf.apply_chat_template(conv["messages"][:-1], tokenize=True,
                                                     add_generation_prompt=True)) == prompt
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=True)


def test_builtin_refused_with_named_features(run):
    model, tokenizer = _original("d2")
    with pytest.raises(hf_convert.ExportError, match="value embeddings.*residual scalars"):
        hf_export.export_model(model, tokenizer, str(run["out"] / "refused"), modeling="builtin")
    assert not (run["out"] / "refused").exists()
    windowed = GPTConfig(sequence_len=512, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                         window_pattern="SL", value_embeds=False, resid_scalars=False)
    assert any("sliding-window" in f for f in hf_convert.builtin_missing_features(windowed))
    assert hf_convert.choose_model_type(windowed) == hf_convert.EXT_TYPE


def test_sliding_windows_and_gqa_custom_export(run, tmp_path):
    """Our modeling code reproduces sliding windows (a prompt longer than the window) and GQA."""
    tokenizer = run["tokenizer"]
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SL")
    assert hf_convert.builtin_missing_features(config)
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial weights everywhere (init zeroes projections)
    d = tmp_path / "windowed"
    hf_export.export_model(model, tokenizer, str(d))
    v = hf_verify.verify_export(str(d), model, tokenizer, texts=hf_verify.heldout_texts())
    assert v["max_logit_diff"] <= 1e-4
    # left-padded batch in transformers == each row alone
    hf, _ = hf_verify.load_hf(str(d))
    a, b = tokenizer.encode("one two three four five", prepend="<|bos|>"), tokenizer.encode("six", prepend="<|bos|>")
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
    with torch.no_grad():
        batched = hf(ids, attention_mask=mask).logits
        alone = hf(torch.tensor([b])).logits
    assert (batched[1, pad:] - alone[0]).abs().max() < 1e-4


def test_verification_catches_mismatches(run, tmp_path):
    model, tokenizer = _original("d2plain")
    d = tmp_path / "exp"
    hf_export.export_model(model, tokenizer, str(d))
    # weights out of sync with the export
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    with pytest.raises(hf_verify.VerificationError, match="logit"):
        hf_verify.verify_export(str(d), model, tokenizer)
    model, tokenizer = _original("d2plain")
    # tokenizer out of sync: two vocabulary entries swapped
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    k1, k2 = [k for k, i in vocab.items() if i in (300, 301)]
    vocab[k1], vocab[k2] = vocab[k2], vocab[k1]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(hf_verify.VerificationError, match="token ids differ"):
        hf_verify.verify_export(str(d), model, tokenizer)


def test_script_rejects_failed_export(run, monkeypatch, tmp_path):
    from scripts import export_hf
    monkeypatch.setattr(hf_convert, "CHAT_TEMPLATE", hf_convert.CHAT_TEMPLATE.replace("'\\n\\n'", "'\\n'"))
    out = tmp_path / "bad"
    with pytest.raises(hf_verify.VerificationError, match="chat template"):
        export_hf.main(["--source", "base", "--model-tag", "d2plain", "--out", str(out)])
    assert not out.exists() and (tmp_path / "bad.rejected" / "config.json").exists()


def test_import_errors(run, tmp_path):
    with pytest.raises(CheckpointError, match="do not apply"):
        load_any(str(run["out"] / "d2plain"), "cpu", step=60)
    d = tmp_path / "odd"
    shutil.copytree(run["out"] / "d2plain", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 3 * cfg["hidden_size"]}))
    with pytest.raises(CheckpointError, match="intermediate_size"):
        load_any(str(d), "cpu")
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a nanochat model"):
        load_any(str(d), "cpu")
    with pytest.raises(CheckpointError, match="unknown checkpoint source .*HF export directory"):
        load_any(str(tmp_path / "missing"), "cpu")
    with pytest.raises(CheckpointError, match="unknown checkpoint source"):
        load_model(str(run["out"] / "d2plain"), "cpu")  # checkpoint.load_model reads our checkpoints only


def test_layering():
    """The HF modules sit above checkpoint and engine: nothing below imports them (no import cycle)."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "nanochat"
    for name in ("common", "gpt", "tokenizer", "checkpoint", "engine", "modeling_nanochat_ext"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not any("hf_" in m or "export" in m for m in imported), (name, imported)
    code = (root / "hf_convert.py").read_text()
    assert "nanochat.engine" not in code and "hf_export" not in code and "hf_verify" not in code


def test_generate_speed_measurement(run):
    model, tokenizer = _original("d2plain")
    r = hf_verify.measure_generate_speed(model, tokenizer, str(run["out"] / "d2plain"), new_tokens=8, repeats=1)
    assert r["engine_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["new_tokens"] == 8
