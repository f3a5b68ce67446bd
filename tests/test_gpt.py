"""The model: the fused loss against PyTorch's reference cross-entropy, attention paths against each
other, init and accounting, and that a tiny model actually learns."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig, build_model, linear_cross_entropy
from nanochat.attention import attention, window_sizes


def reference_ce(x, W, t, softcap, reduction="mean"):
    logits = x @ W.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, t, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("softcap", [15.0, 0.0])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_loss_matches_reference(softcap, compiled):
    torch.manual_seed(0)
    N, d, V = 1100, 32, 600  # several chunks (chunk_rows(600) = 27962 rows would be one: force small V budget)
    x = torch.randn(N, d, requires_grad=True)
    W = torch.randn(V, d, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::5] = -1
    ours = linear_cross_entropy(x, W, t, softcap, compiled=compiled)
    g_ours = torch.autograd.grad(ours, [x, W])
    ref = reference_ce(x, W, t, softcap)
    g_ref = torch.autograd.grad(ref, [x, W])
    assert abs(ours.item() - ref.item()) < 1e-5
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    per_tok = linear_cross_entropy(x.detach(), W.detach(), t, softcap, "none", compiled=compiled)
    assert torch.allclose(per_tok, reference_ce(x.detach(), W.detach(), t, softcap, "none"), atol=1e-5)
    assert (per_tok[t < 0] == 0).all()


def test_per_token_loss_compiles_once_for_ragged_sizes():
    """Validation batches padded to their longest row give the loss-only kernel a new row count each
    time; it must go dynamic after the first change, not recompile per size until dynamo gives up."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    import nanochat.gpt as gpt
    torch._dynamo.reset()
    gpt._compile.cache_clear()
    counters.clear()
    torch.manual_seed(2)
    W = torch.randn(600, 32)
    for N in (900, 700, 650, 500, 410, 333, 301, 250, 199, 123):  # more sizes than the recompile limit (8)
        x, t = torch.randn(N, 32), torch.randint(-1, 600, (N,))
        ours = linear_cross_entropy(x, W, t, 15.0, "none", compiled=True)
        ref = reference_ce(x, W, t.clamp(min=0), 15.0, "none") * (t >= 0)
        assert torch.allclose(ours, ref, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_fused_loss_multi_chunk_and_weights(monkeypatch):
    import nanochat.gpt as gpt
    monkeypatch.setattr(gpt, "chunk_rows", lambda V, budget=None: 64)  # force many chunks
    torch.manual_seed(1)
    x = torch.randn(300, 16, requires_grad=True)
    W = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    w = torch.randn(300)
    ours = gpt.linear_cross_entropy(x, W, t, 15.0, weights=w)
    ref = (reference_ce(x, W, t, 15.0, "none") * w).sum()
    g1, g2 = torch.autograd.grad(ours, [x, W]), torch.autograd.grad(ref, [x, W])
    assert abs(ours.item() - ref.item()) < 1e-4
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))


def test_all_masked_targets_give_zero_loss_and_grad():
    x = torch.randn(10, 8, requires_grad=True)
    W = torch.randn(20, 8, requires_grad=True)
    t = torch.full((10,), -1)
    loss = linear_cross_entropy(x, W, t, 15.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert (x.grad == 0).all() and (W.grad == 0).all()


def small_config(**kw):
    base = dict(sequence_len=64, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, window_pattern="SL")
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("gqa", [False, True])
def test_explicit_cpu_attention_matches_sdpa(window, gqa):
    torch.manual_seed(0)
    B, T, H, D = 2, 17, 4, 8
    Hkv = 2 if gqa else 4
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, requires_grad=True)
    train_path = attention(q, k, v, window)  # requires_grad on CPU: explicit path
    with torch.no_grad():
        sdpa_path = attention(q.detach(), k.detach(), v.detach(), window)
    # brute force: every query attends to allowed keys only
    kk, vv = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    ref = torch.zeros(B, T, H, D)
    for i in range(T):
        lo = 0 if window is None else max(0, i - window + 1)
        s = torch.einsum("bhd,bthd->bht", q[:, i], kk[:, lo:i + 1]) / math.sqrt(D)
        ref[:, i] = torch.einsum("bht,bthd->bhd", s.softmax(-1), vv[:, lo:i + 1])
    assert torch.allclose(train_path, ref, atol=1e-5)
    assert torch.allclose(sdpa_path, ref, atol=1e-5)


def test_window_sizes():
    cfg = GPTConfig(sequence_len=2048, n_layer=6, window_pattern="SSSL")
    assert window_sizes(cfg) == [512, 512, 512, None, 512, None]  # last layer always full
    assert window_sizes(GPTConfig(sequence_len=2048, n_layer=2, window_pattern="L")) == [None, None]


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4, n_kv_head=4)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="n_layer=0"):
        GPTConfig(n_layer=0)


def test_meta_init_is_deterministic_and_complete():
    cfg = small_config()
    torch.manual_seed(3)
    a = build_model(cfg, "cpu")
    torch.manual_seed(3)
    b = build_model(cfg, "cpu")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
        assert torch.isfinite(p).all(), n
    # residual scalars and zero-init projections are set by init_weights, not lost to the meta device
    assert torch.all(a.resid_lambdas == 1.0) and torch.all(a.x0_lambdas == 0.1)
    assert torch.all(a.transformer.h[0].mlp.c_proj.weight == 0)


def test_param_and_flop_accounting():
    cfg = small_config(window_pattern="L")
    m = build_model(cfg, "cpu")
    c = m.num_params()
    d, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    kvd = cfg.n_kv_head * cfg.head_dim
    linear = L * (d * d * 2 + d * kvd * 2 + 8 * d * d) + sum(32 * cfg.n_kv_head for i in range(L) if i % 2 == (L - 1) % 2) + V * d
    assert m.matmul_params() == linear
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert c["scaling"] == c["transformer_matrices"] + c["lm_head"]
    assert m.flops_per_token() == 6 * linear + L * 12 * cfg.n_head * cfg.head_dim * cfg.sequence_len


def test_logits_and_loss_agree():
    torch.manual_seed(0)
    m = build_model(small_config(), "cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    idx = torch.randint(0, 97, (2, 20))
    tgt = torch.randint(0, 97, (2, 20))
    logits = m(idx)
    ref = F.cross_entropy(logits.view(-1, 97), tgt.view(-1))
    assert abs(m(idx, tgt).item() - ref.item()) < 1e-5


def test_tiny_model_learns_and_bf16_path_runs():
    torch.manual_seed(0)
    cfg = small_config()
    for dtype in (torch.float32, torch.bfloat16):
        m = build_model(cfg, "cpu", dtype)
        opt = m.setup_optimizer(unembedding_lr=0.02, embedding_lr=0.3, matrix_lr=0.02)
        # a learnable sequence task: next token = (token + 1) mod V
        losses = []
        for step in range(40):
            x = torch.randint(0, 97, (8, 32))
            y = (x + 1) % 97
            loss = m(x, y)
            loss.backward()
            opt.step()
            m.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (dtype, losses[0], losses[-1])
