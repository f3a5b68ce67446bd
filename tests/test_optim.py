"""MuonAdamW on a single process: AdamW against torch.optim.AdamW, Muon's orthogonalisation, convergence
on a known problem, schedules at their edges, and the checkpoint round trip of the optimizer state."""

import torch

from nanochat.optim import MuonAdamW, orthogonalize
from nanochat.training import lr_multiplier, muon_momentum


def test_adamw_matches_torch():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(64, 16))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = MuonAdamW([{"kind": "adamw", "params": [p1], "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-8,
                       "weight_decay": 0.1}])
    ref = torch.optim.AdamW([p2], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(10):
        g = torch.randn(64, 16)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(p1, p2, atol=1e-6)


def test_orthogonalize_gives_near_unit_singular_values():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 128), (128, 32)]:
        G = torch.randn(*shape)
        for method in ("polar", "ns"):
            s = torch.linalg.svdvals(orthogonalize(G, method, torch.float32))
            # random matrices have a few tiny singular values that 5 iterations cannot lift all the way;
            # the bulk must land near 1 (Newton-Schulz deliberately oscillates in about [0.7, 1.2])
            lo = torch.quantile(s, 0.1)
            assert s.max() < 1.3 and lo > (0.8 if method == "polar" else 0.6), (shape, method, lo, s.max())


def test_muon_and_adamw_converge_on_least_squares():
    torch.manual_seed(0)
    W_true = torch.randn(32, 48)
    W = torch.nn.Parameter(torch.zeros(32, 48))
    b_true = torch.randn(48)
    b = torch.nn.Parameter(torch.zeros(48))
    opt = MuonAdamW([{"kind": "muon", "params": [W], "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0},
                     {"kind": "adamw", "params": [b], "lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}],
                    ortho_dtype=torch.float32)
    X = torch.randn(256, 32)
    Y = X @ W_true + b_true
    start = ((X @ W + b - Y) ** 2).mean().item()
    for i in range(200):
        for g in opt.param_groups:  # Muon's step has a fixed size: it converges as the LR decays
            g["lr"] = g["initial_lr"] * (1 - i / 200)
        loss = ((X @ W + b - Y) ** 2).mean()
        loss.backward()
        opt.step()
        W.grad = b.grad = None
    end = ((X @ W + b - Y) ** 2).mean().item()
    assert end < 0.02 * start, (start, end)


def test_schedules_at_edges():
    # warmup ramps up, then flat, then decays DOWN to final frac (upstream once interpolated
    # the wrong way, ramping up to 1 instead of decaying)
    N = 100
    assert lr_multiplier(0, N, 10, 0.5, 0.1) == 0.1
    assert lr_multiplier(9, N, 10, 0.5, 0.1) == 1.0
    assert lr_multiplier(30, N, 10, 0.5, 0.1) == 1.0
    mid = lr_multiplier(75, N, 10, 0.5, 0.1)
    assert 0.1 < mid < 1.0
    assert abs(lr_multiplier(99, N, 10, 0.5, 0.1) - 0.1) < 1e-9
    assert all(lr_multiplier(s + 1, N, 10, 0.5, 0.1) <= lr_multiplier(s, N, 10, 0.5, 0.1) for s in range(10, 99))
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == muon_momentum(1000) == 0.95


def test_state_round_trip_continues_identically():
    torch.manual_seed(0)

    def make():
        torch.manual_seed(1)
        W = torch.nn.Parameter(torch.randn(16, 16))
        b = torch.nn.Parameter(torch.randn(2048))  # large enough to be a shardable AdamW tensor
        groups = [{"kind": "muon", "params": [W], "names": ["W"], "lr": 0.02, "momentum": 0.95, "weight_decay": 0.1},
                  {"kind": "adamw", "params": [b], "names": ["b"], "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10,
                   "weight_decay": 0.0}]
        return W, b, MuonAdamW(groups, ortho_dtype=torch.float32)

    grads = [(torch.randn(16, 16), torch.randn(2048)) for _ in range(6)]
    W, b, opt = make()
    for gw, gb in grads[:3]:
        W.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    saved = opt.shard_state_dict()
    snapshot = (W.detach().clone(), b.detach().clone())
    for gw, gb in grads[3:]:
        W.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    W2, b2, opt2 = make()
    with torch.no_grad():
        W2.copy_(snapshot[0])
        b2.copy_(snapshot[1])
    opt2.load_shard_state_dicts([saved])
    for gw, gb in grads[3:]:
        W2.grad, b2.grad = gw.clone(), gb.clone()
        opt2.step()
    assert torch.equal(W, W2) and torch.equal(b, b2)
