"""
Causal self-attention backends, in one place: FlashAttention-3 (Hopper), PyTorch SDPA, an explicit
softmax path for CPU training, sliding windows, and the KV-cache form the engine drives; an attention
variant is added here alone. Layout everywhere (B, T, H, D). The KV-cache protocol (engine.KVCache):
    kv_cache.pos                       tokens already cached (the same for every row)
    kv_cache.update(layer, k, v)       store k, v (B, T, H_kv, D) at [pos, pos+T), return all keys
                                       and values [0, pos+T) for that layer
    kv_cache.advance(T)                called once after the last layer
"""

import torch
import torch.nn.functional as F

# FlashAttention-3 (Hopper only). Optional: SDPA is used everywhere else, and on Hopper without it.
try:
    from flash_attn_interface import flash_attn_func as _fa3_func  # pip package built from FA3 "hopper"
except Exception:
    _fa3_func = None


def fa3_available(device_type):
    """Whether training on `device_type` runs FlashAttention-3 (fast sliding windows)."""
    return _fa3_func is not None and device_type == "cuda"


def window_sizes(config):
    """Per-layer attention window in tokens (None = full causal context)."""
    short = max(128, -(-config.sequence_len // 4 // 128) * 128)  # a quarter context, in multiples of 128
    pattern, n = config.window_pattern, config.n_layer
    return [None if pattern[i % len(pattern)] == "L" or i == n - 1 or short >= config.sequence_len else short
            for i in range(n)]


def attention(q, k, v, window, kv_cache=None, layer=0):
    """Causal attention of one layer's queries over its keys (window = None: full context). With a KV
    cache, k and v are appended to the cache first and queries at [pos, pos+Tq) attend to [0, pos+Tq).
    FlashAttention-3 when present (Hopper, bf16, no cache), else PyTorch SDPA, which picks its own fused
    kernel (flash/memory-efficient on CUDA, a flash kernel on CPU)."""
    pos = kv_cache.pos if kv_cache is not None else 0
    if kv_cache is not None:
        k, v = kv_cache.update(layer, k, v)
    Tq, Tk = q.size(1), k.size(1)
    if _fa3_func is not None and q.is_cuda and q.dtype == torch.bfloat16 and pos == 0 and Tq == Tk:
        # FA3's left window counts keys before the query's own: window - 1 of them gives the same
        # `window` keys per query as the masks below (q - k < window), so training, prefill and decode agree.
        out = _fa3_func(q, k, v, causal=True, window_size=(window - 1 if window else -1, 0))
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    sees_all = window is None or window >= Tk
    if k.dtype != q.dtype:  # a KV cache kept in fp32 on the CPU (see engine.KVCache)
        if Tq == 1 and sees_all:
            # One decoded token: fp32 SDPA over the fp32 cache is ~6x faster on the CPU than bf16
            # for these (1 x context) shapes, and nothing needs casting but q.
            y = F.scaled_dot_product_attention(q.float(), k, v, enable_gqa=gqa)
            return y.to(q.dtype).transpose(1, 2)
        k, v = k.to(q.dtype), v.to(q.dtype)
    if q.device.type == "cpu" and q.requires_grad and pos == 0 and Tq == Tk <= 1024:
        # CPU training: explicit scores/softmax, which torch.compile fuses, is ~1.5-2x faster forward +
        # backward than the CPU flash kernel at these sizes (measured, scripts/bench_train.py); the
        # T x T scores it keeps for backward are affordable up to ~1K context.
        return _attention_explicit(q, k, v, window).transpose(1, 2)
    causal = pos == 0 and Tq == Tk and sees_all
    # No mask at all for one new token that sees everything; an explicit one only where it must be.
    mask = None if causal or (Tq == 1 and sees_all) else _mask(pos, Tq, Tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa).transpose(1, 2)


def _mask(pos, Tq, Tk, window, device):
    """(Tq, Tk) bool: query at pos + i may see key j iff j <= pos + i and, with a window, pos + i - j < window."""
    qpos = torch.arange(pos, pos + Tq, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    mask = kpos <= qpos
    return mask & (qpos - kpos < window) if window is not None else mask


def _attention_explicit(q, k, v, window):
    """softmax(q k^T / sqrt(D) + causal/window mask) v, layout (B, H, T, D); GQA by repeating k, v."""
    if q.size(1) != k.size(1):
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * q.size(-1) ** -0.5
    allowed = _mask(0, q.size(2), q.size(2), window, q.device)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
    return probs @ v
