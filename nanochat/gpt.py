"""
The GPT model: config, modules, the fused linear + cross-entropy loss, and FLOPs/parameter accounting.

Architecture (each piece named with where it comes from):
- rotary position embeddings (RoPE, Su et al. 2021), no learned positions
- parameter-free RMSNorm everywhere, including right after the token embedding
- QK norm (RMSNorm on queries and keys after RoPE) for stable attention logits
- ReLU^2 MLP (Primer, So et al. 2021)
- untied token embedding and lm_head, no biases anywhere
- logit softcap c*tanh(z/c) (Gemma 2), computed in fp32
- grouped-query attention (n_kv_head <= n_head)
- optional sliding-window layers from a pattern string like "SSSL" (S = short window, L = full)
- value embeddings on alternating layers, gated per KV head (ResFormer / modded-nanogpt)
- per-layer residual scalars: x = a_i * x + b_i * x0 before every block (modded-nanogpt)

Master weights are fp32; every Linear casts its weight to the activation (compute) dtype: no autocast.
Built on the meta device, then initialised by init_weights(), so nothing set in __init__ is lost.
Attention itself (backends, windows, the KV-cache form) lives in nanochat/attention.py.
"""

import functools
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import attention, window_sizes


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"     # tiled over layers; the last layer is always full context
    value_embeds: bool = True
    resid_scalars: bool = True
    softcap: float = 15.0
    rope_base: float = 100_000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        problems = []
        if self.n_layer < 1:
            problems.append(f"n_layer={self.n_layer} must be >= 1")
        if self.n_head < 1 or self.n_embd % max(self.n_head, 1):
            problems.append(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        elif (self.n_embd // self.n_head) % 2:
            problems.append(f"head_dim={self.n_embd // self.n_head} must be even for RoPE")
        if self.n_kv_head < 1 or self.n_head % max(self.n_kv_head, 1):
            problems.append(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            problems.append(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if self.vocab_size < 2 or self.sequence_len < 1:
            problems.append("vocab_size and sequence_len must be positive")
        if problems:
            raise ValueError("bad model config: " + "; ".join(problems))

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def to_dict(self):
        return asdict(self)


def norm(x, eps=1e-6):
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class Linear(nn.Linear):
    """nn.Linear without bias whose (fp32 master) weight is cast to the input's dtype on the fly."""

    def __init__(self, in_features, out_features, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary(x, cos, sin):
    # Half-split pairing: dimension i rotates with i + D/2. This orientation (x1*cos + x2*sin,
    # x2*cos - x1*sin) is the one transformers' built-in "nanochat" model uses, so exports match.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    VE_GATE_CHANNELS = 32  # the gate looks at the first few channels only: cheap and sufficient

    def __init__(self, config, layer_idx, has_ve, device=None):
        super().__init__()
        self.layer_idx, self.eps = layer_idx, config.norm_eps
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kvd = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = Linear(d, d, device=device)
        self.c_k = Linear(d, kvd, device=device)
        self.c_v = Linear(d, kvd, device=device)
        self.c_proj = Linear(d, d, device=device)
        self.ve_gate = Linear(min(self.VE_GATE_CHANNELS, d), config.n_kv_head, device=device) if has_ve else None

    def project_qkv(self, x):
        """(queries and keys side by side, values). Three matrices, so Muon orthogonalises each alone;
        for inference engine.pack_linears replaces this with one matmul over the concatenated weights."""
        return torch.cat([self.c_q(x), self.c_k(x)], dim=-1), self.c_v(x)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.project_qkv(x)
        v = v.view(B, T, Hkv, D)
        if ve is not None:
            # Gate in (0, 2), exactly 1 at init (zero weights): the value embedding starts fully on.
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        # RoPE and QK norm act on each head alone, so queries and keys go through them together: half
        # the kernel launches, which is most of the cost of a decode step on a CPU.
        qk = norm(apply_rotary(qk.view(B, T, H + Hkv, D), cos, sin), self.eps)
        q, k = qk.split([H, Hkv], dim=2)
        y = attention(q, k, v, window, kv_cache, self.layer_idx)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, device=device)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, device=device)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, has_ve, device=None):
        super().__init__()
        self.eps = config.norm_eps
        self.attn = CausalSelfAttention(config, layer_idx, has_ve, device=device)
        self.mlp = MLP(config, device=device)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x, self.eps), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x, self.eps))


def has_value_embed(config, i):
    # Alternating layers, always including the last one (ResFormer-style, as in modded-nanogpt).
    return config.value_embeds and i % 2 == (config.n_layer - 1) % 2


# -----------------------------------------------------------------------------
# Fused lm_head + softcap + cross-entropy, chunked over tokens.
# The naive way materialises (tokens x vocab) fp32 logits for the whole micro-batch (8 GiB at
# 32x2048 tokens and a 32K vocab) plus as much again for their gradient. Here each chunk of rows is
# projected, softcapped, reduced to its loss AND its gradient in the same pass, and thrown away, so
# peak memory is one chunk's logits and no second projection is needed in backward.

def _ce_chunk(logits, targets, weights, softcap: float):
    """Per-row loss and d(sum_i w_i * loss_i)/d(logits) for one chunk, math in fp32. Written without
    in-place ops or scatters so torch.compile fuses it into two passes over the chunk."""
    z = logits.float()
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z = softcap * t
        lse = torch.log(torch.exp(z).sum(-1))  # |z| <= softcap: exp cannot overflow, skip the max pass
    else:
        lse = torch.logsumexp(z, -1)
    safe_t = targets.clamp(min=0)
    loss = torch.where(targets >= 0, lse - z.gather(1, safe_t[:, None]).squeeze(1), 0.0)
    col = torch.arange(z.size(1), device=z.device)
    grad = torch.exp(z - lse[:, None]) - (col[None, :] == safe_t[:, None]).float()  # softmax - onehot
    grad = grad * weights[:, None]
    if softcap > 0:
        grad = grad * (1 - t * t)  # d softcap(x)/dx = 1 - tanh^2
    return loss, grad.to(logits.dtype)


def _ce_chunk_loss(logits, targets, softcap: float):
    z = logits.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    loss = torch.logsumexp(z, dim=-1) - z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets >= 0, loss, torch.zeros_like(loss))


_compile = functools.cache(torch.compile)  # one compiled wrapper per (kernel, dynamic)


def _kernel(fn, compiled, dynamic=False):
    """fn under torch.compile, or fn itself. The training kernel's chunks have one fixed shape; the loss-only
    kernel sees every validation batch's ragged last chunk, so it passes dynamic=None: it recompiles once with a
    symbolic row count rather than once per size until dynamo's recompile limit sends it to eager."""
    return _compile(fn, dynamic=dynamic) if compiled else fn


def chunk_rows(vocab_size, budget=1 << 24):
    """Rows per chunk so that one chunk's fp32 logits stay within `budget` elements (64 MiB)."""
    return max(16, budget // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(softcap(x_i @ W^T), y_i), gradients computed during forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, weight, targets, weights, softcap, compiled):
        wc, rows, kernel = weight.to(x.dtype), chunk_rows(weight.size(0)), _kernel(_ce_chunk, compiled)
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.size(0), rows):
            xs = x[s:s + rows]
            loss, g = kernel(xs @ wc.t(), targets[s:s + rows], weights[s:s + rows], softcap)
            total += (loss * weights[s:s + rows]).sum()
            grad_x[s:s + rows] = g @ wc
            grad_w += (g.t() @ xs).to(grad_w.dtype)
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out, None, None, None, None


def linear_cross_entropy(x, weight, targets, softcap, reduction="mean", weights=None, compiled=False):
    """Cross-entropy of softcapped logits x @ weight^T against targets (-1 = ignore), without ever
    holding the full logits. reduction: 'mean' (over non-ignored targets), 'sum', or 'none'
    (per-token losses, no gradient). `weights` (per token) overrides the reduction, e.g. for RL."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if reduction == "none":
        wc, rows, kernel = weight.to(x.dtype), chunk_rows(weight.size(0)), _kernel(_ce_chunk_loss, compiled, dynamic=None)
        return torch.cat([kernel(x[s:s + rows] @ wc.t(), targets[s:s + rows], softcap)
                          for s in range(0, x.size(0), rows)])
    valid = (targets >= 0).to(torch.float32)
    if weights is None:
        weights = valid / valid.sum().clamp(min=1) if reduction == "mean" else valid
    else:
        weights = weights.reshape(-1).to(torch.float32) * valid
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return (linear_cross_entropy(x, weight, targets, softcap, "none", compiled=compiled) * weights).sum()
    return LinearCrossEntropy.apply(x, weight, targets, weights, softcap, compiled)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, device=None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd, device=device),
            "h": nn.ModuleList([Block(config, i, has_value_embed(config, i), device=device)
                                for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, config.vocab_size, device=device)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_kv_head * config.head_dim, device=device)
            for i in range(config.n_layer) if has_value_embed(config, i)})
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer, device=device))
            self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer, device=device))
        self.windows = window_sizes(config)
        self.compute_dtype = torch.float32
        self.compiled = False  # whether training runs the trunk and loss kernels under torch.compile
        self._compiled_trunk, self._rope_cache = None, {}

    @torch.no_grad()
    def init_weights(self):
        """Explicit init (the module is usually built on the meta device and materialised empty)."""
        cfg = self.config
        s = (3 ** 0.5) * cfg.n_embd ** -0.5  # uniform bound with std 1/sqrt(d)
        nn.init.normal_(self.transformer.wte.weight, 0.0, 1.0)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.5 * s, 0.5 * s)
            # Zero output projections (each block starts as the identity on the residual stream) and ve gates.
            for lin in filter(None, (block.attn.c_proj, block.mlp.c_proj, block.attn.ve_gate)):
                nn.init.zeros_(lin.weight)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        if cfg.resid_scalars:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
        self._rope_cache = {}

    def rotary(self, start, T, device, dtype):
        """cos/sin for positions [start, start+T), shaped (1, T, 1, D/2); grown on demand."""
        need, key = start + T, (str(device), dtype)
        cached = self._rope_cache.get(key)
        if cached is None or cached[0].size(1) < need:
            n, D = max(need, self.config.sequence_len), self.config.head_dim
            # Normal tensors even when first asked for under inference mode (the engine), so the same
            # tables serve training afterwards (RL and SFT's chat evals alternate the two).
            with torch.inference_mode(False):
                inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
                freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)
                cached = (freqs.cos()[None, :, None, :].to(dtype), freqs.sin()[None, :, None, :].to(dtype))
            self._rope_cache[key] = cached
        return cached[0][:, start:need], cached[1][:, start:need]

    def trunk(self, idx, kv_cache=None):
        """Token ids (B, T) -> final normed hidden states (B, T, n_embd) in the compute dtype."""
        cfg, dtype, T = self.config, self.compute_dtype, idx.size(1)
        cos, sin = self.rotary(kv_cache.pos if kv_cache is not None else 0, T, idx.device, dtype)
        x = x0 = norm(self.transformer.wte(idx).to(dtype), cfg.norm_eps)
        for i, block in enumerate(self.transformer.h):
            if cfg.resid_scalars:
                x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x, cfg.norm_eps)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", loss_weights=None):
        """Without targets: fp32 softcapped logits (B, T, V); with targets: the loss, as linear_cross_entropy."""
        use_compiled = self._compiled_trunk is not None and self.training and kv_cache is None
        x = (self._compiled_trunk if use_compiled else self.trunk)(idx, kv_cache)
        if targets is None:
            return self.logits(x)
        loss = linear_cross_entropy(x, self.lm_head.weight, targets, self.config.softcap,
                                    loss_reduction, loss_weights, compiled=self.compiled)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    def logits(self, x):
        """Hidden states from trunk() (..., n_embd) -> fp32 softcapped logits (..., V)."""
        logits = self.lm_head(x).float()
        c = self.config.softcap
        return c * torch.tanh(logits / c) if c > 0 else logits

    def compile_for_training(self):
        """torch.compile the trunk and loss kernels for training (fixed shapes); eval and sampling keep eager."""
        self._compiled_trunk = torch.compile(self.trunk, dynamic=False)
        self.compiled = True
        return self

    def setup_optimizer(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5,
                        weight_decay=0.0, rank=0, world_size=1, ortho="polar"):
        """MuonAdamW with one Muon group per matrix shape inside the blocks and AdamW for the rest.
        AdamW learning rates scale as 1/sqrt(width) (reference width 768, muP-style); Muon's update
        is already normalised per matrix, so its LR needs no width scaling."""
        from nanochat.optim import MuonAdamW
        s = (self.config.n_embd / 768) ** -0.5
        names = {p: n for n, p in self.named_parameters()}

        def adamw(params, lr, betas, wd):
            return {"kind": "adamw", "params": params, "names": [names[p] for p in params], "lr": lr,
                    "betas": betas, "eps": 1e-10, "weight_decay": wd}
        groups = [adamw([self.lm_head.weight], unembedding_lr * s, (0.8, 0.96), 0.01),
                  adamw([self.transformer.wte.weight], embedding_lr * s, (0.8, 0.995), 0.001)]
        if len(self.value_embeds):
            groups.append(adamw(list(self.value_embeds.parameters()), embedding_lr * s * 0.5, (0.8, 0.995), 0.01))
        if self.config.resid_scalars:
            groups.append(adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.0))
            groups.append(adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0))
        by_shape = {}
        for p in self.transformer.h.parameters():
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for _, ps in sorted(by_shape.items()):
            groups.append({"kind": "muon", "params": ps, "names": [names[p] for p in ps], "lr": matrix_lr,
                           "momentum": 0.95, "weight_decay": weight_decay})
        assert sum(len(g["params"]) for g in groups) == len(names), "every parameter in exactly one optimizer group"
        return MuonAdamW(groups, rank=rank, world_size=world_size, ortho=ortho, ortho_dtype=self.compute_dtype)

    def matmul_params(self):
        """Parameters that take part in matmuls: every Linear weight, counted structurally."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def num_params(self):
        """Parameter counts by group; 'scaling' (the horizon's count) = transformer matrices + lm_head."""
        c = {"wte": self.transformer.wte.weight.numel(),
             "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()), "lm_head": self.lm_head.weight.numel(),
             "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
             "scalars": sum(p.numel() for p in self.parameters() if p.ndim < 2),
             "total": sum(p.numel() for p in self.parameters())}
        return {**c, "scaling": c["transformer_matrices"] + c["lm_head"]}

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd), plus per layer 12 * H * D * (context attended,
        capped by the window) for attention scores and values; full (not causal-halved) attention, as for MFU."""
        T, cfg = seq_len or self.config.sequence_len, self.config
        return 6 * self.matmul_params() + sum(12 * cfg.n_head * cfg.head_dim * min(w or T, T) for w in self.windows)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Reference sampler without a KV cache, slow on purpose: the engine is tested against it."""
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:  # keeps the argmax, so greedy decoding is unchanged
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = (logits.argmax(dim=-1, keepdim=True) if temperature == 0
                   else torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng))
            ids = torch.cat([ids, nxt], dim=1)
            yield nxt.item()


def build_model(config: GPTConfig, device, compute_dtype=torch.float32):
    """Construct on the meta device, materialise on `device`, initialise. Master weights fp32."""
    with torch.device("meta"):
        model = GPT(config).to_empty(device=device)
    model.init_weights()
    model.compute_dtype = compute_dtype
    return model
