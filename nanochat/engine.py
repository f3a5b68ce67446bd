"""
The inference engine: the one path by which the chat CLI, the web server, the evals and RL sample from a model.

    engine = Engine(model, tokenizer)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    for token_column, mask_column in engine.generate(prompt, num_samples=4, temperature=0.8, top_k=50):
        ...                                   # one token per row per step, as soon as it is sampled
    sequences, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=256)

- KVCache: (layers, B, T_max, H_kv, D) preallocated per request and filled in place, never resized (resize_
  on a non-last dimension scrambles it); its dtype follows the model, never a hard-coded bf16 (breaks MPS, fp32).
- The prompt is prefilled once at batch 1 and copied into the N-row decode cache; every row samples independently,
  the first token included (one first token copied to every row makes N samples alike).
- Sampling: temperature (0 = greedy), top-k (None or <= 0 = off), top-p (nucleus), from a torch.Generator
  seeded per request: the same seed reproduces the same samples.
- Tool use: a row that writes <|python_start|> code <|python_end|> gets the code run in the sandbox
  (nanochat.execution) and <|output_start|> result <|output_end|> forced into it (mask 0; sampled tokens have
  mask 1). A row finishes on <|assistant_end|> or <|bos|>; generation stops when every row has, after
  max_tokens, or when the context is full -- never with an error.

Speed: fp32 master weights computing in bf16 would be cast on every forward, so the engine runs an inference
copy in the compute dtype; writes through .data (the optimizers') are invisible to it: call refresh_weights()
after such a step (RL does). Scripts that only infer call prepare_for_inference(model), which casts the model
itself. On a bf16 CPU the matrices are also prepacked for oneDNN (pack_linears), ~3x faster batch-1 decode.
"""

import threading
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.execution import execute_code

TOOL_TIMEOUT = 5.0            # seconds a python tool call may run
TOOL_OUTPUT_BYTES = 2048      # tool output kept (beginning and end); a calculator answer is a few bytes


class ContextLimitError(RuntimeError):
    """More tokens than the KV cache holds: an error, not silently wrong attention."""


class KVCache:
    """Keys and values of every layer for B rows, preallocated for max_len positions. Implements the
    protocol in nanochat/gpt.py's docstring: pos, update(layer, k, v), advance(T)."""

    def __init__(self, batch_size, num_layers, max_len, num_kv_heads, head_dim, device, dtype):
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        # empty, not zeros: only positions [0, pos) are ever read, and those have been written
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0

    @classmethod
    def for_model(cls, model, batch_size, max_len):
        cfg, device = model.config, model.lm_head.weight.device
        # On the CPU keep keys/values in fp32: decoding attends one query over the whole cache, and the CPU's
        # fp32 attention kernel is several times faster than bf16 at that shape (the weights stay bf16).
        dtype = torch.float32 if device.type == "cpu" else model.compute_dtype
        return cls(batch_size, cfg.n_layer, max_len, cfg.n_kv_head, cfg.head_dim, device, dtype)

    def update(self, layer, k, v):
        """Store k, v (B, T, H_kv, D) at [pos, pos+T); return this layer's keys and values [0, pos+T)."""
        end = self.pos + k.size(1)
        if end > self.max_len:
            raise ContextLimitError(f"KV cache is full: {self.pos} cached + {k.size(1)} new tokens > its {self.max_len} "
                                    f"positions; use a larger cache (at most sequence_len) or a shorter input")
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, T):
        self.pos += T

    def prefill(self, other):
        """Copy a batch-1 cache (a prefilled prompt) into every row of this one."""
        if other.batch_size != 1 or other.k.shape[0] != self.k.shape[0] or other.k.shape[3:] != self.k.shape[3:]:
            raise ValueError(f"prefill copies a batch-1 cache of the same layers and heads, got shape "
                             f"{tuple(other.k.shape)} for {tuple(self.k.shape)}")
        if other.pos > self.max_len:
            raise ContextLimitError(f"prefill: {other.pos} cached tokens do not fit in {self.max_len} positions")
        n = self.pos = other.pos
        self.k[:, :, :n] = other.k[:, :, :n]  # broadcasts over the batch dimension
        self.v[:, :, :n] = other.v[:, :, :n]


# -----------------------------------------------------------------------------
# Weights and logits

def prepare_for_inference(model):
    """For a model only used for inference (CLI, server, evals), not one still training: cast its weights
    to the compute dtype in place (so the engine needs no copy) and prepack them for the CPU (pack_linears)."""
    model.eval().requires_grad_(False)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != model.compute_dtype:
            p.data = p.data.to(model.compute_dtype)
    return pack_linears(model)


def _packable(model):
    try:
        ops = torch.ops.mkldnn
        return (model.lm_head.weight.device.type == "cpu" and model.compute_dtype == torch.bfloat16
                and torch.backends.mkldnn.is_available() and ops._is_mkldnn_bf16_supported()
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _version(t):
    """(storage, version counter) of a tensor: changes whenever it is modified in place or replaced (only
    replacement for tensors made under inference_mode, which have no counter)."""
    return t.data_ptr(), (None if t.is_inference() else t._version)


def _plain_path(x, w):
    """True where the prepacked op does not apply: not bf16 on the CPU, or autograd needs a backward."""
    return (x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.device.type != "cpu"
            or (torch.is_grad_enabled() and w.requires_grad))


def _packed_linear_forward(module, x):
    w = module.weight
    if _plain_path(x, w):
        return type(module).forward(module, x)
    if module.packed_version != _version(w):  # weights changed since packing
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
        module.packed_version = _version(w)
    return torch.ops.mkldnn._linear_pointwise(x, module.packed_weight, None, "none", [], "")


def _packed_qkv(attn, x):
    """CausalSelfAttention.project_qkv as one prepacked matmul over [W_q; W_k; W_v]: one call
    instead of three, which at batch 1 is most of the cost of these small matrices."""
    ws = (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight)
    if _plain_path(x, ws[0]):
        return type(attn).project_qkv(attn, x)
    versions = tuple(_version(w) for w in ws)
    if attn.qkv_version != versions:
        attn.qkv_packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat(ws).detach(), 1)
        attn.qkv_version = versions
    y = torch.ops.mkldnn._linear_pointwise(x, attn.qkv_packed, None, "none", [], "")
    return y.split([ws[0].size(0) + ws[1].size(0), ws[2].size(0)], dim=-1)


def pack_linears(model):
    """bf16 on a CPU: run every Linear of `model` with its weight prepacked in oneDNN's blocked layout
    (as torch.compile's CPU backend does). Bit-identical results; batch-1 matmuls are faster on an
    AVX512-BF16 CPU (1 thread): lm_head 32768x384 0.94 vs 2.84 ms, 1536x384 42 vs 69 us; prefill sizes
    no slower. Costs a copy of the matrices; re-packs when a weight is modified. No-op elsewhere."""
    if not _packable(model):
        return model
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is None and "forward" not in m.__dict__:
            m.packed_version = None
            m.forward = _packed_linear_forward.__get__(m)
        if hasattr(m, "project_qkv") and "project_qkv" not in m.__dict__:
            m.qkv_version = None
            m.project_qkv = _packed_qkv.__get__(m)
    return model


def _inference_copy(model):
    """A copy of `model` with its weights in the compute dtype, ready for inference (prepacked)."""
    dtype = model.compute_dtype
    with torch.inference_mode(False), torch.no_grad():  # so the copy's tensors keep version counters
        with torch.device("meta"):
            copy = type(model)(model.config)
        copy.load_state_dict({k: v.detach().to(dtype) if v.is_floating_point() else v.detach().clone()
                              for k, v in model.state_dict().items()}, assign=True)
    copy.compute_dtype = dtype
    copy.requires_grad_(False).eval()
    return pack_linears(copy)


def last_logits(model, ids, kv_cache):
    """fp32 softcapped logits (B, V) of the last position only (a prefill need not project every position)."""
    x = model.trunk(ids, kv_cache)[:, -1]
    logits = model.lm_head(x).float()  # a new tensor (the projection is in the compute dtype): safe to modify
    c = model.config.softcap
    return logits.div_(c).tanh_().mul_(c) if c > 0 else logits


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One token id per row of logits (B, V), each row sampled independently. temperature 0 = argmax;
    top_k None or <= 0 = no top-k filter (topk(0) would crash); top_p None or 1 = no nucleus filter."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    idx = None  # when set, logits holds candidate values (sorted descending) and idx their token ids
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits, idx = torch.topk(logits, top_k, dim=-1)
    if top_p is not None and top_p < 1.0:
        if idx is None:
            logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token if the ones before it
        # already reach it (the most likely token is therefore always kept)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)
    return (choice if idx is None else idx.gather(-1, choice)).squeeze(-1)


# -----------------------------------------------------------------------------
# Prompts and replies as text

def render_prompt(tokenizer, messages):
    """Token ids that prompt the assistant's reply to a conversation ending with a user message: exactly
    render_conversation's layout + <|assistant_start|>. `messages`: [{"role", "content"}] or {"messages": [...]}."""
    conversation = messages if isinstance(messages, dict) else {"messages": messages}
    msgs = conversation.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("render_prompt needs at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
    return tokenizer.render_for_completion({**conversation, "messages": msgs + [{"role": "assistant", "content": ""}]})


class TextStream:
    """Incremental detokenizer: add(token id) returns the text that can be shown now; the pieces concatenate to
    decode(all ids). A character split across tokens decodes to U+FFFD until its last byte arrives, so text
    ending in U+FFFD is held back. Ids are dropped once they decode cleanly: UTF-8 self-synchronises."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def add(self, token):
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self):
        """Whatever is still held back (possibly ending in U+FFFD); call at the end of a segment."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def reply_content(tokenizer, ids):
    """The assistant message content for a reply's tokens (terminal token excluded), as
    render_conversation takes it: a str for plain text, else a list of text / python / python_output
    parts. Rendering it gives back `ids` when the model's text tokens are the tokenizer's encoding."""
    sp = tokenizer.encode_special
    kinds = {sp("<|python_start|>"): "python", sp("<|output_start|>"): "python_output",
             sp("<|python_end|>"): "text", sp("<|output_end|>"): "text"}
    parts, kind, current = [], "text", []
    for t in [*ids, None]:  # None closes the last part
        if t in kinds or t is None:
            if current or kind != "text":
                parts.append({"type": kind, "text": tokenizer.decode(current)})
            kind, current = kinds.get(t), []
        else:
            current.append(t)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


# -----------------------------------------------------------------------------

class _Row:
    """Per-row state of the tool-use state machine: the tokens to emit instead of sampling (tool output),
    the ids of the python block being written (None outside one), and whether and how the row ended."""
    __slots__ = ("forced", "python", "done", "end_token")

    def __init__(self):
        self.forced, self.python, self.done, self.end_token = deque(), None, False, None


class Engine:
    """Samples from `model` (a GPT) with `tokenizer`'s special tokens. generate() may be called from
    several threads (each call has its own cache and generator); tool calls run for <= tool_timeout s."""

    def __init__(self, model, tokenizer, tool_timeout=TOOL_TIMEOUT, tool_output_bytes=TOOL_OUTPUT_BYTES):
        self.model, self.tokenizer = model, tokenizer
        self.tool_timeout, self.tool_output_bytes = tool_timeout, tool_output_bytes
        sp = tokenizer.encode_special
        self.assistant_end, self.bos = sp("<|assistant_end|>"), tokenizer.get_bos_token_id()
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        # the inference copy of the weights (see the module docstring); the master versions it was synced at
        self._copy, self._versions = None, None
        self._lock = threading.Lock()

    def _master_versions(self):
        return [_version(p) for p in self.model.parameters()]

    def _sync_copy(self):
        with torch.inference_mode(False), torch.no_grad():  # a version bump, so the packed weights follow
            for c, p in zip(self._copy.parameters(), self.model.parameters()):
                c.copy_(p)
        self._versions = self._master_versions()

    def refresh_weights(self):
        """Copy the model's weights into the inference copy, in place. Call it after an optimizer step: writes
        through .data bump no version counter, so the engine cannot see them. A no-op without a copy."""
        with self._lock:
            if self._copy is not None:
                self._sync_copy()

    def _inference_model(self):
        """The model itself if its weights are in the compute dtype, else the copy (re-synced if the
        master weights changed through autograd-visible ops since)."""
        model = self.model
        if all(p.dtype == model.compute_dtype for p in model.parameters() if p.is_floating_point()):
            self._copy = None
            return model
        with self._lock:
            if self._copy is None:
                self._copy, self._versions = _inference_copy(model), self._master_versions()
            elif self._master_versions() != self._versions:
                self._sync_copy()
            return self._copy

    def _run_tool(self, code_ids):
        result = execute_code(self.tokenizer.decode(code_ids), timeout=self.tool_timeout,
                              max_output_bytes=self.tool_output_bytes, repl_mode=True)
        return [self.output_start] + self.tokenizer.encode(result.summary()) + [self.output_end]

    def _next(self, row, sampled):
        """Advance one row's state machine by one step: (token, mask)."""
        if row.done:
            return row.end_token, 0  # filler that keeps the batch aligned; consumers stopped at end_token
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        if token in (self.assistant_end, self.bos):
            row.done, row.end_token = True, token
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            row.forced.extend(self._run_tool(row.python))
            row.python = None
        elif row.python is not None:
            row.python.append(token)
        return token, mask

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Stream (token_column, mask_column), lists of num_samples, one step at a time; mask 1 = sampled, 0 = forced
        tool output. After its terminal token a row repeats it with mask 0. Arguments are checked at the call."""
        tokens = list(tokens)
        limit = self.model.config.sequence_len
        if not tokens:
            raise ValueError("generate needs a prompt of at least one token (e.g. the <|bos|> id)")
        if len(tokens) >= limit:
            raise ValueError(f"the prompt is {len(tokens)} tokens but the model's context is {limit}: "
                             f"shorten it to at most {limit - 1} tokens to leave room for a reply")
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples={num_samples!r} must be an int >= 1")
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 0):
            raise ValueError(f"max_tokens={max_tokens!r} must be None or an int >= 0")
        if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
            raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy)")
        if top_k is not None and not isinstance(top_k, int):
            raise ValueError(f"top_k={top_k!r} must be an int (<= 0 or None disables it)")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p={top_p!r} must be in (0, 1] (or None to disable)")
        n_new = limit - len(tokens) if max_tokens is None else min(max_tokens, limit - len(tokens))
        return self._generate(tokens, num_samples, n_new, temperature, top_k, top_p, seed)

    # inference_mode (cheaper per op than no_grad: no version counters, no view tracking); the one
    # tensor a forward caches on the model, its rotary tables, is built outside it (GPT.rotary).
    @torch.inference_mode()
    def _generate(self, tokens, num_samples, n_new, temperature, top_k, top_p, seed):
        if n_new == 0:
            return
        model = self._inference_model()
        device = model.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)

        # The last sampled token is never fed back, so the cache needs one position less than that.
        cache = KVCache.for_model(model, num_samples, len(tokens) + n_new - 1)
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)
        if num_samples == 1:
            logits = last_logits(model, prompt, cache)
        else:
            prefill = KVCache.for_model(model, 1, len(tokens))
            logits = last_logits(model, prompt, prefill).expand(num_samples, -1)
            cache.prefill(prefill)
            del prefill

        rows = [_Row() for _ in range(num_samples)]
        for step in range(n_new):
            sampled = sample_next(logits, rng, temperature, top_k, top_p).tolist()
            column, masks = zip(*(self._next(row, s) for row, s in zip(rows, sampled)))
            yield list(column), list(masks)
            if step == n_new - 1 or all(row.done for row in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=device).view(num_samples, 1)
            logits = last_logits(model, ids, cache)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(sequences, masks): per row the prompt + its tokens, terminal excluded; mask 0 on the prompt."""
        tokens = list(tokens)
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                done[i] = done[i] or token in (self.assistant_end, self.bos)
                if not done[i]:
                    sequences[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return sequences, masks
