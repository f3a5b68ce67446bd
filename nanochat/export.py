"""
HuggingFace transformers export, its verification, and import back into nanochat.

An export directory holds what stock transformers needs, and nothing of this repo:
    config.json, model.safetensors (fp32), generation_config.json
    tokenizer.json, tokenizer_config.json, chat_template.jinja   (AutoTokenizer; byte-level BPE equal to ours)
    README.md                  model card: architecture, parameters, training tokens, metrics from report/
    nanochat_export.json       where it came from (stage, tag, step, tokenizer fingerprint) and the verification
    modeling_nanochat_ext.py   only for models transformers' built-in type cannot represent (see below)

Two model types:
- "nanochat", transformers' built-in type (no trust_remote_code): RoPE, QK norm after RoPE, ReLU^2,
  parameter-free RMSNorm after the embedding and before every sublayer, softcap, GQA. It has no value
  embeddings, no residual scalars and no sliding windows, so it fits models trained with
  `--no-value-embeds --no-resid-scalars --window-pattern L`.
- "nanochat_ext", our own modeling code (nanochat/modeling_nanochat_ext.py, self-contained, shipped in
  the export and registered through auto_map; loaded with trust_remote_code=True) for everything else.
The export picks the built-in type whenever it represents the model exactly; asking for it when it does not
is refused with a message naming the missing feature.

Verification (verify_export) proves the export rather than trusting it, because the known failure of
community exports is a tokenizer out of sync with the weights: it loads the directory with stock
transformers and compares fp32 logits (max abs difference <= 1e-4 on >= 8 prompts), 32 greedy tokens,
greedy generation against our engine, token ids on held-out text (with and without special-token text),
decoding, and apply_chat_template against render_conversation. Any mismatch raises VerificationError.

Import: load_export(dir) rebuilds our GPT and Tokenizer from an export directory of either type, so the
engine (chat_cli, chat_web, bench_infer via checkpoint.load_model(source=dir)) can serve it.
"""

import os
import json
import time
import shutil

import torch

from nanochat.common import UserError, atomic_write_bytes, atomic_write_json, get_base_dir, print0
from nanochat.gpt import GPTConfig, build_model, has_value_embed, window_sizes
from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS

BUILTIN_TYPE = "nanochat"
EXT_TYPE = "nanochat_ext"
EXT_MODELING_FILE = "modeling_nanochat_ext.py"
META_FILE = "nanochat_export.json"
WEIGHTS_FILE = "model.safetensors"
LOGIT_ATOL = 1e-4
MIN_PROMPTS = 8
GREEDY_TOKENS = 32


class ExportError(UserError, RuntimeError):
    """The model or directory cannot be exported/imported as asked (the message says why and what to do)."""


class VerificationError(ExportError):
    """The export loads in transformers but does not reproduce our model or tokenizer."""


# -----------------------------------------------------------------------------
# Which model type can represent a config

def builtin_missing_features(config):
    """Features of our model that transformers' built-in `nanochat` type lacks (empty = representable)."""
    missing = []
    if config.value_embeds:
        missing.append("value embeddings (value_embeds=True; train with --no-value-embeds to avoid them)")
    if config.resid_scalars:
        missing.append("per-layer residual scalars (resid_scalars=True; train with --no-resid-scalars)")
    windows = window_sizes(config)
    if any(w is not None for w in windows):
        missing.append(f"sliding-window attention (window_pattern={config.window_pattern!r} gives windows "
                       f"{windows}; train with --window-pattern L)")
    return missing


def choose_model_type(config, modeling="auto"):
    """'auto' -> built-in when it represents the model exactly, else our own code; 'builtin' refuses
    (ExportError naming the features) when it cannot; 'custom' always ships our code."""
    if modeling not in ("auto", "builtin", "custom"):
        raise ExportError(f"modeling={modeling!r}: use 'auto', 'builtin' or 'custom'")
    missing = builtin_missing_features(config)
    if modeling == "custom":
        return EXT_TYPE
    if modeling == "builtin" and missing:
        raise ExportError("transformers' built-in 'nanochat' model type cannot represent this model, it lacks: "
                          + "; ".join(missing) + ". Export with --modeling custom (ships modeling_nanochat_ext.py, "
                          "loaded with trust_remote_code=True) or --modeling auto.")
    return EXT_TYPE if missing else BUILTIN_TYPE


# -----------------------------------------------------------------------------
# Config and weight names

def _special_ids(tokenizer):
    sp = {t: tokenizer.encode_special(t) for t in tokenizer.get_special_tokens()}
    bos = tokenizer.get_bos_token_id()
    end = sp.get("<|assistant_end|>")
    # Generation stops where our engine stops: <|assistant_end|> (end of a reply) or <|bos|> (a base
    # model starting a new document). pad = <|assistant_end|>: never bos, or transformers would infer
    # an attention mask that hides the leading <|bos|> of every prompt.
    eos = [end, bos] if end is not None else [bos]
    return bos, eos, (end if end is not None else bos)


def hf_config(config, tokenizer, model_type):
    """config.json contents (a dict) for our GPTConfig."""
    bos, eos, pad = _special_ids(tokenizer)
    common = {
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "max_position_embeddings": config.sequence_len,
        "rms_norm_eps": config.norm_eps, "final_logit_softcapping": config.softcap if config.softcap > 0 else None,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "tie_word_embeddings": False,
        "use_cache": True, "dtype": "float32",
    }
    if model_type == BUILTIN_TYPE:
        return {"architectures": ["NanoChatForCausalLM"], "model_type": BUILTIN_TYPE, **common,
                "hidden_act": "relu2", "attention_bias": False, "attention_dropout": 0.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}}
    from nanochat.gpt import CausalSelfAttention
    module = EXT_MODELING_FILE[:-3]
    return {"architectures": ["NanoChatExtForCausalLM"], "model_type": EXT_TYPE, **common,
            "auto_map": {"AutoConfig": f"{module}.NanoChatExtConfig",
                         "AutoModel": f"{module}.NanoChatExtModel",
                         "AutoModelForCausalLM": f"{module}.NanoChatExtForCausalLM"},
            "rope_theta": config.rope_base,
            "value_embed_layers": [i for i in range(config.n_layer) if has_value_embed(config, i)],
            "ve_gate_channels": CausalSelfAttention.VE_GATE_CHANNELS,
            "resid_scalars": config.resid_scalars,
            "attention_windows": [w or 0 for w in window_sizes(config)],
            "nanochat_window_pattern": config.window_pattern}


def config_from_hf(hf):
    """Our GPTConfig from a config.json dict of either type; ExportError naming anything we cannot run."""
    mt = hf.get("model_type")
    if mt not in (BUILTIN_TYPE, EXT_TYPE):
        raise ExportError(f"model_type {mt!r} is not a nanochat model: only '{BUILTIN_TYPE}' and '{EXT_TYPE}' "
                          f"exports can be imported")
    problems = []
    H = hf["hidden_size"]
    n_head = hf["num_attention_heads"]
    if hf.get("intermediate_size", 4 * H) != 4 * H:
        problems.append(f"intermediate_size={hf['intermediate_size']} (nanochat's MLP is 4 x hidden_size = {4 * H})")
    if hf.get("hidden_act", "relu2") != "relu2":
        problems.append(f"hidden_act={hf['hidden_act']!r} (nanochat uses relu2)")
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (nanochat has no biases)")
    if hf.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=true (nanochat's embedding and lm_head are separate)")
    if hf.get("head_dim") not in (None, H // n_head):
        problems.append(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {H // n_head}")
    if mt == BUILTIN_TYPE:
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type={rope.get('rope_type')!r} (nanochat uses plain RoPE)")
        rope_base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        value_embeds, resid_scalars, pattern = False, False, "L"
    else:
        rope_base = hf["rope_theta"]
        resid_scalars = bool(hf.get("resid_scalars"))
        pattern = hf.get("nanochat_window_pattern", "L")
        value_embeds = bool(hf.get("value_embed_layers"))
    if problems:
        raise ExportError("this export uses features nanochat's model does not have: " + "; ".join(problems))
    softcap = hf.get("final_logit_softcapping")
    config = GPTConfig(sequence_len=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                       n_layer=hf["num_hidden_layers"], n_head=n_head,
                       n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=H, window_pattern=pattern,
                       value_embeds=value_embeds, resid_scalars=resid_scalars,
                       softcap=float(softcap) if softcap else 0.0, rope_base=float(rope_base),
                       norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    if mt == EXT_TYPE:
        # The layout is derived from our config on import; refuse an export whose explicit layout differs.
        want_ve = [i for i in range(config.n_layer) if has_value_embed(config, i)]
        want_windows = [w or 0 for w in window_sizes(config)]
        if list(hf.get("value_embed_layers") or []) != want_ve:
            raise ExportError(f"value_embed_layers={hf.get('value_embed_layers')} is not nanochat's layout {want_ve}")
        if list(hf.get("attention_windows") or [0] * config.n_layer) != want_windows:
            raise ExportError(f"attention_windows={hf.get('attention_windows')} is not what window_pattern="
                              f"{pattern!r} gives ({want_windows})")
    return config


# ours -> HF, per layer (the suffix after transformer.h.{i}.)
_LAYER_NAMES = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.ve_gate.weight": "self_attn.ve_gate.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}
_TOP_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
    "resid_lambdas": "model.resid_lambdas",
    "x0_lambdas": "model.x0_lambdas",
}


def hf_name(name):
    """Our state-dict key -> the HF key (both model types use the same names)."""
    name = name.removeprefix("_orig_mod.")
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name.startswith("transformer.h."):
        i, rest = name[len("transformer.h."):].split(".", 1)
        if rest in _LAYER_NAMES:
            return f"model.layers.{i}.{_LAYER_NAMES[rest]}"
    if name.startswith("value_embeds."):
        return "model." + name
    raise ExportError(f"no HF name for parameter {name!r}: nanochat/export.py needs updating for this model")


def state_dict_to_hf(state):
    return {hf_name(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def state_dict_from_hf(hf_state, config):
    """HF weights -> our state dict, via the inverse of hf_name over the keys our model has."""
    with torch.device("meta"):
        from nanochat.gpt import GPT
        names = list(GPT(config).state_dict().keys())
    inverse = {hf_name(n): n for n in names}
    unknown = sorted(set(hf_state) - set(inverse))
    missing = sorted(set(inverse) - set(hf_state))
    if unknown or missing:
        raise ExportError(f"the export's weights do not match its config: unexpected {unknown[:5]}, "
                          f"missing {missing[:5]}")
    return {inverse[k]: v for k, v in hf_state.items()}


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken ranks -> a tokenizers (Rust) byte-level BPE that encodes identically

def _byte_to_unicode():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


def hf_tokenizer_object(tokenizer):
    """A `tokenizers.Tokenizer` equal to ours: vocab = our ranks in the GPT-2 byte->unicode alphabet;
    merges recovered from the ranks (every split of a token into two tokens, ordered by the merged
    token's rank -- the standard tiktoken conversion, so BPE merges happen in tiktoken's order);
    pre-tokenizer = our split regex, then byte-level mapping; special tokens as added tokens with
    our ids. ignore_merges=True mirrors tiktoken's shortcut of taking a whole piece that is a token."""
    from tokenizers import Tokenizer as HFTokenizer, Regex, AddedToken, decoders, models, pre_tokenizers
    ranks = tokenizer.get_mergeable_ranks()
    b2u = _byte_to_unicode()

    def s(b):
        return "".join(b2u[x] for x in b)
    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        splits.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, a, b) for a, b in splits)
    merges.sort(key=lambda m: m[0])
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(s(a), s(b)) for _, a, b in merges], fuse_unk=False,
                                ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.get_pattern()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(((tokenizer.encode_special(t), t) for t in tokenizer.get_special_tokens()))
    expected = len(ranks)
    for i, t in specials:
        if i != expected:
            raise ExportError(f"special token {t!r} has id {i}, but an HF tokenizer appends added tokens after "
                              f"the {len(ranks)} BPE tokens (expected id {expected}); this vocabulary layout "
                              f"cannot be exported")
        expected += 1
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in specials])
    return hf


# The conversation format of render_conversation, as a Jinja chat template. Same layout token for
# token: <|bos|>, a leading system message merged into the first user turn as system + "\n\n" + text,
# strict user/assistant alternation, assistant content as a string or a list of text / python /
# python_output parts, and add_generation_prompt -> <|assistant_start|>.
CHAT_TEMPLATE = r"""
{#- nanochat conversation format (nanochat/tokenizer.py render_conversation). Every tag trims the
    whitespace around it, so only the {{ }} expressions produce text. -#}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_text = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_text = none -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if system_text is not none and not turns -%}
    {{- raise_exception('a system message needs a user message to merge into') -}}
{%- endif -%}
{{- bos_token -}}
{%- for m in turns -%}
    {%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}
    {%- if m['role'] != expected -%}
        {{- raise_exception('roles must alternate user/assistant starting with user (after an optional '
                            ~ 'leading system message); message ' ~ loop.index0 ~ ' has role ' ~ m['role']) -}}
    {%- endif -%}
    {%- if m['role'] == 'user' -%}
        {%- if m['content'] is not string -%}
            {{- raise_exception('user message content must be a string') -}}
        {%- endif -%}
        {{- '<|user_start|>' -}}
        {%- if loop.first and system_text is not none -%}
            {{- system_text ~ '\n\n' -}}
        {%- endif -%}
        {{- m['content'] ~ '<|user_end|>' -}}
    {%- else -%}
        {{- '<|assistant_start|>' -}}
        {%- if m['content'] is string -%}
            {{- m['content'] -}}
        {%- else -%}
            {%- for part in m['content'] -%}
                {%- if part['type'] == 'text' -%}
                    {{- part['text'] -}}
                {%- elif part['type'] == 'python' -%}
                    {{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}
                {%- elif part['type'] == 'python_output' -%}
                    {{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}
                {%- else -%}
                    {{- raise_exception('assistant content part type must be text, python or python_output') -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|assistant_end|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant_start|>' -}}
{%- endif -%}
"""


def hf_tokenizer(tokenizer, sequence_len):
    """A transformers fast tokenizer (PreTrainedTokenizerFast) with bos/eos/pad and the chat template
    (the template only when the tokenizer has nanochat's chat special tokens)."""
    from transformers import PreTrainedTokenizerFast
    bos, eos, pad = _special_ids(tokenizer)
    name = tokenizer.id_to_token
    has_chat = all(t in tokenizer.get_special_tokens() for t in SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer_object(tokenizer), bos_token=name(bos),
                                   eos_token=name(eos[0]), pad_token=name(pad), model_max_length=sequence_len,
                                   chat_template=CHAT_TEMPLATE if has_chat else None,
                                   clean_up_tokenization_spaces=False)


def write_tokenizer(tokenizer, out_dir, sequence_len):
    tok = hf_tokenizer(tokenizer, sequence_len)
    tok.save_pretrained(out_dir)
    # Name the class every transformers version knows (v5 aliases it to its tokenizers backend) and keep
    # the template in tokenizer_config.json too, for versions that do not read chat_template.jinja.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    atomic_write_json(path, cfg)


def tokenizer_from_hf(path):
    """Our Tokenizer rebuilt from an export's tokenizer.json + tokenizer_config.json: byte-level BPE
    vocab -> tiktoken ranks, added special tokens, the Split regex. Refuses (ExportError) a tokenizer
    tiktoken cannot reproduce, and checks a few strings against the tokenizers library itself."""
    tj_path = os.path.join(path, "tokenizer.json")
    try:
        with open(tj_path, encoding="utf-8") as f:
            tj = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {tj_path}: {e}") from None
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{tj_path}: model type {model.get('type')!r} is not BPE")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        raise ExportError(f"{tj_path}: pre-tokenizer is not Split(regex, isolated) + ByteLevel(use_regex=false); "
                          f"nanochat's tiktoken tokenizer cannot reproduce it")
    pattern = steps[0]["pattern"]["Regex"]
    u2b = {u: b for b, u in _byte_to_unicode().items()}
    try:
        ranks = {bytes(u2b[c] for c in s): i for s, i in model["vocab"].items()}
    except KeyError as e:
        raise ExportError(f"{tj_path}: vocab entry with a character outside the byte-level alphabet ({e})") from None
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            tc = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {os.path.join(path, 'tokenizer_config.json')}: {e}") from None
    bos = tc.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if bos not in specials:
        raise ExportError(f"{path}: bos_token {bos!r} is not one of the special tokens {sorted(specials)}")
    tok = Tokenizer(pattern, ranks, specials, bos_token=bos, name=os.path.basename(os.path.abspath(path)))
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(tj_path)
    for text in _TRICKY_TEXTS:
        if hf.encode(text, add_special_tokens=False).ids != tok.enc.encode(text, allowed_special="all"):
            raise ExportError(f"{tj_path}: tiktoken built from this vocabulary encodes {text[:40]!r} differently "
                              f"than the tokenizers library; cannot import it exactly")
    return tok


# -----------------------------------------------------------------------------
# Held-out text, prompts and conversations for verification

_TRICKY_TEXTS = [
    "Hello world! It's a test: we'll see, they've gone, I'M HERE, you'D think.",
    "Numbers 1 12 123 1234 12345 3.14159 -42 1e-10 0x1F 2024-07-03 $1,234.56",
    "Special-token text as plain text: <|bos|> <|user_start|>hi<|user_end|><|assistant_start|>"
    "<|python_start|>1+1<|python_end|><|output_start|>2<|output_end|><|assistant_end|> <|endoftext|>",
    "unicode: héllo wörld naïve café — “quotes” ‘single’ … ½ ∑ ∫ √ ≠ ≤ 日本語のテキスト 中文 한국어 "
    "Ελληνικά русский عربي עברית हिन्दी ไทย",
    "emoji: 😀 🤖👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨🔥 and a lone variation selector \ufe0f",
    "whitespace:  two  spaces\tTab\t\ttabs\nnewline\r\nCRLF\n\n\nblank lines   \n  trailing   ",
    "odd spaces:\u00a0nbsp\u2009thin\u3000ideographic\u2028line sep\u0085nel\u200bzero-width",
    "code:\n    def f(x):\n        return x ** 2  # square\n\tif (a&&b) { printf(\"%d\\n\", a[i]); }",
    "",
    " ",
    "a",
]

_CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello! Who are you?"},
                  {"role": "assistant", "content": "I'm nanochat, a small language model."}]},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And times three? 😀"},
                  {"role": "assistant", "content": "12."}]},
    {"messages": [{"role": "user", "content": "Compute 17*23 with the tool."},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me compute that. "},
                      {"type": "python", "text": "17*23"},
                      {"type": "python_output", "text": "391"},
                      {"type": "text", "text": " So the answer is 391."}]}]},
    {"messages": [{"role": "user", "content": "  leading and trailing spaces \n\n"},
                  {"role": "assistant", "content": "\nnewline first, unicode naïve — 日本"}]},
    {"messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {"messages": [{"role": "system", "content": "Answer in French."},
                  {"role": "user", "content": "Good morning"}]},
]


def heldout_texts(local_data_dir=None, max_docs=24, max_chars=4000):
    """Text the tokenizer was not trained on: the tricky strings above, documents of the validation shard
    (the last shard, held out from training) when the base dir has shards, and instruction/response text
    from the local data folder (chat data, never used for the tokenizer) when it is there."""
    texts = list(_TRICKY_TEXTS)
    try:
        from nanochat.dataset import list_parquet_files, read_row_group
        docs = read_row_group(list_parquet_files("val")[0], 0)
        texts += [d[:max_chars] for d in docs[:max_docs // 2]]
    except Exception:
        pass  # no shards in this base dir: the other sources still cover the check
    if local_data_dir:
        for rel in ("chat_sft/lima/lima.json", "chat_sft/gpteacher/codegen-instruct.json"):
            p = os.path.join(local_data_dir, rel)
            if not os.path.isfile(p):
                continue
            try:
                with open(p, encoding="utf-8") as f:
                    rows = json.load(f)
            except (OSError, ValueError):
                continue
            for r in rows[: max_docs // 4]:
                if isinstance(r, dict):
                    texts.append(str(r.get("instruction", ""))[:max_chars])
                    texts.append(str(r.get("response", r.get("output", "")))[:max_chars])
    return texts


def verification_prompts(tokenizer, texts, sequence_len, n=MIN_PROMPTS, long_len=None):
    """>= n token-id prompts of varied length, each starting with <|bos|>: held-out text cut to lengths
    from 1 to a long one (past a sliding window when the model has one), plus chat prompts."""
    bos = tokenizer.get_bos_token_id()
    ids = [tokenizer.encode(t) for t in texts if t.strip()]
    stream = [tok for seq in ids for tok in seq] or [bos]
    cap = sequence_len
    lengths = [1, 5, 16, 33, 64, 100, long_len or 160]
    prompts = []
    for k, L in enumerate(lengths):
        L = max(1, min(L, cap))
        start = (k * 997) % max(1, len(stream))
        body = (stream[start:] + stream)[: L - 1]
        prompts.append([bos] + body)
    if all(t in tokenizer.get_special_tokens() for t in SPECIAL_TOKENS):
        for conv in _CONVERSATIONS[:3]:
            p = tokenizer.render_for_completion(conv) if conv["messages"][-1]["role"] == "assistant" else None
            if p and len(p) <= cap:
                prompts.append(p)
    while len(prompts) < n:
        prompts.append([bos] + stream[len(prompts) * 13:][: min(24, cap - 1)])
    return prompts


# -----------------------------------------------------------------------------
# Model card

def _read_reports(report_dir):
    reports = {}
    if report_dir and os.path.isdir(report_dir):
        for name in sorted(os.listdir(report_dir)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(report_dir, name)) as f:
                        reports[name[:-5]] = json.load(f)
                except (OSError, ValueError):
                    pass
    return reports


def checkpoint_lineage(source, model_tag, step, meta):
    """[{source, tag, step}] from the exported checkpoint back through its parents (mid/sft/rl metas
    record the checkpoint they started from), so the card only quotes reports about this model."""
    from nanochat.checkpoint import resolve_checkpoint
    chain = [{"source": source, "tag": model_tag, "step": step}]
    parent = (meta or {}).get("parent")
    while isinstance(parent, dict) and len(chain) < 8:
        chain.append({"source": parent.get("source"), "tag": parent.get("tag"), "step": parent.get("step")})
        try:
            ckpt_dir, pstep = resolve_checkpoint(parent["source"], parent["tag"], parent["step"])
            with open(os.path.join(ckpt_dir, f"meta_{pstep:06d}.json")) as f:
                parent = json.load(f).get("parent")
        except Exception:
            break
    return chain


# report/<name>.json -> the checkpoint stage it describes
_REPORT_STAGES = {"base_train": "base", "base_eval": "base", "mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}


def _report_stage(name, report):
    if name.startswith("chat_eval_"):
        return report.get("source") or name[len("chat_eval_"):]
    return _REPORT_STAGES.get(name)


def _fmt(x):
    return f"{x:.4f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _metric_rows(reports, lineage):
    """Markdown table rows from the reports whose (stage, model_tag, step) is in the lineage, and the
    names of the reports left out because they describe another checkpoint."""
    rows, skipped = [], []
    for name, r in sorted(reports.items()):
        stage = _report_stage(name, r)
        if stage is None:
            continue
        if not any(stage == c["source"] and r.get("model_tag") == c["tag"] and r.get("step") == c["step"]
                   for c in lineage):
            skipped.append(f"{name}.json (tag {r.get('model_tag')}, step {r.get('step')})")
            continue
        where = f"report/{name}.json ({stage} {r.get('model_tag')} step {r.get('step')})"
        found = []
        if name == "base_train":
            found += [("pretraining tokens", r.get("tokens")), ("validation bits per byte", r.get("val_bpb"))]
        elif name == "base_eval":
            found += [("CORE (centered accuracy)", r.get("core")), ("train bits per byte", r.get("train_bpb")),
                      ("validation bits per byte", r.get("val_bpb"))]
        elif name.startswith("chat_eval_"):
            for task, res in sorted((r.get("results") or {}).items()):
                if isinstance(res, dict):
                    found.append((f"{task} accuracy", res.get("accuracy")))
            found.append(("ChatCORE", r.get("chatcore")))
        else:
            found += [(f"{name} tokens", r.get("tokens")), (f"{name} validation loss", r.get("val_loss"))]
        rows += [f"| {label} | {_fmt(v)} | {where} |" for label, v in found if v is not None]
    return rows, skipped


def model_card(info, reports, verification=None):
    """README.md for the export: what the model is, how to load it, its metrics (from report/*.json, each
    row naming the report, tag and step it came from) and the verification figures."""
    cfg = GPTConfig(**info["model_config"])
    params = info["num_params"]
    custom = info["model_type"] == EXT_TYPE
    trust = ", trust_remote_code=True" if custom else ""
    stage, tag, step = info.get("source"), info.get("model_tag"), info.get("step")
    lines = [f"# nanochat {stage or ''} model{f' {tag}' if tag else ''}{f' (step {step})' if step is not None else ''}", ""]
    stages = {"base": "pretraining", "mid": "pretraining and midtraining", "sft": "pretraining, midtraining and SFT",
              "rl": "pretraining, midtraining, SFT and RL"}
    lines += [f"A small {'chat ' if stage in ('mid', 'sft', 'rl') else ''}language model trained from scratch with "
              f"nanochat ({stages.get(stage, 'training')}), exported for HuggingFace transformers.", ""]
    lines += ["## Architecture", "",
              f"- transformers model type: `{info['model_type']}`"
              + (" (custom code shipped in this directory: `modeling_nanochat_ext.py`; load with "
                 "`trust_remote_code=True`), because the built-in `nanochat` type lacks: "
                 + "; ".join(builtin_missing_features(cfg)) if custom and builtin_missing_features(cfg)
                 else " (custom code shipped in this directory)" if custom
                 else " (built into transformers, no remote code)"),
              f"- {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} query heads / {cfg.n_kv_head} KV heads "
              f"(head dim {cfg.head_dim}), MLP 4x with ReLU^2, context {cfg.sequence_len} tokens",
              f"- RoPE (base {cfg.rope_base:g}), QK RMSNorm after RoPE, parameter-free RMSNorm (eps {cfg.norm_eps:g}) "
              f"after the embedding, before every sublayer and at the end; untied embedding / lm_head; no biases; "
              f"logit softcap {cfg.softcap:g}",
              f"- value embeddings: {'yes' if cfg.value_embeds else 'no'}; residual scalars: "
              f"{'yes' if cfg.resid_scalars else 'no'}; attention windows: {cfg.window_pattern}",
              f"- parameters: {params['total']:,} total ({params['scaling']:,} in matmuls + lm_head, "
              f"{params['wte']:,} token embedding, {params['value_embeds']:,} value embeddings)",
              f"- vocabulary: {cfg.vocab_size} tokens (byte-level BPE, tiktoken-compatible), special tokens "
              + ", ".join(f"`{t}`" for t in info.get("special_tokens", [])), ""]
    rows, skipped = _metric_rows(reports, info.get("lineage") or [{"source": stage, "tag": tag, "step": step}])
    lines += ["## Metrics", ""]
    if rows:
        lines += ["From the run's report files (report/*.json), only those measured on this checkpoint or the ones "
                  "it was trained from:", "", "| metric | value | source |", "|---|---|---|", *rows, ""]
    else:
        lines += ["No report/*.json about this checkpoint was found, so no metrics are listed.", ""]
    if skipped:
        lines += ["Left out because they describe other checkpoints: " + ", ".join(skipped) + ".", ""]
    lines += ["## Usage", "", "```python", "import torch",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"tok = AutoTokenizer.from_pretrained(path{trust})",
              f"model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32{trust})",
              "# chat: the template renders nanochat's conversation format and ends with <|assistant_start|>",
              "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}],",
              "                              add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=64, do_sample=False)  # stops at <|assistant_end|>",
              "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
              "# plain completion: prepend <|bos|> as in training",
              "ids = tok(\"<|bos|>The capital of France is\", return_tensors=\"pt\")", "```", "",
              "With nanochat itself: `python -m scripts.chat_cli --source path/to/this/dir`.", "",
              "Notes: the tokenizer adds no BOS by itself (the chat template does). Text that spells a special "
              "token (e.g. `<|user_end|>`) is parsed as that special token by `tok(...)` and by the chat template; "
              "nanochat's own renderer treats such text in message content as plain text, so the two agree only "
              "for content without special-token text (pass `split_special_tokens=True` to tokenize it as text). "
              "Consecutive `text` parts of one assistant message are joined before tokenizing.", ""]
    if verification:
        v = verification
        lines += ["## Verification", "",
                  f"Checked with stock transformers {v['transformers_version']} at export time (fp32, CPU):", "",
                  f"- logits: max abs difference {v['max_logit_diff']:.2e} over {v['num_prompts']} prompts "
                  f"({v['num_positions']} positions; tolerance {v['atol']:g})",
                  f"- greedy generation: {v['greedy_tokens']} tokens identical on {v['num_greedy_prompts']} prompts; "
                  f"generate() with this generation config identical to nanochat's engine",
                  f"- tokenizer: identical ids on {v['num_texts']} held-out texts (special-token text both as "
                  f"special tokens and as plain text), identical decoding",
                  f"- chat template: apply_chat_template ids identical to nanochat's render_conversation on "
                  f"{v['num_conversations']} conversations", ""]
    else:
        lines += ["## Verification", "", "This export was written without verification (--no-verify).", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Export

def export_model(model, tokenizer, out_dir, modeling="auto", source=None, model_tag=None, step=None,
                 meta=None, report_dir=None, lineage=None):
    """Write an export directory for `model` (our GPT) and `tokenizer` into out_dir (created; must be
    empty or absent). Returns an info dict (also written to nanochat_export.json). lineage
    (checkpoint_lineage()) selects the report/*.json files the model card quotes. No verification:
    call verify_export next."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    config = model.config
    if config.vocab_size != tokenizer.get_vocab_size():
        raise ExportError(f"model vocab {config.vocab_size} != tokenizer vocab {tokenizer.get_vocab_size()}: "
                          f"the tokenizer is not the one this model was trained with")
    model_type = choose_model_type(config, modeling)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not empty: choose a new directory")
    os.makedirs(out_dir, exist_ok=True)

    hf_state = state_dict_to_hf(model.state_dict())
    save_file(hf_state, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_json(os.path.join(out_dir, "config.json"),
                      {**hf_config(config, tokenizer, model_type), "transformers_version": _transformers_version()})
    if model_type == EXT_TYPE:
        shutil.copyfile(os.path.join(os.path.dirname(__file__), EXT_MODELING_FILE),
                        os.path.join(out_dir, EXT_MODELING_FILE))
    bos, eos, pad = _special_ids(tokenizer)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(out_dir)
    write_tokenizer(tokenizer, out_dir, config.sequence_len)
    info = {"format": "nanochat-hf-export-v1", "model_type": model_type, "source": source, "model_tag": model_tag,
            "step": step, "lineage": lineage or [{"source": source, "tag": model_tag, "step": step}],
            "model_config": config.to_dict(), "num_params": model.num_params(),
            "tokenizer_fingerprint": tokenizer.fingerprint, "special_tokens": tokenizer.get_special_tokens(),
            "train_meta": {k: (meta or {}).get(k) for k in ("git", "total_batch_size", "num_iterations")
                           if (meta or {}).get(k) is not None},
            "verification": None}
    atomic_write_json(os.path.join(out_dir, META_FILE), info)
    reports = _read_reports(report_dir if report_dir is not None else os.path.join(get_base_dir(), "report"))
    info["reports"] = sorted(reports)
    atomic_write_bytes(os.path.join(out_dir, "README.md"), model_card(info, reports).encode("utf-8"))
    return info


def record_verification(out_dir, info, verification, report_dir=None):
    """Store the verification figures in nanochat_export.json and the model card."""
    info = {**info, "verification": verification}
    atomic_write_json(os.path.join(out_dir, META_FILE), {k: v for k, v in info.items() if k != "reports"})
    reports = _read_reports(report_dir if report_dir is not None else os.path.join(get_base_dir(), "report"))
    atomic_write_bytes(os.path.join(out_dir, "README.md"), model_card(info, reports, verification).encode("utf-8"))
    return info


def _transformers_version():
    import transformers
    return transformers.__version__


# -----------------------------------------------------------------------------
# Verification

def load_hf(out_dir, dtype=torch.float32):
    """(model, tokenizer) loaded from an export with stock transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with open(os.path.join(out_dir, "config.json")) as f:
        custom = json.load(f).get("model_type") == EXT_TYPE
    # trust_remote_code for the tokenizer too: AutoTokenizer reads config.json, whose auto_map names our code
    tok = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=custom)
    hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, trust_remote_code=custom)
    hf.eval()
    return hf, tok


def _hf_ids(x):
    """apply_chat_template returns a list, or a BatchEncoding/dict, depending on the version."""
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return list(x)


def _greedy_ours(model, prompt, n):
    return list(model.generate(prompt, n, temperature=0))


def _greedy_hf(hf, prompt, n, stop=True):
    """HF greedy continuation with the export's generation config; stop=False removes its end tokens
    so that exactly n tokens come back."""
    from transformers import GenerationConfig
    gc = hf.generation_config
    config = GenerationConfig(do_sample=False, max_new_tokens=n, bos_token_id=gc.bos_token_id,
                              pad_token_id=gc.pad_token_id, eos_token_id=gc.eos_token_id if stop else [])
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def verify_export(out_dir, model, tokenizer, texts=None, conversations=None, atol=LOGIT_ATOL,
                  greedy_tokens=GREEDY_TOKENS, log=print0):
    """Load out_dir with stock transformers and compare it with (model, tokenizer). Returns the figures;
    raises VerificationError listing every mismatch."""
    from nanochat.engine import Engine
    texts = list(texts) if texts is not None else heldout_texts()
    conversations = list(conversations) if conversations is not None else list(_CONVERSATIONS)
    failures = []
    saved_dtype = model.compute_dtype
    model.eval()
    model.compute_dtype = torch.float32  # the comparison is in fp32 (the master weights are fp32)
    try:
        try:
            hf, hf_tok = load_hf(out_dir)
        except Exception as e:
            raise VerificationError(f"stock transformers cannot load {out_dir}: {type(e).__name__}: {e}") from None
        cfg = model.config

        # 1. tokenizer: ids on held-out text, special-token text both ways, decoding
        if len(hf_tok) != tokenizer.get_vocab_size():
            failures.append(f"tokenizer size {len(hf_tok)} != ours {tokenizer.get_vocab_size()}")
        for t in tokenizer.get_special_tokens():
            if hf_tok.convert_tokens_to_ids(t) != tokenizer.encode_special(t):
                failures.append(f"special token {t!r}: HF id {hf_tok.convert_tokens_to_ids(t)} != ours "
                                f"{tokenizer.encode_special(t)}")
        bad_texts = []
        for text in texts:
            as_special = hf_tok(text, add_special_tokens=False)["input_ids"]
            as_text = hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ours_special = tokenizer.enc.encode(text, allowed_special="all")
            ours_text = tokenizer.encode(text)
            if as_special != ours_special or as_text != ours_text:
                bad_texts.append(text[:60])
            elif hf_tok.decode(ours_text) != tokenizer.decode(ours_text):
                bad_texts.append("decode: " + text[:52])
        if bad_texts:
            failures.append(f"token ids differ on {len(bad_texts)} of {len(texts)} texts, e.g. {bad_texts[:3]}")

        # 2. chat template == render_conversation / render_for_completion
        n_conv = 0
        if hf_tok.chat_template:
            for conv in conversations:
                msgs = conv["messages"]
                try:
                    if msgs[-1]["role"] == "assistant":
                        ours = tokenizer.render_conversation(conv)[0]
                        theirs = _hf_ids(hf_tok.apply_chat_template(msgs, tokenize=True))
                        ours_p = tokenizer.render_for_completion(conv)
                        theirs_p = _hf_ids(hf_tok.apply_chat_template(msgs[:-1], tokenize=True,
                                                                      add_generation_prompt=True))
                        ok = ours == theirs and ours_p == theirs_p
                    else:
                        ours = tokenizer.render_for_completion({"messages": msgs + [{"role": "assistant", "content": ""}]})
                        theirs = _hf_ids(hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
                        ok = ours == theirs
                except Exception as e:
                    ok, theirs = False, f"{type(e).__name__}: {e}"
                n_conv += 1
                if not ok:
                    failures.append(f"chat template differs from render_conversation on {json.dumps(msgs)[:120]}")
        elif all(t in tokenizer.get_special_tokens() for t in SPECIAL_TOKENS):
            failures.append("the export has no chat template")

        # 3. logits on >= 8 prompts, fp32
        windows = [w for w in window_sizes(cfg) if w]
        long_len = min(cfg.sequence_len, (max(windows) + 40) if windows else 160)
        prompts = verification_prompts(tokenizer, texts, cfg.sequence_len, long_len=long_len)
        max_diff, positions = 0.0, 0
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], dtype=torch.long, device=model.lm_head.weight.device)
                ours = model(ids).float().cpu()
                theirs = hf(ids.cpu()).logits.float()
                if theirs.shape != ours.shape:
                    failures.append(f"logits shape {tuple(theirs.shape)} != ours {tuple(ours.shape)}")
                    continue
                max_diff = max(max_diff, (theirs - ours).abs().max().item())
                positions += len(p)
        if not max_diff <= atol:
            failures.append(f"max abs logit difference {max_diff:.3e} > {atol:g}")
        log(f"logits: max abs diff {max_diff:.3e} over {len(prompts)} prompts ({positions} positions)")

        # 4. greedy: 32 tokens with stopping disabled (vs our reference sampler), then HF's generate with
        # the export's generation config vs our engine (which stops at the same end tokens)
        gen_prompts = [p for p in prompts if len(p) + greedy_tokens < cfg.sequence_len][:4]
        engine = Engine(model, tokenizer)
        for p in gen_prompts:
            ours = _greedy_ours(model, p, greedy_tokens)
            theirs = _greedy_hf(hf, p, greedy_tokens, stop=False)
            if len(theirs) != greedy_tokens:
                failures.append(f"HF generate returned {len(theirs)} tokens, not {greedy_tokens}, with end tokens off")
            elif ours != theirs:
                failures.append(f"greedy {greedy_tokens} tokens differ on a {len(p)}-token prompt: ours "
                                f"{ours[:12]}... HF {theirs[:12]}...")
            eng = [col[0] for col, _ in engine.generate(p, max_tokens=greedy_tokens, temperature=0)]
            theirs = _greedy_hf(hf, p, greedy_tokens, stop=True)
            if eng != theirs:
                failures.append(f"HF generate {theirs[:12]}... != engine {eng[:12]}... on a {len(p)}-token prompt")
        log(f"greedy: {len(gen_prompts)} prompts x {greedy_tokens} tokens compared")
    finally:
        model.compute_dtype = saved_dtype
    import transformers
    result = {"ok": not failures, "max_logit_diff": max_diff, "atol": atol, "num_prompts": len(prompts),
              "num_positions": positions, "greedy_tokens": greedy_tokens, "num_greedy_prompts": len(gen_prompts),
              "num_texts": len(texts), "num_conversations": n_conv, "transformers_version": transformers.__version__,
              "failures": failures}
    if failures:
        raise VerificationError("the export does not reproduce the model:\n  - " + "\n  - ".join(failures))
    return result


# -----------------------------------------------------------------------------
# Import

def is_export_dir(path):
    return os.path.isdir(str(path)) and os.path.isfile(os.path.join(str(path), "config.json"))


def _load_hf_weights(path):
    from safetensors.torch import load_file
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for s in shards:
            state.update(load_file(os.path.join(path, s)))
        return state
    raise ExportError(f"{path} has no {WEIGHTS_FILE} (or sharded model.safetensors.index.json)")


def load_export(path, device, phase="eval", compute_dtype=None):
    """(model, tokenizer, meta) from an HF export directory of type nanochat or nanochat_ext: our GPT with
    the export's weights and our Tokenizer rebuilt from its tokenizer.json. meta has model_config,
    tokenizer_fingerprint, source (the path), step and the export's own record when present."""
    path = str(path)
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            hf_cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is not an HF export directory ({cfg_path}: {e})") from None
    config = config_from_hf(hf_cfg)
    tokenizer = tokenizer_from_hf(path)
    if config.vocab_size != tokenizer.get_vocab_size():
        raise ExportError(f"{path}: config vocab_size {config.vocab_size} != tokenizer vocab "
                          f"{tokenizer.get_vocab_size()}")
    state = state_dict_from_hf(_load_hf_weights(path), config)
    model = build_model(config, device, compute_dtype or torch.float32)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.train(phase == "train")
    record = {}
    if os.path.isfile(os.path.join(path, META_FILE)):
        with open(os.path.join(path, META_FILE)) as f:
            record = json.load(f)
        if record.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
            raise ExportError(f"{path}: tokenizer.json does not rebuild the tokenizer recorded in {META_FILE} "
                              f"(fingerprint {tokenizer.fingerprint[:12]} != {record['tokenizer_fingerprint'][:12]})")
    meta = {"model_config": config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint, "source": path,
            "step": record.get("step"), "export": record}
    print0(f"Loaded HF export ({hf_cfg['model_type']}) from {path}")
    return model, tokenizer, meta


# -----------------------------------------------------------------------------
# Speed: our engine vs transformers' generate on the same weights

def measure_generate_speed(model, tokenizer, export_dir, prompt_len=16, new_tokens=64, repeats=3,
                           dtype=torch.float32, log=print0):
    """Greedy decode throughput at batch 1 (tokens/s, prefill included, best of `repeats` after a warm-up)
    of our Engine and of transformers' generate (end tokens off) on the same weights, both in `dtype`,
    transformers on the CPU. Returns {"engine_tok_s", "hf_tok_s", "speedup", ...}."""
    from nanochat.engine import Engine
    from transformers import AutoModelForCausalLM
    with open(os.path.join(export_dir, "config.json")) as f:
        custom = json.load(f).get("model_type") == EXT_TYPE
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype, trust_remote_code=custom).eval()
    saved = model.compute_dtype
    model.eval()
    model.compute_dtype = dtype
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    prompt = ([bos] + tokenizer.encode(text))[:prompt_len]
    new_tokens = min(new_tokens, model.config.sequence_len - len(prompt))

    def run_engine():
        n = 0
        for _ in engine.generate(prompt, max_tokens=new_tokens, temperature=0):
            n += 1
        return n

    def run_hf():
        return len(_greedy_hf(hf, prompt, new_tokens, stop=False))

    def best(fn):
        """(best wall-clock rate, best rate per second of this process's CPU time, tokens). The CPU-time
        rate is the one to trust on a machine shared with other jobs."""
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
            engine_rate, engine_cpu, engine_n = best(run_engine)
        hf_rate, hf_cpu, hf_n = best(run_hf)
    finally:
        model.compute_dtype = saved
    # The engine stops early at <|assistant_end|>/<|bos|>; the rate is per token either way.
    result = {"engine_tok_s": engine_rate, "hf_tok_s": hf_rate, "speedup": engine_rate / hf_rate,
              "engine_tok_per_cpu_s": engine_cpu, "hf_tok_per_cpu_s": hf_cpu, "speedup_cpu_time": engine_cpu / hf_cpu,
              "prompt_tokens": len(prompt), "new_tokens": new_tokens, "engine_tokens": engine_n, "hf_tokens": hf_n,
              "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    log(f"decode speed at batch 1 ({result['dtype']}, {result['threads']} thread(s), {len(prompt)}-token prompt, "
        f"{new_tokens} new tokens): engine {engine_rate:.1f} tok/s, transformers generate {hf_rate:.1f} tok/s, "
        f"speedup {result['speedup']:.2f}x (per CPU-second: {engine_cpu:.1f} vs {hf_cpu:.1f}, "
        f"{result['speedup_cpu_time']:.2f}x)")
    return result
