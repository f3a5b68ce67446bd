"""Tests for nanochat/tokenizer.py: training, encoding vs the trainer's own encoder and vs tiktoken's
stock encodings, save/load/fingerprint, token_bytes, and the conversation format (ids + loss mask)."""

import copy
import json
import shutil
import hashlib

import pytest
import torch
import rustbpe
import tiktoken
import tiktoken.load
from hypothesis import given, settings, HealthCheck, strategies as st

from nanochat.tokenizer import (Tokenizer, TokenizerError, SPECIAL_TOKENS, SPLIT_PATTERN, MIN_VOCAB_SIZE,
                                STOCK_ENCODINGS, get_tokenizer, get_tokenizer_dir, get_token_bytes)

N_MERGES = 300
VOCAB = 256 + len(SPECIAL_TOKENS) + N_MERGES


def _docs(shared_data, max_chars=1_500_000, cap=10_000):
    """Real prose + web text + encyclopedia, cropped like tok_train does."""
    root = shared_data / "pretrain_text"
    texts = [(root / "nltk_gutenberg" / n).read_text(encoding="utf-8")
             for n in ("austen-emma.txt", "melville-moby_dick.txt", "carroll-alice.txt")]
    texts += [json.loads(line)["text"] for line in (root / "llamafactory_demo" / "c4_demo.jsonl").open(encoding="utf-8")]
    texts.append((root / "llamafactory_demo" / "wiki_demo.txt").read_text(encoding="utf-8"))
    docs, total = [], 0
    for t in texts:
        for i in range(0, len(t), cap):
            docs.append(t[i:i + cap])
            total += len(docs[-1])
            if total >= max_chars:
                return docs
    return docs


@pytest.fixture(scope="module")
def docs(shared_data):
    return _docs(shared_data)


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train(iter(docs), VOCAB)


@pytest.fixture(scope="module")
def wiki_text(shared_data):
    return (shared_data / "pretrain_text" / "llamafactory_demo" / "wiki_demo.txt").read_text(encoding="utf-8")[:300_000]


# -----------------------------------------------------------------------------
# training and encoding

def test_vocab_size_and_special_ids(tok):
    assert tok.get_vocab_size() == VOCAB
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    assert tok.get_pattern() == SPLIT_PATTERN
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|nope|>")


def test_vocab_size_validation():
    with pytest.raises(ValueError, match=f"vocab_size=265 is too small.*>= {MIN_VOCAB_SIZE}"):
        Tokenizer.train(iter(["hello world"]), 265)
    # too little text to find the requested number of merges: an error, not a silently smaller vocab
    with pytest.raises(ValueError, match="only supported .* merges"):
        Tokenizer.train(iter(["ab ab ab"]), 256 + len(SPECIAL_TOKENS) + 50)


def test_encode_matches_rustbpe_trainer(tok, docs, wiki_text):
    # rustbpe's training is deterministic, so a second trainer run on the same data gives the same merges;
    # then its own Rust encoder is the reference for our tiktoken-based encoding.
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(docs), VOCAB - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    assert {bytes(b): r for b, r in ref.get_mergeable_ranks()} == tok.get_mergeable_ranks()
    assert tok.encode(wiki_text) == ref.encode(wiki_text)
    sample = docs[::40]
    assert tok.encode(sample) == ref.batch_encode(sample)


def test_encode_uses_merges(tok, wiki_text):
    ids = tok.encode(wiki_text)
    assert len(ids) < 0.6 * len(wiki_text.encode("utf-8"))  # 300 merges compress English well below 1 byte/token
    assert max(ids) >= 256


_text = st.text(max_size=300)  # hypothesis never generates lone surrogates for str (not valid UTF-8)
_from_bytes = st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="replace"))
_latin = st.binary(max_size=300).map(lambda b: b.decode("latin-1"))  # every byte as a char, incl. controls
_tricky = st.lists(st.sampled_from(SPECIAL_TOKENS + ["🙂", "👩‍💻", "\x00", "\r\n", "\t", "  ", "12345", "é", "한",
                                                     "\u200b", "\ufeff", "'s", "'LL"]), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.one_of(_text, _from_bytes, _latin, _tricky))
def test_roundtrip_property(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")
    assert all(i < tok.get_vocab_size() - len(SPECIAL_TOKENS) for i in ids)  # specials never come from text


def test_special_strings_in_text_are_plain_text(tok):
    text = "hi <|bos|> there <|assistant_end|><|user_start|>"
    ids = tok.encode(text)
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert not special_ids & set(ids)
    assert tok.decode(ids) == text
    assert not special_ids & set(tok.encode([text, text])[1])


def test_prepend_append(tok):
    body = tok.encode("hello world")
    bos = tok.get_bos_token_id()
    end = tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hello world", prepend=bos, append="<|assistant_end|>") == [bos] + body + [end]
    assert tok.encode("hello world", append=7) == body + [7]
    assert tok.encode(["hello world", ""], prepend=bos) == [[bos] + body, [bos]]
    assert tok("hello world") == body  # __call__ is encode
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", prepend="<|eos|>")
    with pytest.raises(ValueError, match="token id"):
        tok.encode("x", append=VOCAB)
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


def test_batch_equals_single(tok, docs):
    batch = docs[:64] + ["", "🙂"]
    assert tok.encode(batch, num_threads=4) == [tok.encode(d) for d in batch]
    assert tok.encode(tuple(batch[:3]), num_threads=1) == [tok.encode(d) for d in batch[:3]]


# -----------------------------------------------------------------------------
# persistence and identity

def test_save_load_roundtrip(tok, tmp_path, wiki_text, monkeypatch):
    d = tmp_path / "tokenizer"
    tok.save(d)
    assert sorted(p.name for p in d.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.tiktoken"]
    loaded = Tokenizer.load(d)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.encode(wiki_text) == tok.encode(wiki_text)
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert loaded.render_conversation(conv) == tok.render_conversation(conv)
    meta = json.loads((d / "tokenizer.json").read_text())
    assert meta["fingerprint"] == tok.fingerprint and meta["vocab_size"] == VOCAB and meta["pattern"] == SPLIT_PATTERN
    assert meta["special_tokens"] == {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    # the ranks file is tiktoken's own format (no pickle); disable tiktoken's path-keyed temp cache
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken.load.load_tiktoken_bpe(str(d / "tokenizer.tiktoken")) == tok.get_mergeable_ranks()
    assert torch.equal(torch.load(d / "token_bytes.pt", weights_only=True), tok.token_bytes())


def test_fingerprint_identifies_tokenizer(tok, docs):
    same = Tokenizer.train(iter(docs), VOCAB)
    assert same.fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 64
    smaller = Tokenizer.train(iter(docs), VOCAB - 1)
    assert smaller.fingerprint != tok.fingerprint
    other_data = Tokenizer.train(iter(docs[::-1][:20]), VOCAB)
    assert other_data.get_mergeable_ranks() != tok.get_mergeable_ranks()
    assert other_data.fingerprint != tok.fingerprint


def test_load_missing_and_corrupt(tok, base_dir):
    d = get_tokenizer_dir()
    assert d.startswith(str(base_dir))
    with pytest.raises(TokenizerError, match=r"no tokenizer found at .*tokenizer.*train one with: python -m scripts.tok_train"):
        get_tokenizer()
    tok.save(d)
    assert get_tokenizer().fingerprint == tok.fingerprint
    assert torch.equal(get_token_bytes("cpu"), tok.token_bytes())
    # a ranks file from a different save than tokenizer.json: caught by the fingerprint
    ranks_path = base_dir / "tokenizer" / "tokenizer.tiktoken"
    good = ranks_path.read_bytes()
    ranks_path.write_bytes(b"".join(good.splitlines(keepends=True)[:-3]))
    with pytest.raises(TokenizerError, match="corrupt.*fingerprint.*train one with: python -m scripts.tok_train"):
        get_tokenizer()
    ranks_path.write_bytes(b"not base64 at all!!\n")
    with pytest.raises(TokenizerError, match="corrupt.*line 1"):
        get_tokenizer()
    ranks_path.write_bytes(good)
    (base_dir / "tokenizer" / "tokenizer.json").write_text("{truncated")
    with pytest.raises(TokenizerError, match="corrupt.*tokenizer.json"):
        get_tokenizer()
    (base_dir / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="incomplete.*tokenizer.json.*train one with"):
        get_tokenizer()


# -----------------------------------------------------------------------------
# token_bytes (bits per byte depends on it)

def test_token_bytes_are_raw_byte_lengths(tok, wiki_text):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    for i in range(VOCAB):
        expected = 0 if i in special_ids else len(tok.decode_single_token_bytes(i))
        assert tb[i] == expected, i
    # lone continuation/lead bytes (>= 0x80) are 1 byte, although decoding them to str gives U+FFFD (3 bytes)
    high = [r for b, r in tok.get_mergeable_ranks().items() if len(b) == 1 and b[0] >= 0x80]
    assert len(high) == 128
    for i in high:
        assert tb[i] == 1
        assert len(tok.id_to_token(i).encode("utf-8")) == 3
    # the bpb invariant: summing token_bytes over a text's tokens gives its UTF-8 size
    text = wiki_text[:20_000] + " 日本語 🙂 é"
    assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# -----------------------------------------------------------------------------
# conversations

def _ids(tok, *specials):
    return [tok.encode_special(s) for s in specials]


def test_render_conversation_layout_and_mask(tok):
    conv = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": "It is 84."},
        ]},
        {"role": "user", "content": "Thanks <|assistant_end|>"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    snapshot = copy.deepcopy(conv)
    ids, mask = tok.render_conversation(conv)
    assert conv == snapshot  # input untouched
    E = tok.encode
    expected = [  # (tokens, mask value) in order
        (_ids(tok, "<|bos|>"), 0),
        (_ids(tok, "<|user_start|>") + E("You are terse.\n\nWhat is 12*7?") + _ids(tok, "<|user_end|>"), 0),
        (_ids(tok, "<|assistant_start|>"), 0),
        (E("Let me compute."), 1),
        (_ids(tok, "<|python_start|>") + E("12*7") + _ids(tok, "<|python_end|>"), 1),
        (_ids(tok, "<|output_start|>") + E("84") + _ids(tok, "<|output_end|>"), 0),
        (E("It is 84.") + _ids(tok, "<|assistant_end|>"), 1),
        (_ids(tok, "<|user_start|>") + E("Thanks <|assistant_end|>") + _ids(tok, "<|user_end|>"), 0),
        (_ids(tok, "<|assistant_start|>"), 0),
        (E("You're welcome.") + _ids(tok, "<|assistant_end|>"), 1),
    ]
    assert ids == [t for toks, _ in expected for t in toks]
    assert mask == [m for toks, m in expected for _ in toks]
    # the user's literal "<|assistant_end|>" is text: exactly two real assistant_end tokens, both trained on
    end = tok.encode_special("<|assistant_end|>")
    assert [mask[k] for k, t in enumerate(ids) if t == end] == [1, 1]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == \
        "Let me compute.<|python_start|>12*7<|python_end|>It is 84.<|assistant_end|>You're welcome.<|assistant_end|>"
    assert "\033[92m" in tok.visualize(ids, mask)


def test_render_conversation_errors(tok):
    def conv(*msgs):
        return {"messages": [{"role": r, "content": c} for r, c in msgs]}
    bad = [
        (conv(("user", "a"), ("user", "b")), r"message 1 has role 'user' but 'assistant' was expected"),
        (conv(("assistant", "a")), r"message 0 has role 'assistant' but 'user' was expected"),
        (conv(("system", "s"), ("assistant", "a")), r"message 1 has role 'assistant' but 'user' was expected"),
        (conv(("user", "a"), ("system", "s")), r"message 1 has role 'system'.*only come first"),
        (conv(("user", "a"), ("tool", "s")), r"message 1 has role 'tool'"),
        (conv(("user", [{"type": "text", "text": "a"}])), r"message 0 \(user\) content must be a str"),
        (conv(("user", "a"), ("assistant", [{"type": "image", "text": "x"}])), r"message 1 part 0 has type 'image'"),
        (conv(("user", "a"), ("assistant", [{"type": "text"}])), r"message 1 part 0 must be a dict with a str 'text'"),
        (conv(("system", "s")), r"no user message"),
        ({"messages": []}, "no messages"),
        ([{"role": "user", "content": "a"}], "must be a dict"),
    ]
    for c, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            tok.render_conversation(c)


def test_render_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "tell me a long story " * 20},
                         {"role": "assistant", "content": "once upon a time " * 20}]}
    ids, mask = tok.render_conversation(conv)
    ids10, mask10 = tok.render_conversation(conv, max_tokens=10)
    assert (ids10, mask10) == (ids[:10], mask[:10])
    assert tok.render_conversation(conv, max_tokens=10_000) == (ids, mask)


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "system", "content": "Be kind."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
    snapshot = copy.deepcopy(conv)
    prompt = tok.render_for_completion(conv)
    assert conv == snapshot
    full, _ = tok.render_conversation(conv)
    prefix, _ = tok.render_conversation({"messages": conv["messages"][:2]})
    assert prompt == prefix + _ids(tok, "<|assistant_start|>")
    assert full[:len(prompt)] == prompt  # the completion continues exactly where training data does
    with pytest.raises(ValueError, match="last message is the assistant's"):
        tok.render_for_completion({"messages": conv["messages"][:2]})


# -----------------------------------------------------------------------------
# stock encodings used by tok_eval

@pytest.mark.parametrize("name", sorted(STOCK_ENCODINGS))
def test_stock_encodings_match_tiktoken(name, shared_data, wiki_text, tmp_path, monkeypatch):
    path = shared_data / "tokenizers" / f"{name}.tiktoken"
    ours = Tokenizer.from_tiktoken_file(str(path), name)
    assert ours.get_bos_token_id() == ours.encode_special("<|endoftext|>")
    # tiktoken's own encoding, offline: prime its download cache (keyed by sha1 of the URL) with the local file
    url = STOCK_ENCODINGS[name]["url"]
    shutil.copy(path, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ref = tiktoken.get_encoding(name)
    text = wiki_text[:50_000] + "\n 12345 日本語 🙂 <|endoftext|>  \r\n\t x"
    assert ours.encode(text) == ref.encode_ordinary(text)
    assert ours.get_vocab_size() == ref.n_vocab
    assert set(ours.get_special_tokens()) == ref.special_tokens_set
    with pytest.raises(ValueError, match="chat special tokens"):
        ours.render_conversation({"messages": [{"role": "user", "content": "hi"}]})


def test_stock_encoding_hash_checked(shared_data, tmp_path):
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes((shared_data / "tokenizers" / "r50k_base.tiktoken").read_bytes()[:-100])
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer.from_tiktoken_file(str(bad), "r50k_base")
    with pytest.raises(ValueError, match="unknown stock encoding"):
        Tokenizer.from_tiktoken_file(str(bad), "p50k_base")


# -----------------------------------------------------------------------------
# the scripts, end to end on shards imported from real text

def test_tok_train_and_tok_eval_scripts(base_dir, shared_data, tmp_path, monkeypatch):
    from nanochat import dataset
    from nanochat.dataset import DataError
    from scripts import tok_train, tok_eval

    with pytest.raises(DataError, match="no pretraining shards"):
        tok_train.main(["--vocab-size", "600"])

    src = tmp_path / "src"
    src.mkdir()
    for rel in ("nltk_gutenberg/carroll-alice.txt", "nltk_gutenberg/blake-poems.txt", "llamafactory_demo/c4_demo.jsonl"):
        shutil.copy(shared_data / "pretrain_text" / rel, src)
    dataset.import_local(str(src), progress=False)

    rep = tok_train.main(["--vocab-size", "600", "--max-chars", "200000", "--doc-cap", "5000"])
    assert 200_000 <= rep["chars_used"] < 205_000  # stops right after crossing --max-chars
    tok = get_tokenizer()
    assert tok.get_vocab_size() == rep["vocab_size"] == 600
    assert tok.fingerprint == rep["fingerprint"]
    assert rep["token_bytes"]["min"] == 1 and rep["token_bytes"]["max"] > 3
    saved = json.loads((base_dir / "report" / "tok_train.json").read_text())
    assert saved["fingerprint"] == tok.fingerprint and saved["stage"] == "tok_train" and "timestamp" in saved

    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(shared_data))
    ev = tok_eval.main(["--max-chars", "20000"])
    labels = [r["text"] for r in ev["rows"]]
    assert labels == ["news", "korean", "code", "math", "science", "gutenberg", "wiki", "c4", "shard-train", "shard-val"]
    for r in ev["rows"]:
        assert r["ours_bytes_per_token"] == round(r["bytes"] / r["ours_tokens"], 4)
        assert r["diff_vs_gpt4_pct"] == round(100 * (r["gpt4_tokens"] - r["ours_tokens"]) / r["gpt4_tokens"], 2)
    korean = ev["rows"][1]
    assert korean["gpt4_bytes_per_token"] > korean["gpt2_bytes_per_token"]  # GPT-4's vocab knows Hangul
    saved = json.loads((base_dir / "report" / "tok_eval.json").read_text())
    assert saved["rows"] == ev["rows"] and saved["stage"] == "tok_eval" and "command" in saved


def test_tok_eval_downloads_stock_files_without_local_data(base_dir, shared_data, monkeypatch):
    from scripts import tok_eval
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA", raising=False)
    calls = []

    def fake_download(url, path, sha256=None, **kw):
        calls.append((url, sha256))
        shutil.copy(shared_data / "tokenizers" / url.rsplit("/", 1)[1], path)
        return path

    (base_dir / "tiktoken").mkdir()
    monkeypatch.setattr(tok_eval, "download_file", fake_download)
    path = tok_eval.stock_tiktoken_path("cl100k_base")
    assert path.startswith(str(base_dir))
    assert calls == [(STOCK_ENCODINGS["cl100k_base"]["url"], STOCK_ENCODINGS["cl100k_base"]["sha256"])]
    assert Tokenizer.from_tiktoken_file(path, "cl100k_base").get_vocab_size() == 100277
