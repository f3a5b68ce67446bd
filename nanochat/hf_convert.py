"""
HuggingFace <-> nanochat conversion, both ways: config.json, weight names, the tokenizer and its chat template;
load_export (an export folder back into GPT + Tokenizer) and load_any ("a checkpoint stage or an export folder").
Two model types: "nanochat", transformers' built-in type, represents models trained with `--no-value-embeds
--no-resid-scalars --window-pattern L` exactly; "nanochat_ext" ships modeling_nanochat_ext.py for the rest.
"""

import os
import json

import torch

from nanochat.common import atomic_write_json, print0
from nanochat.gpt import GPT, GPTConfig, CausalSelfAttention, build_model, has_value_embed
from nanochat.attention import window_sizes
from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS
from nanochat.checkpoint import CheckpointError, STAGE_DIRS, load_model

BUILTIN_TYPE = "nanochat"
EXT_TYPE = "nanochat_ext"
EXT_MODELING_FILE = "modeling_nanochat_ext.py"
META_FILE = "nanochat_export.json"
WEIGHTS_FILE = "model.safetensors"


class ExportError(CheckpointError):
    """Cannot export/import as asked; a CheckpointError, so load_any's callers handle it like a checkpoint's."""


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None


def builtin_missing_features(config):
    """Features of our model that transformers' built-in `nanochat` type lacks (empty = representable)."""
    windows = window_sizes(config)
    return [msg for has, msg in [
        (config.value_embeds, "value embeddings (value_embeds=True; train with --no-value-embeds to avoid them)"),
        (config.resid_scalars, "per-layer residual scalars (resid_scalars=True; train with --no-resid-scalars)"),
        (any(w is not None for w in windows), f"sliding-window attention (window_pattern={config.window_pattern!r} "
                                             f"gives windows {windows}; train with --window-pattern L)")] if has]


def choose_model_type(config, modeling="auto"):
    """'auto' -> built-in when it represents the model exactly, else our own code; 'builtin' refuses
    (ExportError naming the features) when it cannot; 'custom' always ships our code."""
    if modeling not in ("auto", "builtin", "custom"):
        raise ExportError(f"modeling={modeling!r}: use 'auto', 'builtin' or 'custom'")
    missing = builtin_missing_features(config)
    if modeling == "builtin" and missing:
        raise ExportError("transformers' built-in 'nanochat' model type cannot represent this model, it lacks: "
                          + "; ".join(missing) + ". Export with --modeling custom (ships modeling_nanochat_ext.py, "
                          "loaded with trust_remote_code=True) or --modeling auto.")
    return EXT_TYPE if missing or modeling == "custom" else BUILTIN_TYPE


def special_ids(tokenizer):
    """(bos, eos list, pad). Generation stops where our engine does: <|assistant_end|> or <|bos|> (a new document).
    pad = <|assistant_end|>, never bos, or transformers would infer a mask hiding every prompt's leading <|bos|>."""
    bos = tokenizer.get_bos_token_id()
    if "<|assistant_end|>" not in tokenizer.get_special_tokens():
        return bos, [bos], bos
    end = tokenizer.encode_special("<|assistant_end|>")
    return bos, [end, bos], end


def _layouts(config):
    """(layers with a value embedding, per-layer attention window with 0 = full context)."""
    return [i for i in range(config.n_layer) if has_value_embed(config, i)], [w or 0 for w in window_sizes(config)]


# config.json key -> our GPTConfig field, both ways (a key missing on import takes GPTConfig's default)
_CONFIG_KEYS = {"vocab_size": "vocab_size", "hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head",
                "max_position_embeddings": "sequence_len", "rms_norm_eps": "norm_eps"}


def hf_config(config, tokenizer, model_type):
    """config.json contents (a dict) for our GPTConfig."""
    bos, eos, pad = special_ids(tokenizer)
    common = {**{k: getattr(config, f) for k, f in _CONFIG_KEYS.items()}, "intermediate_size": 4 * config.n_embd,
              "final_logit_softcapping": config.softcap if config.softcap > 0 else None, "tie_word_embeddings": False,
              "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "use_cache": True, "dtype": "float32"}
    if model_type == BUILTIN_TYPE:
        return {"architectures": ["NanoChatForCausalLM"], "model_type": BUILTIN_TYPE, **common,
                "hidden_act": "relu2", "attention_bias": False, "attention_dropout": 0.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}}
    module = EXT_MODELING_FILE.removesuffix(".py")
    ve_layers, windows = _layouts(config)
    return {"architectures": ["NanoChatExtForCausalLM"], "model_type": EXT_TYPE, **common,
            "auto_map": {k: f"{module}.NanoChatExt{v}" for k, v in
                         [("AutoConfig", "Config"), ("AutoModel", "Model"), ("AutoModelForCausalLM", "ForCausalLM")]},
            "rope_theta": config.rope_base, "value_embed_layers": ve_layers,
            "ve_gate_channels": CausalSelfAttention.VE_GATE_CHANNELS, "resid_scalars": config.resid_scalars,
            "attention_windows": windows, "nanochat_window_pattern": config.window_pattern}


def config_from_hf(hf):
    """Our GPTConfig from a config.json dict of either type; ExportError naming anything we cannot run."""
    mt = hf.get("model_type")
    if mt not in (BUILTIN_TYPE, EXT_TYPE):
        raise ExportError(f"model_type {mt!r} is not a nanochat model: only '{BUILTIN_TYPE}' and '{EXT_TYPE}' import")
    H, n_head = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    problems = [msg for bad, msg in [
        (hf.get("intermediate_size", 4 * H) != 4 * H, f"intermediate_size={hf.get('intermediate_size')} != 4 x {H}"),
        (hf.get("hidden_act", "relu2") != "relu2", f"hidden_act={hf.get('hidden_act')!r} (nanochat uses relu2)"),
        (hf.get("attention_bias"), "attention_bias=true (nanochat has no biases)"),
        (hf.get("tie_word_embeddings"), "tie_word_embeddings=true (nanochat's embedding and lm_head are separate)"),
        (hf.get("head_dim") not in (None, H // n_head),
         f"head_dim={hf.get('head_dim')} != hidden_size / num_attention_heads = {H // n_head}"),
        (mt == BUILTIN_TYPE and rope.get("rope_type", "default") != "default",
         f"rope_type={rope.get('rope_type')!r} (nanochat uses plain RoPE)"),
    ] if bad]
    if problems:
        raise ExportError("this export uses features nanochat's model does not have: " + "; ".join(problems))
    if mt == BUILTIN_TYPE:
        rope_base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        value_embeds, resid_scalars, pattern = False, False, "L"
    else:
        rope_base, pattern = hf["rope_theta"], hf.get("nanochat_window_pattern", "L")
        value_embeds, resid_scalars = bool(hf.get("value_embed_layers")), bool(hf.get("resid_scalars"))
    config = GPTConfig(**{f: hf[k] for k, f in _CONFIG_KEYS.items() if hf.get(k) is not None},
                       **({} if hf.get("num_key_value_heads") else {"n_kv_head": n_head}), window_pattern=pattern,
                       value_embeds=value_embeds, resid_scalars=resid_scalars,
                       softcap=float(hf.get("final_logit_softcapping") or 0.0), rope_base=float(rope_base))
    if mt == EXT_TYPE:
        # The layout is derived from our config on import; refuse an export whose explicit layout differs.
        want_ve, want_windows = _layouts(config)
        if list(hf.get("value_embed_layers") or []) != want_ve:
            raise ExportError(f"value_embed_layers={hf.get('value_embed_layers')} is not nanochat's layout {want_ve}")
        if list(hf.get("attention_windows") or [0] * config.n_layer) != want_windows:
            raise ExportError(f"attention_windows={hf.get('attention_windows')} is not what window_pattern="
                              f"{pattern!r} gives ({want_windows})")
    return config


# ours -> HF (both model types use the same names); per layer, the suffix after transformer.h.{i}.
_LAYER_NAMES = {**{f"attn.c_{x}.weight": f"self_attn.{x}_proj.weight" for x in "qkv"},
                "attn.c_proj.weight": "self_attn.o_proj.weight", "attn.ve_gate.weight": "self_attn.ve_gate.weight",
                "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_proj.weight": "mlp.fc2.weight"}
_TOP_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
              "resid_lambdas": "model.resid_lambdas", "x0_lambdas": "model.x0_lambdas"}


def hf_name(name):
    name = name.removeprefix("_orig_mod.")
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name.startswith("transformer.h."):
        i, rest = name[len("transformer.h."):].split(".", 1)
        if rest in _LAYER_NAMES:
            return f"model.layers.{i}.{_LAYER_NAMES[rest]}"
    if name.startswith("value_embeds."):
        return "model." + name
    raise ExportError(f"no HF name for parameter {name!r}: nanochat/hf_convert.py needs updating for this model")


def state_dict_from_hf(hf_state, config):
    """HF weights -> our state dict, via the inverse of hf_name over the keys our model has."""
    with torch.device("meta"):
        inverse = {hf_name(n): n for n in GPT(config).state_dict()}
    unknown, missing = sorted(set(hf_state) - set(inverse)), sorted(set(inverse) - set(hf_state))
    if unknown or missing:
        raise ExportError(f"export weights do not match its config: unexpected {unknown[:5]}, missing {missing[:5]}")
    return {inverse[k]: v for k, v in hf_state.items()}


# Strings that trip tokenizer conversions (contractions, digits, special-token text, scripts, emoji,
# odd whitespace); the import checks them, the verification adds held-out text.
TRICKY_TEXTS = [
    "Hello world! It's a test: we'll see, they've gone, I'M HERE, you'D think.",
    "Numbers 1 12 123 1234 12345 3.14159 -42 1e-10 0x1F 2024-07-03 $1,234.56",
    "Special-token text as plain text: <|bos|> <|user_start|>hi<|user_end|><|assistant_start|>"
    "<|python_start|>1+1<|python_end|><|output_start|>2<|output_end|><|assistant_end|> <|endoftext|>",
    "unicode: héllo wörld naïve café — “quotes” ‘single’ … ½ ∑ ∫ √ ≠ ≤ 日本語のテキスト 中文 한국어 "
    "Ελληνικά русский عربي עברית हिन्दी ไทย",
    "emoji: 😀 🤖👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨🔥 and a lone variation selector \ufe0f",
    "whitespace:  two  spaces\tTab\t\ttabs\nnewline\r\nCRLF\n\n\nblank lines   \n  trailing   ",
    "odd spaces:\u00a0nbsp\u2009thin\u3000ideographic\u2028line sep\u0085nel\u200bzero-width",
    "code:\n    def f(x):\n        return x ** 2  # square\n\tif (a&&b) { printf(\"%d\\n\", a[i]); }", "", " ", "a"]


def hf_tokenizer_object(tokenizer):
    """A `tokenizers.Tokenizer` equal to ours: our ranks in the GPT-2 byte->unicode alphabet; merges recovered
    from the ranks (each split into two tokens, ordered by the merged token's rank, so merges happen in tiktoken's
    order); our split regex, then byte-level; specials as added tokens. ignore_merges=True mirrors tiktoken
    taking a whole piece that is a token."""
    from tokenizers import Tokenizer as HFTokenizer, Regex, AddedToken, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    ranks, b2u = tokenizer.get_mergeable_ranks(), bytes_to_unicode()
    s = {tok: "".join(b2u[x] for x in tok) for tok in ranks}  # token bytes -> byte-level alphabet string
    merges = []
    for tok, rank in ranks.items():
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges.extend((rank, a, b) for a, b in sorted(splits, key=lambda p: (ranks[p[0]], ranks[p[1]])))
    merges.sort(key=lambda m: m[0])
    hf = HFTokenizer(models.BPE(vocab={s[tok]: rank for tok, rank in ranks.items()},
                                merges=[(s[a], s[b]) for _, a, b in merges], fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.get_pattern()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted((tokenizer.encode_special(t), t) for t in tokenizer.get_special_tokens())
    for expected, (i, t) in enumerate(specials, start=len(ranks)):
        if i != expected:
            raise ExportError(f"special token {t!r} has id {i}, but HF appends added tokens after the {len(ranks)} "
                              f"BPE tokens (expected id {expected}): this vocabulary layout cannot be exported")
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in specials])
    return hf


# render_conversation as a Jinja chat template, token for token: <|bos|>, a leading system message merged
# into the first user turn as system + "\n\n" + text, strict user/assistant alternation, assistant content
# as a string or a list of text / python / python_output parts, add_generation_prompt -> <|assistant_start|>.
# Every tag trims the whitespace around it, so only the {{ }} expressions produce text.
CHAT_TEMPLATE = r"""
{%- set has_system = messages and messages[0]['role'] == 'system' -%}
{%- set turns = messages[1:] if has_system else messages -%}
{%- if has_system and not turns -%}
    {{- raise_exception('a system message needs a user message to merge into') -}}
{%- endif -%}
{{- bos_token -}}
{%- for m in turns -%}
    {%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
        {{- raise_exception('roles must alternate user/assistant starting with user (after an optional '
                            ~ 'leading system message); message ' ~ loop.index0 ~ ' has role ' ~ m['role']) -}}
    {%- elif m['role'] == 'user' and m['content'] is not string -%}
        {{- raise_exception('user message content must be a string') -}}
    {%- elif m['role'] == 'user' -%}
        {%- set system_prefix = messages[0]['content'] ~ '\n\n' if loop.first and has_system else '' -%}
        {{- '<|user_start|>' ~ system_prefix ~ m['content'] ~ '<|user_end|>' -}}
    {%- elif m['content'] is string -%}
        {{- '<|assistant_start|>' ~ m['content'] ~ '<|assistant_end|>' -}}
    {%- else -%}
        {{- '<|assistant_start|>' -}}
        {%- for part in m['content'] -%}
            {%- if part['type'] == 'text' -%}{{- part['text'] -}}
            {%- elif part['type'] == 'python' -%}{{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}
            {%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}
            {%- else -%}{{- raise_exception('assistant content part type must be text, python or python_output') -}}
            {%- endif -%}
        {%- endfor -%}
        {{- '<|assistant_end|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}
"""


def write_tokenizer(tokenizer, out_dir, sequence_len):
    """tokenizer.json, tokenizer_config.json (bos/eos/pad) and the chat template when it has our chat tokens."""
    from transformers import PreTrainedTokenizerFast
    bos, eos, pad = special_ids(tokenizer)
    name = tokenizer.id_to_token
    has_chat = all(t in tokenizer.get_special_tokens() for t in SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer_object(tokenizer), bos_token=name(bos),
                                  eos_token=name(eos[0]), pad_token=name(pad), model_max_length=sequence_len,
                                  chat_template=CHAT_TEMPLATE if has_chat else None,
                                  clean_up_tokenization_spaces=False)
    tok.save_pretrained(out_dir)
    # Name the class every transformers version knows (v5 aliases it to its tokenizers backend) and keep
    # the template in tokenizer_config.json too, for versions that do not read chat_template.jinja.
    path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = {**read_json(path), "tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    atomic_write_json(path, cfg)


def tokenizer_from_hf(path):
    """Our Tokenizer from an export's tokenizer.json + tokenizer_config.json; refuses one tiktoken cannot
    reproduce, checking the tricky strings against the tokenizers library itself."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tj_path = os.path.join(path, "tokenizer.json")
    tj = read_json(tj_path)
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{tj_path}: model type {model.get('type')!r} is not BPE")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        raise ExportError(f"{tj_path}: pre-tokenizer is not Split(regex, isolated) + ByteLevel(use_regex=false); "
                          f"nanochat's tiktoken tokenizer cannot reproduce it")
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    try:
        ranks = {bytes(u2b[c] for c in s): i for s, i in model["vocab"].items()}
    except KeyError as e:
        raise ExportError(f"{tj_path}: vocab entry with a character outside the byte-level alphabet ({e})") from None
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    bos = read_json(os.path.join(path, "tokenizer_config.json")).get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if bos not in specials:
        raise ExportError(f"{path}: bos_token {bos!r} is not one of the special tokens {sorted(specials)}")
    tok = Tokenizer(steps[0]["pattern"]["Regex"], ranks, specials, bos_token=bos,
                    name=os.path.basename(os.path.abspath(path)))
    hf = HFTokenizer.from_file(tj_path)
    for text in TRICKY_TEXTS:
        if hf.encode(text, add_special_tokens=False).ids != tok.enc.encode(text, allowed_special="all"):
            raise ExportError(f"{tj_path}: tiktoken built from this vocabulary encodes {text[:40]!r} differently "
                              f"than the tokenizers library; cannot import it exactly")
    return tok


def load_export(path, device, phase="eval", compute_dtype=None):
    """(model, tokenizer, meta) from an HF export folder of either type; meta has model_config,
    tokenizer_fingerprint, source (the path), step and the export's own record when present."""
    path = str(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ExportError(f"{path} is not an HF export directory (it has no config.json)")
    hf_cfg = read_json(os.path.join(path, "config.json"))
    config = config_from_hf(hf_cfg)
    tokenizer = tokenizer_from_hf(path)
    if config.vocab_size != tokenizer.get_vocab_size():
        raise ExportError(f"{path}: config vocab_size {config.vocab_size} != tokenizer's {tokenizer.get_vocab_size()}")
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")  # a save_pretrained may have sharded the weights
    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        shards = [WEIGHTS_FILE]
    elif os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
    else:
        raise ExportError(f"{path} has no {WEIGHTS_FILE} (or sharded model.safetensors.index.json)")
    state = state_dict_from_hf({k: v for f in shards for k, v in load_file(os.path.join(path, f)).items()}, config)
    model = build_model(config, device, compute_dtype or torch.float32)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.train(phase == "train")
    record = read_json(os.path.join(path, META_FILE)) if os.path.isfile(os.path.join(path, META_FILE)) else {}
    if record.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise ExportError(f"{path}: tokenizer.json does not rebuild the tokenizer recorded in {META_FILE} "
                          f"(fingerprint {tokenizer.fingerprint[:12]} != {record['tokenizer_fingerprint'][:12]})")
    meta = {"model_config": config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint, "source": path,
            "step": record.get("step"), "export": record}
    print0(f"Loaded HF export ({hf_cfg['model_type']}) from {path}")
    return model, tokenizer, meta


def load_any(source, device, phase="eval", model_tag=None, step=None, compute_dtype=None, tokenizer=None):
    """(model, tokenizer, meta) from a checkpoint stage ('base', 'mid', 'sft', 'rl'; see
    checkpoint.load_model) or from the path of an HF export folder (which brings its own tokenizer)."""
    if source in STAGE_DIRS:
        return load_model(source, device, phase=phase, model_tag=model_tag, step=step, compute_dtype=compute_dtype,
                          tokenizer=tokenizer)
    if not os.path.isdir(str(source)):
        raise CheckpointError(f"unknown checkpoint source {source!r}: use one of {', '.join(STAGE_DIRS)} "
                              f"or the path of an existing HF export directory")
    if model_tag is not None or step is not None:
        raise CheckpointError(f"--model-tag/--step do not apply to an export directory ({source}): drop them")
    model, export_tokenizer, meta = load_export(source, device, phase=phase, compute_dtype=compute_dtype)
    if tokenizer is not None and tokenizer.fingerprint != export_tokenizer.fingerprint:
        raise CheckpointError(f"the tokenizer passed in differs from the one shipped in {source}")
    return model, export_tokenizer, meta
