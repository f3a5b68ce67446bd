"""
One optimizer for the whole model: Muon for the 2-D matrices inside the transformer blocks, AdamW for
everything else (embeddings, lm_head, scalars). The same class runs on one process and sharded across
torchrun ranks (ZeRO-2 style), so the two can never drift apart: gradients are reduce-scattered
(averaged) so each rank holds only the slice it owns (rows of an AdamW tensor, whole matrices of a Muon
shape-group), each rank updates its slice with its slice of the state, and the parameters are
all-gathered back. With one process the communication is skipped; small or indivisible AdamW tensors
are all-reduced and updated everywhere (their state is tiny and replicated).

Muon (Jordan et al. 2024): Nesterov momentum, then the update is replaced by the nearest
semi-orthogonal matrix U V^T, approximated by a few matrix polynomials: Polar Express coefficients
(Amsel et al. 2025), which converge faster, or the classic quintic Newton-Schulz ones.
"""

import torch
import torch.distributed as dist

# Per-iteration (a, b, c) for X <- a X + (b A + c A^2) X with A = X X^T.
# Polar Express, 5 iterations, safety factor 2e-2 (values as published for nanochat/modded-nanogpt).
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# Keller Jordan's quintic Newton-Schulz coefficients (the original Muon), used 5 times.
NEWTON_SCHULZ = [(3.4445, -4.7750, 2.0315)] * 5


# The only collectives: all_reduce, reduce-scatter, all-gather of single tensors, async with work.wait()
# (gloo has no get_future() for reduce-scatter). torch 2.13 renamed the last two *_single; older: *_tensor.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _pad_rows(x, n):
    """x with zero matrices appended along dim 0 up to n rows (the padding slots of a muon group)."""
    return torch.cat([x, x.new_zeros(n - x.size(0), *x.shape[1:])]) if x.size(0) < n else x


def orthogonalize(G, method="polar", dtype=torch.bfloat16):
    """Approximate U V^T for a stack of matrices G (..., m, n), wide side up so A is the small Gram."""
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # Frobenius norm bounds the spectral norm, so all singular values start in [0, 1].
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in (POLAR_EXPRESS if method == "polar" else NEWTON_SCHULZ):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class MuonAdamW(torch.optim.Optimizer):
    """param_groups: dicts with kind="adamw" (lr, betas, eps, weight_decay) or kind="muon" (lr, momentum,
    weight_decay; all params of one muon group share a shape). Every group may carry "names" (parameter
    names, used by the checkpoint format). Hyperparameters can be changed between steps (schedules)."""

    def __init__(self, param_groups, rank=0, world_size=1, ortho="polar", ortho_dtype=torch.bfloat16):
        for g in param_groups:
            if g.get("kind") not in ("adamw", "muon"):
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {g.get('kind')!r}")
            if g["kind"] == "muon" and len({tuple(p.shape) for p in g["params"]}) != 1:
                raise ValueError("all parameters of a muon group must have the same shape")
            g.setdefault("names", [f"p{id(p)}" for p in g["params"]])
            g.setdefault("initial_lr", g["lr"])
        super().__init__(param_groups, {})
        if ortho not in ("polar", "ns"):
            raise ValueError(f"ortho must be 'polar' or 'ns', got {ortho!r}")
        self.rank, self.world_size, self.ortho, self.ortho_dtype = rank, world_size, ortho, ortho_dtype

    def _adamw_sharded(self, p):
        return self.world_size > 1 and p.numel() >= 1024 and p.size(0) % self.world_size == 0

    def _muon_slice(self, group):
        """(padded count, [start, end) of the matrices this rank owns) for a muon group."""
        per = -(-len(group["params"]) // self.world_size)  # ceil
        return per * self.world_size, per * self.rank, per * self.rank + per

    @torch.no_grad()
    def step(self):
        W = self.world_size
        jobs = []  # (group, param or None for a muon group, local gradient, comm work or None)
        # Phase 1: launch every gradient reduction at once so communication overlaps.
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g, work = p.grad, None
                    if self._adamw_sharded(p):
                        g = torch.empty((p.size(0) // W, *p.shape[1:]), dtype=p.grad.dtype, device=p.grad.device)
                        work = _reduce_scatter(g, p.grad.contiguous(), op=dist.ReduceOp.SUM, async_op=True)
                    elif W > 1:
                        work = dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True)
                    jobs.append((group, p, g, work))
            elif all(p.grad is not None for p in group["params"]):
                g, work = torch.stack([p.grad for p in group["params"]]), None
                if W > 1:
                    full = _pad_rows(g, self._muon_slice(group)[0])
                    g = full.new_empty(full.size(0) // W, *full.shape[1:])
                    work = _reduce_scatter(g, full, op=dist.ReduceOp.SUM, async_op=True)
                jobs.append((group, None, g, work))
        # Phase 2: as each reduction lands, update the owned slice and launch its all-gather.
        gathers = []
        for group, p, g, work in jobs:
            if work is not None:
                work.wait()
                g.div_(W)
            if p is not None and self._adamw_sharded(p):
                n = p.size(0) // W
                own = p.data[self.rank * n:(self.rank + 1) * n]
                self._adamw_update(group, p, own, g)
                gathers.append((None, None, _all_gather(p.data, own.clone(), async_op=True)))
            elif p is not None:
                self._adamw_update(group, p, p.data, g)
            else:
                padded, start, end = self._muon_slice(group)
                owned = group["params"][start:end]
                if owned:
                    self._muon_update(group, owned, g[:len(owned)])
                if W > 1:  # padding slots ship zeros, dropped on receipt
                    local = _pad_rows(torch.stack([q.data for q in owned]) if owned else g[:0], end - start)
                    full = local.new_empty(padded, *local.shape[1:])
                    gathers.append((group, full, _all_gather(full, local.contiguous(), async_op=True)))
        # Phase 3: copy gathered parameters into place.
        for group, buf, work in gathers:
            work.wait()
            if group is not None:  # a muon group; AdamW rows were gathered straight into the parameter
                for i, q in enumerate(group["params"]):
                    q.data.copy_(buf[i])

    def _adamw_update(self, group, p, data, grad):
        """AdamW on `data` (a parameter or the owned rows of one), fp32 math whatever the storage."""
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(data, dtype=torch.float32),
                         exp_avg_sq=torch.zeros_like(data, dtype=torch.float32))
        state["step"] += 1
        t, (beta1, beta2), m, v = state["step"], group["betas"], state["exp_avg"], state["exp_avg_sq"]
        lr, wd, eps, g = group["lr"], group["weight_decay"], group["eps"], grad.float()
        m.lerp_(g, 1 - beta1)
        v.lerp_(g.square(), 1 - beta2)
        # Bias-correct both moments before adding eps (modded-nanogpt's AdamW, as first copied
        # upstream, added eps to the un-corrected second moment).
        denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
        p32 = data.float()
        if wd:
            p32.mul_(1 - lr * wd)  # decoupled weight decay
        p32.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        data.copy_(p32)

    def _muon_update(self, group, params, grads):
        """Muon on this rank's stack of same-shape matrices (state kept under the group's first param)."""
        state = self.state[group["params"][0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grads, dtype=torch.float32)
        buf = state["momentum_buffer"]
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        g = grads.float()
        buf.lerp_(g, 1 - mu)
        g = g.lerp_(buf, mu)  # Nesterov: look ahead along the momentum
        u = orthogonalize(g, self.ortho, self.ortho_dtype).float()
        rows, cols = g.shape[-2:]
        lr_eff = lr * max(1.0, rows / cols) ** 0.5  # tall matrices (MLP up-projection) get a larger step
        for i, p in enumerate(params):
            p32 = p.data.float()
            if wd:
                # Cautious weight decay: only where the update already shrinks the weight.
                p32.sub_(p32 * (u[i] * p32 > 0) * (lr_eff * wd))
            p32.sub_(u[i], alpha=lr_eff)
            p.data.copy_(p32)

    def state_bytes(self):
        """Bytes of optimizer state on this rank (~1/world_size of the total, plus replicated scalars)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if torch.is_tensor(v))

    # ------------------------------------------------------------------ checkpoints (any world size)
    def shard_state_dict(self):
        """This rank's state by parameter name, reassemblable on any number of ranks. Every tensor of a
        parameter's state is saved (a sharded AdamW tensor's rows; a Muon group's owned matrices stacked
        along dim 0), so state added to the update rules later reshards without changes here."""
        def saved(st, **extra):
            return {**{k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}, **extra}
        out = {"rank": self.rank, "world_size": self.world_size, "adamw": {}, "muon": {}}
        for group in self.param_groups:
            first = group["params"][0]
            if group["kind"] == "adamw":
                for name, p in zip(group["names"], group["params"]):
                    if self.state.get(p):
                        out["adamw"][name] = saved(self.state[p], sharded=self._adamw_sharded(p))
            elif self.state.get(first):
                out["muon"][group["names"][0]] = saved(self.state[first], start=self._muon_slice(group)[1],
                                                       count=len(group["params"]))
        return out

    def load_shard_state_dicts(self, shards):
        """Rebuild this rank's state from the shards saved by every rank of a run of any size."""
        shards = sorted(shards, key=lambda s: s["rank"])
        saved_world = shards[0]["world_size"]
        if len(shards) != saved_world or [s["rank"] for s in shards] != list(range(saved_world)):
            raise ValueError(f"optimizer checkpoint is incomplete: expected shards of ranks 0..{saved_world - 1}, "
                             f"got ranks {[s['rank'] for s in shards]}")
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for name, p in zip(group["names"], group["params"]):
                    parts = [s["adamw"].get(name) for s in shards]
                    if parts[0] is None:
                        continue
                    state = {k: v for k, v in parts[0].items() if k != "sharded" and not torch.is_tensor(v)}
                    for key in [k for k, v in parts[0].items() if torch.is_tensor(v)]:
                        # saved sharded: rank order = row order; saved replicated: every rank has it all
                        full = torch.cat([q[key] for q in parts]) if parts[0]["sharded"] else parts[0][key]
                        if full.shape != p.shape:
                            raise ValueError(f"optimizer state {key} of {name} has shape {tuple(full.shape)}, the "
                                             f"parameter {tuple(p.shape)}: the checkpoint is of a different model")
                        if self._adamw_sharded(p):
                            n = p.size(0) // self.world_size
                            full = full[self.rank * n:(self.rank + 1) * n]
                        state[key] = full.clone().to(p.device)
                    self.state[p] = state
            else:
                name, K = group["names"][0], len(group["params"])
                # ranks that owned only padding slots saved nothing for this group
                parts = [s["muon"][name] for s in shards if name in s["muon"]]
                if not parts:
                    continue
                if parts[0]["count"] != K:
                    raise ValueError(f"optimizer state of the {name} group covers {parts[0]['count']} matrices, the "
                                     f"model has {K}: the checkpoint is of a different model")
                _, start, end = self._muon_slice(group)
                first = group["params"][0]
                self.state[first] = {key: torch.cat([q[key] for q in parts])[start:min(end, K)].clone().to(first.device)
                                     if torch.is_tensor(v) else v
                                     for key, v in parts[0].items() if key not in ("start", "count")}
