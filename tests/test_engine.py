"""Tests of nanochat/engine.py: the KV-cache decode against the naive full recomputation, sampling,
the python tool state machine, the inference weight copy, prompt rendering and streaming text."""

import pytest
import torch

import nanochat.engine as engine_mod
from nanochat.engine import (Engine, KVCache, ContextLimitError, TextStream, last_logits,
                             prepare_for_inference, render_prompt, reply_content, sample_next)
from nanochat.gpt import GPTConfig, build_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """(model, tokenizer) of the session's trained d2 checkpoint, fp32 so cached and naive agree exactly."""
    from nanochat.checkpoint import load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(tiny_run))
        model, tokenizer, _ = load_model("base", "cpu", compute_dtype=torch.float32)
    return prepare_for_inference(model), tokenizer


@pytest.fixture(scope="module")
def text_prompts(shared_data):
    """51 real text snippets: three lines from each of the 17 Gutenberg books."""
    prompts = []
    for path in sorted((shared_data / "pretrain_text" / "nltk_gutenberg").glob("*.txt")):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        lines = [ln for ln in lines if len(ln) >= 30]
        prompts += [lines[len(lines) * k // 4] for k in (1, 2, 3)]
    return prompts


class FakeTokenizer:
    """Special-token ids past the vocabulary: a random model can then never finish a row early."""

    def __init__(self, vocab_size):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
        self.ids = {n: vocab_size + i for i, n in enumerate(names)}

    def encode_special(self, s):
        return self.ids[s]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]


def random_model(seed=0, dtype=torch.float32, **overrides):
    """A random-init model whose every weight is non-zero (the real init zeroes the output projections,
    which would make attention irrelevant to the output and the cache comparisons vacuous)."""
    cfg = dict(sequence_len=256, vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**cfg), "cpu", dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 if "wte" in name or "value_embeds" in name else p.size(1) ** -0.5)
    return model


def greedy_engine(model, tokenizer, prompt, n, num_samples=1):
    return [col for col, _ in Engine(model, tokenizer).generate(prompt, num_samples=num_samples, max_tokens=n, temperature=0)]


def greedy_engine_of(engine, prompt, n):
    return [col for col, _ in engine.generate(prompt, max_tokens=n, temperature=0)]


def assert_cache_matches_full(model, ids, split):
    """Logits of every position from prefill(ids[:split]) + one-token decode steps == full forward."""
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]
        cache = KVCache.for_model(model, 1, len(ids))
        got = [last_logits(model, torch.tensor([ids[:split]]), cache)[0]]
        for t in ids[split:-1]:
            got.append(last_logits(model, torch.tensor([[t]]), cache)[0])
    torch.testing.assert_close(torch.stack(got), full[split - 1:-1], atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# 1. cached decoding == naive recomputation

def test_greedy_matches_naive_on_real_prompts(tiny, text_prompts):
    model, tokenizer = tiny
    assert len(text_prompts) >= 50
    n = 10
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    distinct = set()
    for text in text_prompts:
        prompt = tokenizer.encode(text, prepend="<|bos|>")[:32]
        naive = list(model.generate(prompt, max_tokens=n, temperature=0))
        cached = [col[0] for col in greedy_engine(model, tokenizer, prompt, n)]
        assert cached == naive[:len(cached)], text
        if len(cached) < n:  # the engine stops only at a terminal token
            assert cached[-1] in stops
        distinct.add(tuple(cached))
    assert len(distinct) > 5  # the prompts really steer the model, so the comparison is not vacuous


def test_batched_rows_match_naive(tiny, text_prompts):
    model, tokenizer = tiny
    for text in text_prompts[:5]:
        prompt = tokenizer.encode(text, prepend="<|bos|>")[:40]
        naive = list(model.generate(prompt, max_tokens=8, temperature=0))
        columns = greedy_engine(model, tokenizer, prompt, 8, num_samples=3)
        for r in range(3):
            row = [col[r] for col in columns]
            assert row[:len(naive)] == naive[:len(row)]


def test_cached_logits_match_full_forward_trained(tiny, text_prompts):
    model, tokenizer = tiny
    ids = tokenizer.encode(" ".join(text_prompts[:4]), prepend="<|bos|>")[:100]
    assert_cache_matches_full(model, ids, split=30)


def test_gqa_cache_matches_naive():
    model = random_model(n_head=4, n_kv_head=2)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_cache_matches_full(model, prompt + list(range(40)), split=20)
    naive = list(model.generate(prompt, max_tokens=30, temperature=0))
    assert [c[0] for c in greedy_engine(model, FakeTokenizer(512), prompt, 30)] == naive
    assert [c[1] for c in greedy_engine(model, FakeTokenizer(512), prompt, 30, num_samples=2)] == naive


def test_sliding_window_cache_matches_naive():
    # sequence_len 512 -> short window 128 on layer 0; the sequence runs past it, so a decode step that
    # attended to every cached key instead of the last window+1 would give other logits
    model = random_model(sequence_len=512, n_layer=3, window_pattern="SL")
    assert model.windows == [128, None, None]
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 512, (150,), generator=gen).tolist()
    ids = prompt + torch.randint(0, 512, (30,), generator=gen).tolist()
    assert_cache_matches_full(model, ids, split=150)
    naive = list(model.generate(prompt, max_tokens=20, temperature=0))
    assert [c[0] for c in greedy_engine(model, FakeTokenizer(512), prompt, 20)] == naive
    # the window really matters here: the same weights with full attention give other logits
    with torch.inference_mode():
        windowed = model(torch.tensor([ids]))[0, -1]
        model.windows = [None] * 3
        full = model(torch.tensor([ids]))[0, -1]
    assert not torch.allclose(windowed, full, atol=1e-3)


# -----------------------------------------------------------------------------
# 2. sampling

def test_sampling_reproducible_and_rows_independent(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The king said", prepend="<|bos|>")
    a = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=7)
    b = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=7)
    c = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=8)
    assert a == b
    assert a[0] != c[0]
    assert len({tuple(s) for s in a[0]}) > 1  # rows differ
    for seq, mask in zip(*a):
        assert seq[:len(prompt)] == prompt and len(seq) == len(mask) <= len(prompt) + 16
        assert mask[:len(prompt)] == [0] * len(prompt) and set(mask[len(prompt):]) <= {1}


def test_first_token_sampled_per_row():
    # sampling the first token once from the prefill and copying it to every row makes all rows start alike
    model = random_model()
    cols = list(Engine(model, FakeTokenizer(512)).generate([1, 2, 3], num_samples=32, max_tokens=1, temperature=1.0))
    assert len(cols) == 1 and len(set(cols[0][0])) > 4


def test_greedy_is_seed_independent(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("It was a dark and stormy night", prepend="<|bos|>")
    a, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=0, seed=1)
    b, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=0, seed=2)
    assert a == b and a[0] == a[1] == a[2]
    # top_k=1 and a tiny top_p both leave only the argmax
    k1, _ = engine.generate_batch(prompt, max_tokens=10, temperature=1.0, top_k=1, seed=3)
    p0, _ = engine.generate_batch(prompt, max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    assert k1[0] == p0[0] == a[0]


def test_top_k_respected():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    allowed = torch.topk(logits, 5).indices
    rng = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(4)]
    for _ in range(200):
        tok = sample_next(logits, rng, temperature=2.0, top_k=5)
        for r in range(4):
            assert tok[r].item() in allowed[r].tolist()
            seen[r].add(tok[r].item())
    assert all(len(s) > 1 for s in seen)


@pytest.mark.parametrize("top_k", [None, 0, -1])
def test_top_k_disabled(top_k):
    # top_k=0 must not reach torch.topk (which fails for k=0): None/<=0 means "no filter"
    logits = torch.zeros(1, 50)
    rng = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, rng, 1.0, top_k).item() for _ in range(100)}
    assert len(seen) > 30


def test_top_p_respected():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    rng = torch.Generator().manual_seed(0)
    for top_p, allowed in ((0.45, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (1.0, {0, 1, 2, 3})):
        seen = {sample_next(logits, rng, 1.0, None, top_p).item() for _ in range(400)}
        assert seen == allowed, top_p
    # combined with top_k: the nucleus is taken within the k candidates
    seen = {sample_next(logits, rng, 1.0, 2, 0.99).item() for _ in range(200)}
    assert seen == {1, 3}


def test_max_tokens_and_bad_arguments(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("Hello", prepend="<|bos|>")
    assert len(list(engine.generate(prompt, max_tokens=5, temperature=0.8))) <= 5
    assert list(engine.generate(prompt, max_tokens=0)) == []
    seqs, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=3, temperature=1.0)
    assert all(len(s) <= len(prompt) + 3 for s in seqs)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=-2), dict(num_samples=0)):
        with pytest.raises(ValueError):
            engine.generate(prompt, **bad)  # checked at the call, before iteration
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([])


def test_context_limit_stops_cleanly():
    model = random_model(sequence_len=64)
    engine = Engine(model, FakeTokenizer(512))
    prompt = list(range(1, 57))
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=100, temperature=1.0)
    assert [len(s) for s in seqs] == [64, 64]  # filled the context exactly, no error
    assert len(list(engine.generate(list(range(1, 64)), max_tokens=10))) == 1
    with pytest.raises(ValueError, match="context is 64"):
        engine.generate(list(range(1, 65)))


# -----------------------------------------------------------------------------
# 3. the python tool

def scripted_logits(tokenizer, code, after):
    """A stand-in for last_logits that makes the 'model' write <|python_start|> code <|python_end|>,
    then, once it has been fed <|output_end|>, the tokens of `after` and <|assistant_end|>."""
    sp = tokenizer.encode_special
    first = [sp("<|python_start|>")] + tokenizer.encode(code) + [sp("<|python_end|>")]
    then = tokenizer.encode(after) + [sp("<|assistant_end|>")]
    state = {}

    def fake(model, ids, kv_cache):
        if kv_cache.pos == 0:  # the prompt, at batch 1
            state["rows"] = None
            fed_rows = [[]]
        else:
            if state["rows"] is None:
                state["rows"] = [[] for _ in range(ids.size(0))]
            for r in range(ids.size(0)):
                state["rows"][r].append(ids[r, -1].item())
            fed_rows = state["rows"]
        kv_cache.advance(ids.size(1))
        logits = torch.full((len(fed_rows), tokenizer.get_vocab_size()), -10.0)
        end = sp("<|output_end|>")
        for r, fed in enumerate(fed_rows):
            if end in fed:
                nxt = then[min(len(fed) - fed.index(end) - 1, len(then) - 1)]
            else:
                nxt = first[min(len(fed), len(first) - 1)]  # while output is forced this is ignored
            logits[r, nxt] = 10.0
        return logits
    return fake


@pytest.mark.parametrize("num_samples", [1, 2])
def test_tool_call_output_is_forced(tiny, monkeypatch, num_samples):
    model, tokenizer = tiny
    sp = tokenizer.encode_special
    monkeypatch.setattr(engine_mod, "last_logits", scripted_logits(tokenizer, "print(6*7)", " So 42."))
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    seqs, masks = Engine(model, tokenizer).generate_batch(prompt, num_samples=num_samples, max_tokens=60, temperature=0)
    call = [sp("<|python_start|>")] + tokenizer.encode("print(6*7)") + [sp("<|python_end|>")]
    output = [sp("<|output_start|>")] + tokenizer.encode("42") + [sp("<|output_end|>")]
    after = tokenizer.encode(" So 42.")
    for seq, mask in zip(seqs, masks):
        assert seq[len(prompt):] == call + output + after
        assert mask[len(prompt):] == [1] * len(call) + [0] * len(output) + [1] * len(after)
        content = reply_content(tokenizer, seq[len(prompt):])
        assert content == [{"type": "python", "text": "print(6*7)"}, {"type": "python_output", "text": "42"},
                           {"type": "text", "text": " So 42."}]


def test_tool_error_is_shown_to_the_model(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(engine_mod, "last_logits", scripted_logits(tokenizer, "1/0", " oops"))
    prompt = tokenizer.encode("x", prepend="<|bos|>")
    seqs, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=80, temperature=0)
    parts = reply_content(tokenizer, seqs[0][len(prompt):])
    assert parts[1]["type"] == "python_output" and "ZeroDivisionError" in parts[1]["text"]


# -----------------------------------------------------------------------------
# KV cache, weights, rendering, streaming

def test_kv_cache_protocol():
    cache = KVCache(batch_size=3, num_layers=2, max_len=5, num_kv_heads=2, head_dim=4, device="cpu", dtype=torch.bfloat16)
    one = KVCache(batch_size=1, num_layers=2, max_len=4, num_kv_heads=2, head_dim=4, device="cpu", dtype=torch.bfloat16)
    k, v = torch.randn(1, 3, 2, 4).bfloat16(), torch.randn(1, 3, 2, 4).bfloat16()
    for layer in range(2):
        ks, vs = one.update(layer, k + layer, v)
        assert torch.equal(ks, k + layer) and ks.shape == (1, 3, 2, 4)
    one.advance(3)
    cache.prefill(one)
    assert cache.pos == 3
    for row in range(3):
        assert torch.equal(cache.k[1, row, :3], (k + 1)[0]) and torch.equal(cache.v[0, row, :3], v[0])
    k2 = torch.randn(3, 2, 2, 4).bfloat16()
    ks, _ = cache.update(0, k2, k2)
    assert ks.shape == (3, 5, 2, 4) and torch.equal(ks[:, 3:], k2) and torch.equal(ks[2, :3], k[0])
    cache.advance(2)
    with pytest.raises(ContextLimitError, match="full"):
        cache.update(0, k2[:, :1], k2[:, :1])


def test_cache_uses_compute_dtype():
    # Never a hard-coded bf16 (which broke MPS and fp32 inference): the compute dtype off the CPU; on the CPU fp32,
    # whose attention kernel decodes faster, and which attention() reads under any compute dtype.
    for dtype in (torch.bfloat16, torch.float32):
        model = random_model(dtype=dtype)
        assert KVCache.for_model(model, 2, 10).k.dtype == torch.float32
    meta = random_model(dtype=torch.bfloat16).to("meta")
    assert KVCache.for_model(meta, 2, 10).k.dtype == torch.bfloat16


def test_inference_copy_tracks_master_weights():
    """bf16 compute on fp32 master weights: the engine runs a bf16 copy (same tokens as casting the
    model itself), leaves the master untouched, and re-syncs when training changes the weights."""
    model = random_model(dtype=torch.bfloat16)
    tok = FakeTokenizer(512)
    prompt = list(range(10, 30))
    engine = Engine(model, tok)
    before = greedy_engine(model, tok, prompt, 12)
    assert [c for c in engine.generate(prompt, max_tokens=12, temperature=0)] == [(c, [1]) for c in before]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # an in-place "optimizer step"
    after = [c for c, _ in engine.generate(prompt, max_tokens=12, temperature=0)]
    assert after != before
    reference = prepare_for_inference(random_model(dtype=torch.bfloat16))
    with torch.no_grad():
        reference.lm_head.weight.mul_(-1)
    assert after == greedy_engine(reference, tok, prompt, 12)


def test_refresh_weights_after_writes_through_data():
    """The optimizers write through .data, which bumps no version counter: a long-lived engine keeps
    sampling the old weights until refresh_weights() copies the new ones into its copy, in place."""
    model = random_model(dtype=torch.bfloat16)  # fp32 master, bf16 compute: the engine runs a copy
    tok = FakeTokenizer(512)
    prompt = list(range(10, 30))
    engine = Engine(model, tok)
    before = greedy_engine_of(engine, prompt, 12)
    copy_ptrs = [p.data_ptr() for p in engine._copy.parameters()]
    model.lm_head.weight.data.mul_(-1)  # as an optimizer step does it
    model.transformer.h[0].mlp.c_fc.weight.data.mul_(0.5)
    assert greedy_engine_of(engine, prompt, 12) == before  # stale: the change went unseen
    engine.refresh_weights()
    after = greedy_engine_of(engine, prompt, 12)
    assert after == greedy_engine(model, tok, prompt, 12)  # what a fresh Engine samples
    assert after != before
    assert [p.data_ptr() for p in engine._copy.parameters()] == copy_ptrs  # refreshed in place
    shared = Engine(random_model(), tok)  # fp32 compute: the engine runs the model's own tensors
    greedy_engine_of(shared, prompt, 2)
    shared.refresh_weights()
    assert shared._copy is None


@pytest.mark.skipif(not engine_mod._packable(random_model(n_layer=1, dtype=torch.bfloat16)),
                    reason="prepacked weights need a CPU with bf16 support in oneDNN")
def test_packed_linears_are_exact_and_follow_weight_changes():
    model = prepare_for_inference(random_model(dtype=torch.bfloat16))
    plain = random_model(dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())  # same keys: packing adds no state
    assert "forward" in model.lm_head.__dict__ and "forward" not in plain.lm_head.__dict__
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
        for m in (model, plain):
            m.transformer.h[0].mlp.c_fc.weight.mul_(0.5)
        assert torch.equal(model(ids), plain(ids))  # re-packed after the in-place change
    assert model.transformer.h[0].mlp.c_fc.packed_version[1] == model.transformer.h[0].mlp.c_fc.weight._version
    # training a packed model still works: with gradients on, the plain path runs
    model.requires_grad_(True)
    model(ids, targets=ids).backward()
    assert model.lm_head.weight.grad is not None


def test_training_after_generation():
    """RL alternates engine rollouts and optimizer steps on one model: nothing the engine leaves
    behind (e.g. the model's rotary tables) may be unusable by autograd."""
    model = random_model()  # fp32 compute: the engine runs this very model, no copy
    model.train()
    seqs, _ = Engine(model, FakeTokenizer(512)).generate_batch([1, 2, 3], num_samples=2, max_tokens=6, temperature=1.0)
    ids = torch.tensor(seqs)
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.requires_grad


def conversations():
    return [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "content": [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                           {"type": "text", "text": "It is 5."}]},
         {"role": "user", "content": "And times 4? <|assistant_start|>"}],
    ]


def test_render_prompt_agrees_with_render_conversation(tiny):
    _, tokenizer = tiny
    a_start = tokenizer.encode_special("<|assistant_start|>")
    for messages in conversations():
        prompt = render_prompt(tokenizer, messages)
        full, mask = tokenizer.render_conversation({"messages": messages + [{"role": "assistant", "content": "Sure."}]})
        assert full[:len(prompt)] == prompt and prompt[-1] == a_start
        assert full[len(prompt):] == tokenizer.encode("Sure.") + [tokenizer.encode_special("<|assistant_end|>")]
        assert render_prompt(tokenizer, {"messages": messages}) == prompt
    with pytest.raises(ValueError):
        render_prompt(tokenizer, [])


def test_reply_content_round_trip(tiny):
    _, tokenizer = tiny
    for content in ("Plain text reply.", conversations()[2][1]["content"],
                    [{"type": "text", "text": "Let me see."}, {"type": "python", "text": "'banana'.count('a')"},
                     {"type": "python_output", "text": "3"}, {"type": "text", "text": " Three."}]):
        conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}
        ids, _ = tokenizer.render_conversation(conv)
        reply = ids[len(render_prompt(tokenizer, conv["messages"][:1])):-1]
        assert reply_content(tokenizer, reply) == content


def test_text_stream_never_emits_partial_characters(tiny):
    _, tokenizer = tiny
    text = "naïve café — 世界 🎉 done"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # characters really are split across tokens
    stream = TextStream(tokenizer)
    pieces = [stream.add(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_bench_infer_smoke(capsys):
    from scripts import bench_infer
    res = bench_infer.main(["--random-init", "--depth=1", "--vocab-size=512", "--max-seq-len=64",
                            "--prompt-tokens=16", "--decode-tokens=4", "--batch-sizes=1,2", "--repeats=1",
                            "--dtype=float32"])
    assert res["prefill_tok_per_s"] > 0 and [b["batch_size"] for b in res["batches"]] == [1, 2]
    assert all(b["steps"] == 4 and b["decode_tok_per_s"] > 0 and b["peak_memory_bytes"] > 0 for b in res["batches"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
