"""
Proving a HuggingFace export rather than trusting it (community exports' known failure is a tokenizer out of sync
with the weights): verify_export compares stock transformers with our model, tokenizer, engine and chat format.
Also the decode speed of our engine vs transformers' generate.
"""

import os
import json
import time

import torch

from nanochat.common import print0
from nanochat.engine import Engine
from nanochat.attention import window_sizes
from nanochat.tokenizer import SPECIAL_TOKENS
from nanochat.hf_convert import EXT_TYPE, TRICKY_TEXTS, ExportError, read_json

LOGIT_ATOL = 1e-4
MIN_PROMPTS = 8
GREEDY_TOKENS = 32


class VerificationError(ExportError):
    """The export loads in transformers but does not reproduce our model or tokenizer."""


_CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello! Who are you?"},
                  {"role": "assistant", "content": "I'm nanochat, a small language model."}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And times three? 😀"},
                  {"role": "assistant", "content": "12."}]},
    {"messages": [{"role": "user", "content": "Compute 17*23 with the tool."}, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute that. "}, {"type": "python", "text": "17*23"},
        {"type": "python_output", "text": "391"}, {"type": "text", "text": " So the answer is 391."}]}]},
    {"messages": [{"role": "user", "content": "  leading and trailing spaces \n\n"},
                  {"role": "assistant", "content": "\nnewline first, unicode naïve — 日本"}]},
    {"messages": [{"role": "user", "content": "Write a haiku about the sea."}]},  # prompts for the next reply
    {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"}]},
]


def heldout_texts(local_data_dir=None, max_docs=24, max_chars=4000):
    """Text the tokenizer was not trained on: the tricky strings, documents of the validation shard (held out
    from training) when there are shards, and chat data from the local data folder when it is there."""
    texts = list(TRICKY_TEXTS)
    try:
        from nanochat.dataset import list_parquet_files, read_row_group
        texts += [d[:max_chars] for d in read_row_group(list_parquet_files("val")[0], 0)[:max_docs // 2]]
    except Exception:
        pass  # no shards in this base dir: the other sources still cover the check
    for rel in ("chat_sft/lima/lima.json", "chat_sft/gpteacher/codegen-instruct.json") if local_data_dir else ():
        try:
            rows = read_json(os.path.join(local_data_dir, rel))
        except ExportError:
            continue  # this dataset is not in the local folder
        for r in [r for r in rows if isinstance(r, dict)][: max_docs // 4] if isinstance(rows, list) else []:
            texts += [str(x)[:max_chars] for x in (r.get("instruction", ""), r.get("response", r.get("output", "")))]
    return texts


def verification_prompts(tokenizer, texts, sequence_len, n=MIN_PROMPTS, long_len=None):
    """>= n token-id prompts of varied length, each starting with <|bos|>: held-out text cut to lengths
    from 1 to a long one (past a sliding window when the model has one), plus chat prompts."""
    bos = tokenizer.get_bos_token_id()
    stream = [tok for t in texts if t.strip() for tok in tokenizer.encode(t)] or [bos]
    prompts = [[bos] + (stream[(k * 997) % len(stream):] + stream)[: max(1, min(L, sequence_len)) - 1]
               for k, L in enumerate([1, 5, 16, 33, 64, 100, long_len or 160])]
    if all(t in tokenizer.get_special_tokens() for t in SPECIAL_TOKENS):
        chats = [tokenizer.render_for_completion(c) for c in _CONVERSATIONS[:3]]  # these end with a reply
        prompts += [p for p in chats if len(p) <= sequence_len]
    while len(prompts) < n:
        prompts.append([bos] + stream[len(prompts) * 13:][: min(24, sequence_len - 1)])
    return prompts


def load_hf(out_dir, dtype=torch.float32):
    """(model, tokenizer) loaded from an export with stock transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    custom = read_json(os.path.join(out_dir, "config.json")).get("model_type") == EXT_TYPE
    # trust_remote_code for the tokenizer too: AutoTokenizer reads config.json, whose auto_map names our code
    tok = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=custom)
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, trust_remote_code=custom).eval(), tok


def _hf_ids(x):
    """apply_chat_template returns a list, or a BatchEncoding/dict, depending on the version."""
    x = x["input_ids"] if hasattr(x, "keys") else x
    x = x.tolist() if isinstance(x, torch.Tensor) else x
    return list(x[0] if x and isinstance(x[0], list) else x)


def _greedy_hf(hf, prompt, n, stop=True):
    """HF greedy continuation with the export's generation config; stop=False: no end tokens, n tokens back."""
    from transformers import GenerationConfig
    gc = hf.generation_config
    config = GenerationConfig(do_sample=False, max_new_tokens=n, bos_token_id=gc.bos_token_id,
                              pad_token_id=gc.pad_token_id, eos_token_id=gc.eos_token_id if stop else [])
    ids = torch.tensor([prompt], dtype=torch.long)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)  # generate is no_grad
    return out[0, len(prompt):].tolist()


def _check_tokenizer(hf_tok, tokenizer, texts, failures):
    # ids on held-out text (special-token text as special tokens and as plain text), then decoding
    if len(hf_tok) != tokenizer.get_vocab_size():
        failures.append(f"tokenizer size {len(hf_tok)} != ours {tokenizer.get_vocab_size()}")
    for t in tokenizer.get_special_tokens():
        if (theirs := hf_tok.convert_tokens_to_ids(t)) != (ours := tokenizer.encode_special(t)):
            failures.append(f"special token {t!r}: HF id {theirs} != ours {ours}")
    bad = []
    for text in texts:
        ours = tokenizer.encode(text)
        if (hf_tok(text, add_special_tokens=False)["input_ids"] != tokenizer.enc.encode(text, allowed_special="all")
                or hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] != ours):
            bad.append(text[:60])
        elif hf_tok.decode(ours) != tokenizer.decode(ours):
            bad.append("decode: " + text[:52])
    if bad:
        failures.append(f"token ids differ on {len(bad)} of {len(texts)} texts, e.g. {bad[:3]}")


def _check_chat_template(hf_tok, tokenizer, failures):
    # apply_chat_template == render_conversation (whole conversations) and render_for_completion (prompts)
    if not hf_tok.chat_template:
        if all(t in tokenizer.get_special_tokens() for t in SPECIAL_TOKENS):
            failures.append("the export has no chat template")
        return 0
    for conv in _CONVERSATIONS:
        msgs = conv["messages"]
        try:
            if msgs[-1]["role"] == "assistant":
                ok = (tokenizer.render_conversation(conv)[0] == _hf_ids(hf_tok.apply_chat_template(msgs, tokenize=True))
                      and tokenizer.render_for_completion(conv) == _hf_ids(
                          hf_tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)))
            else:
                ours = tokenizer.render_for_completion({"messages": msgs + [{"role": "assistant", "content": ""}]})
                ok = ours == _hf_ids(hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
        except Exception:
            ok = False  # the template raised where render_conversation accepts the conversation
        if not ok:
            failures.append(f"chat template differs from render_conversation on {json.dumps(msgs)[:120]}")
    return len(_CONVERSATIONS)


def verify_export(out_dir, model, tokenizer, texts=None, atol=LOGIT_ATOL, greedy_tokens=GREEDY_TOKENS, log=print0):
    """Compare stock transformers' load of out_dir with ours: fp32 logits (<= atol on >= 8 prompts), greedy
    tokens, generate() vs our engine, tokenizer ids and decoding, the chat template. Returns the figures;
    raises VerificationError listing every mismatch."""
    import transformers
    texts = list(texts) if texts is not None else heldout_texts()
    failures = []
    saved_dtype, model.compute_dtype = model.compute_dtype, torch.float32  # compared in fp32, as the weights are
    model.eval()
    try:
        try:
            hf, hf_tok = load_hf(out_dir)
        except Exception as e:
            raise VerificationError(f"stock transformers cannot load {out_dir}: {type(e).__name__}: {e}") from None
        _check_tokenizer(hf_tok, tokenizer, texts, failures)
        n_conv = _check_chat_template(hf_tok, tokenizer, failures)

        # logits on >= 8 prompts, fp32, one of them longer than the widest sliding window
        cfg = model.config
        long_len = min(cfg.sequence_len, max((w + 40 for w in window_sizes(cfg) if w), default=160))
        prompts = verification_prompts(tokenizer, texts, cfg.sequence_len, long_len=long_len)
        max_diff, positions = 0.0, 0
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], dtype=torch.long, device=model.lm_head.weight.device)
                ours, theirs = model(ids).float().cpu(), hf(ids.cpu()).logits.float()
                if theirs.shape != ours.shape:
                    failures.append(f"logits shape {tuple(theirs.shape)} != ours {tuple(ours.shape)}")
                    continue
                max_diff = max(max_diff, (theirs - ours).abs().max().item())
                positions += len(p)
        if not max_diff <= atol:
            failures.append(f"max abs logit difference {max_diff:.3e} > {atol:g}")
        log(f"logits: max abs diff {max_diff:.3e} over {len(prompts)} prompts ({positions} positions)")

        # greedy: 32 tokens with stopping disabled (vs our reference sampler), then HF's generate with
        # the export's generation config vs our engine (which stops at the same end tokens)
        gen_prompts = [p for p in prompts if len(p) + greedy_tokens < cfg.sequence_len][:4]
        engine = Engine(model, tokenizer)
        for p in gen_prompts:
            ours = list(model.generate(p, greedy_tokens, temperature=0))  # our reference sampler, no cache
            theirs = _greedy_hf(hf, p, greedy_tokens, stop=False)
            if len(theirs) != greedy_tokens:
                failures.append(f"HF generate returned {len(theirs)} tokens, not {greedy_tokens}, with end tokens off")
            elif ours != theirs:
                failures.append(f"greedy differs on a {len(p)}-token prompt: ours {ours[:12]}... HF {theirs[:12]}...")
            eng = [col[0] for col, _ in engine.generate(p, max_tokens=greedy_tokens, temperature=0)]
            theirs = _greedy_hf(hf, p, greedy_tokens, stop=True)
            if eng != theirs:
                failures.append(f"HF generate {theirs[:12]}... != engine {eng[:12]}... on a {len(p)}-token prompt")
        log(f"greedy: {len(gen_prompts)} prompts x {greedy_tokens} tokens compared")
    finally:
        model.compute_dtype = saved_dtype
    if failures:
        raise VerificationError("the export does not reproduce the model:\n  - " + "\n  - ".join(failures))
    return {"ok": True, "max_logit_diff": max_diff, "atol": atol, "num_prompts": len(prompts),
            "num_positions": positions, "greedy_tokens": greedy_tokens, "num_greedy_prompts": len(gen_prompts),
            "num_texts": len(texts), "num_conversations": n_conv, "transformers_version": transformers.__version__}


def measure_generate_speed(model, tokenizer, export_dir, prompt_len=16, new_tokens=64, repeats=3,
                           dtype=torch.float32, log=print0):
    """Batch-1 greedy decode tokens/s (prefill included, best of `repeats` after a warm-up) of our Engine and of
    transformers' generate (end tokens off, on the CPU), same weights, both in `dtype`."""
    hf, _ = load_hf(export_dir, dtype)
    saved, model.compute_dtype = model.compute_dtype, dtype
    engine = Engine(model.eval(), tokenizer)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    prompt = ([tokenizer.get_bos_token_id()] + tokenizer.encode(text))[:prompt_len]
    new_tokens = min(new_tokens, model.config.sequence_len - len(prompt))

    def best(fn):  # (wall-clock rate, rate per CPU-second: the one to trust on a shared machine, tokens)
        fn()  # warm-up
        wall, cpu, n = [], [], 0
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn()
            wall.append(n / (time.perf_counter() - t0))
            cpu.append(n / max(time.process_time() - c0, 1e-9))
        return max(wall), max(cpu), n
    try:
        with torch.inference_mode():
            engine_rate, engine_cpu, engine_n = best(
                lambda: sum(1 for _ in engine.generate(prompt, max_tokens=new_tokens, temperature=0)))
        hf_rate, hf_cpu, hf_n = best(lambda: len(_greedy_hf(hf, prompt, new_tokens, stop=False)))
    finally:
        model.compute_dtype = saved
    # The engine stops early at <|assistant_end|>/<|bos|>; the rate is per token either way.
    result = {"engine_tok_s": engine_rate, "hf_tok_s": hf_rate, "speedup": engine_rate / hf_rate,
              "engine_tok_per_cpu_s": engine_cpu, "hf_tok_per_cpu_s": hf_cpu, "speedup_cpu_time": engine_cpu / hf_cpu,
              "prompt_tokens": len(prompt), "new_tokens": new_tokens, "engine_tokens": engine_n, "hf_tokens": hf_n,
              "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    log(f"decode speed at batch 1 ({result['dtype']}, {result['threads']} thread(s), {len(prompt)}-token prompt, "
        f"{new_tokens} new tokens): engine {engine_rate:.1f} tok/s vs transformers generate {hf_rate:.1f} tok/s, "
        f"{result['speedup']:.2f}x (CPU time: {engine_cpu:.1f} vs {hf_cpu:.1f}, {result['speedup_cpu_time']:.2f}x)")
    return result
