"""
transformers modeling code for nanochat models with features transformers' built-in `nanochat` type lacks: value
embeddings (gated per KV head, on alternating layers), per-layer residual scalars (x = a_i * x + b_i * x0 before
every block) and sliding-window attention. nanochat's export copies this file into the export folder and names it
in config.json's `auto_map`, so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads it; it
must stay self-contained (torch and transformers only, never nanochat). The forward pass mirrors nanochat/gpt.py
exactly (the export's verification checks the logits to 1e-4):
  embedding -> RMSNorm -> [resid scalars] -> pre-norm blocks -> final RMSNorm -> lm_head -> softcap
  attention: q, k, v; v += gate * value embedding; RoPE (half-split pairing); QK RMSNorm after RoPE;
  causal (optionally windowed) softmax(q k^T / sqrt(D)) v; output projection. MLP: relu(x W1)^2 W2
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


class NanoChatExtConfig(PreTrainedConfig):
    model_type = "nanochat_ext"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32768
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 15.0
    value_embed_layers: list | None = None   # layer indices that add a value embedding
    ve_gate_channels: int = 32               # the value-embedding gate reads this many input channels
    resid_scalars: bool = True
    # Per layer: attention window in tokens, 0 = full causal context. (Deliberately not named
    # `sliding_window`: transformers would then give those layers a cache that forgets old keys.)
    attention_windows: list | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.value_embed_layers = self.value_embed_layers or []
        self.attention_windows = self.attention_windows or [0] * self.num_hidden_layers
        super().__post_init__(**kwargs)


def _rms_norm(x, eps):
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def _rotate(x, cos, sin):
    # dimension i is paired with i + D/2 (the same convention as transformers' built-in nanochat)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class NanoChatExtAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.eps = layer_idx, config.rms_norm_eps
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d, kvd = config.hidden_size, self.n_kv_head * self.head_dim
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d, kvd, bias=False), nn.Linear(d, kvd, bias=False)
        self.ve_gate = (nn.Linear(min(config.ve_gate_channels, d), self.n_kv_head, bias=False)
                        if layer_idx in config.value_embed_layers else None)

    def forward(self, x, ve, cos, sin, mask, past_key_values):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k = _rms_norm(q, self.eps), _rms_norm(k, self.eps)  # QK norm after RoPE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanoChatExtMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).square())


class NanoChatExtDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = NanoChatExtAttention(config, layer_idx)
        self.mlp = NanoChatExtMLP(config)

    def forward(self, x, ve, cos, sin, mask, past_key_values):
        x = x + self.self_attn(_rms_norm(x, self.eps), ve, cos, sin, mask, past_key_values)
        return x + self.mlp(_rms_norm(x, self.eps))


class NanoChatExtPreTrainedModel(PreTrainedModel):
    config_class = NanoChatExtConfig
    config: NanoChatExtConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanoChatExtDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # Only used for a freshly constructed model; from_pretrained overwrites every weight.
        super()._init_weights(module)
        if isinstance(module, NanoChatExtModel) and module.resid_lambdas is not None:
            init.ones_(module.resid_lambdas)
            init.constant_(module.x0_lambdas, 0.1)


class NanoChatExtModel(NanoChatExtPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        kvd = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kvd)
                                           for i in config.value_embed_layers})
        self.layers = nn.ModuleList([NanoChatExtDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        n, scalars = config.num_hidden_layers, config.resid_scalars
        self.resid_lambdas = nn.Parameter(torch.ones(n)) if scalars else None
        self.x0_lambdas = nn.Parameter(torch.full((n,), 0.1)) if scalars else None
        self.post_init()

    def _masks(self, B, T, past, attention_mask, device):
        """Boolean masks (B, 1, T, past+T), one per window size. Slot order is causal order; a 2D attention_mask
        (B, past+T) removes padded keys; a query always sees itself, so a fully padded row is finite, not NaN."""
        Tk = past + T
        qi = torch.arange(past, Tk, device=device)[:, None]
        ki = torch.arange(Tk, device=device)[None, :]
        causal = ki <= qi
        keys = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.size(-1) != Tk:
                raise ValueError(f"attention_mask must be 2D (batch, {Tk}) with one entry per cached + new token, "
                                 f"got shape {tuple(attention_mask.shape)}; use the default dynamic cache")
            if not bool(attention_mask.all()):
                keys = attention_mask.bool()[:, None, None, :]
        masks = {}
        for w in set(self.config.attention_windows):
            m = (causal if not w else causal & (qi - ki < w))[None, None]
            masks[w] = (m if keys is None else (m & keys) | (ki == qi)[None, None]).expand(B, 1, T, Tk)
        return masks

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if input_ids is None:
            raise ValueError("nanochat_ext needs input_ids (its value embeddings are looked up by token id); "
                             "inputs_embeds is not supported")
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        B, T = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        D = cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
        x = self.embed_tokens(input_ids)
        cos, sin = freqs.cos()[:, :, None, :].to(x.dtype), freqs.sin()[:, :, None, :].to(x.dtype)
        masks = self._masks(B, T, past, attention_mask, device)
        x = x0 = _rms_norm(x, cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = layer(x, ve, cos, sin, masks[cfg.attention_windows[i]], past_key_values)
        x = _rms_norm(x, cfg.rms_norm_eps)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values if use_cache else None)


class NanoChatExtForCausalLM(NanoChatExtPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = NanoChatExtModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()
        if c := self.config.final_logit_softcapping:
            logits = c * torch.tanh(logits / c)
        loss = None if labels is None else F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = ["NanoChatExtConfig", "NanoChatExtModel", "NanoChatExtForCausalLM"]
