"""The BPE tokenizer: training (rustbpe), encoding (tiktoken), the chat special tokens, the one place the
conversation format is defined (check_conversation, render_conversation -> ids + loss mask), saving and
loading without pickle, the fingerprint checkpoints record, and token_bytes (bytes per token) for bpb.

Conversation format: {"messages": [{"role": "system"|"user"|"assistant", "content": str | [part, ...]}]}:
an optional leading system message (merged into the first user message), then user/assistant strictly
alternating, starting with user. Assistant content may be a list of parts {"type": "text"|"python"|
"python_output", "text": str}: python parts are tool calls the engine runs, python_output parts what
the tool printed (never trained on).

On disk (<base dir>/tokenizer/): tokenizer.tiktoken (tiktoken's "base64(token) rank" lines), token_bytes.pt
(int32 [vocab], 0 for specials), tokenizer.json (pattern, specials, vocab size, fingerprint; written last,
so a crash mid-save is caught by the fingerprint check on load).
"""

import io
import os
import json
import base64
import hashlib

import torch
import tiktoken

from nanochat.common import UserError, get_base_dir, atomic_write_bytes, sha256_file

# <|bos|> starts every document and conversation; the assistant calls its python tool between
# python_start/end, and the tool's output is pasted back between output_start/end (never trained on).
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
PART_TYPES = ("text", "python", "python_output")

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (not 3): with a small
# vocab, 3-digit tokens waste slots (upstream nanochat measured d12/32K val bpb 0.965 vs 0.972).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # every byte, every special token, and at least one merge

TRAIN_HINT = "train one with: python -m scripts.tok_train"

# Stock OpenAI encodings that tok_eval compares against. Patterns, special-token ids, URLs and
# sha256 are the published values (tiktoken_ext/openai_public.py); tests check them against tiktoken.
_OPENAI_URL = "https://openaipublic.blob.core.windows.net/encodings/"
STOCK_ENCODINGS = {
    "r50k_base": {  # GPT-2
        "url": _OPENAI_URL + "r50k_base.tiktoken",
        "sha256": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        "pattern": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
        "special_tokens": {"<|endoftext|>": 50256}},
    "cl100k_base": {  # GPT-4
        "url": _OPENAI_URL + "cl100k_base.tiktoken",
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pattern": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                           "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}},
}


class TokenizerError(UserError, ValueError):
    """The tokenizer on disk is missing, incomplete or corrupt; the message says how to get a good one."""


# The .tiktoken text format, read here rather than by tiktoken.load.load_tiktoken_bpe, which caches by
# *path* in a temp dir: retraining into the same directory would then silently load the stale vocabulary.

def ranks_to_tiktoken_text(ranks):
    """dict {token bytes: rank} -> bytes of a .tiktoken file (one "base64 rank" line per token)."""
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    return b"\n".join(lines) + b"\n"


def read_tiktoken_file(path):
    """Parse a .tiktoken file into {token bytes: rank}; ValueError naming the line if malformed."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except Exception:
                    raise ValueError(f"{path}: line {lineno} is not 'base64token rank': {line.strip()[:80]!r}")
    if not ranks:
        raise ValueError(f"{path}: no tokens in file")
    return ranks


def check_conversation(conversation, complete=False):
    """The turns [(message index, role, content)] of a conversation in the format above (the system
    message merged in), or a ValueError saying what is wrong. complete=True (training and eval data):
    also at least one exchange, ending with the assistant, and no empty message."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("a conversation must be a dict {'messages': [{'role': ..., 'content': ...}, ...]}")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    turns, system = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.200}")
        role, content = m["role"], m["content"]
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role == "system" and i > 0:
            raise ValueError(f"message {i} has role 'system': a system message may only come first")
        if role not in ("system", expected):
            raise ValueError(f"message {i} has role {role!r} but {expected!r} was expected: roles must alternate "
                             f"user/assistant starting with user (after an optional leading system message)")
        if role == "assistant" and isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} part {j} must be a dict with a str 'text', got {part!r:.200}")
                if part.get("type") not in PART_TYPES:
                    raise ValueError(f"message {i} part {j} has type {part.get('type')!r}: expected one of {PART_TYPES}")
        elif not isinstance(content, str):
            kinds = "a string or a list of parts" if role == "assistant" else "a string"
            raise ValueError(f"message {i} ({role}) content must be {kinds}, got {type(content).__name__}")
        if complete and not (content.strip() if isinstance(content, str) else any(p["text"].strip() for p in content)):
            raise ValueError(f"message {i} ({role}) has empty content")
        if role == "system":
            system = content
        else:
            turns.append((i, role, content))
    if system is not None:
        if not turns:
            raise ValueError("conversation has a system message but no user message to merge it into")
        turns[0] = (turns[0][0], "user", system + "\n\n" + turns[0][2])
    if complete and len(turns) < 2:
        raise ValueError(f"need at least a user and an assistant message, got {len(turns)} "
                         f"message(s) besides the system prompt")
    if complete and turns[-1][1] != "assistant":
        raise ValueError("the last message must be the assistant's (there is nothing to learn from otherwise)")
    return turns


class Tokenizer:
    """A byte-level BPE tokenizer: mergeable ranks + split pattern + special tokens, encoded by tiktoken."""

    def __init__(self, pattern, mergeable_ranks, special_tokens, bos_token, name="nanochat"):
        if bos_token not in special_tokens:
            raise ValueError(f"bos token {bos_token!r} is not among the special tokens {sorted(special_tokens)}")
        self.name, self._pattern, self._bos_token = name, pattern, bos_token
        self._ranks, self._special = dict(mergeable_ranks), dict(special_tokens)
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=self._ranks, special_tokens=self._special)
        self._fingerprint = self._token_bytes = None  # computed on first use

    @classmethod
    def train(cls, text_iterator, vocab_size, buffer_size=8192):
        """Train on an iterator of str. vocab_size counts the 256 bytes, the merges and the specials."""
        import rustbpe
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={vocab_size!r} is too small: it must be an int >= {MIN_VOCAB_SIZE} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens + at least 1 merge)")
        n_mergeable = vocab_size - len(SPECIAL_TOKENS)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_mergeable, buffer_size=buffer_size, pattern=SPLIT_PATTERN)
        pairs = trainer.get_mergeable_ranks()
        if len(pairs) != n_mergeable:
            # rustbpe stops early when no pair occurs any more: the text was too small for this vocab.
            raise ValueError(f"the training text only supported {len(pairs) - 256} merges but vocab_size={vocab_size} "
                             f"needs {n_mergeable - 256}: train on more text or ask for a smaller vocab size")
        ranks = {bytes(tok): rank for tok, rank in pairs}
        special = {tok: n_mergeable + i for i, tok in enumerate(SPECIAL_TOKENS)}
        return cls(trainer.get_pattern(), ranks, special, bos_token="<|bos|>", name="nanochat")

    @classmethod
    def from_tiktoken_file(cls, path, name):
        """Wrap a stock OpenAI encoding (r50k_base = GPT-2, cl100k_base = GPT-4) read from its .tiktoken
        file, verified against the published sha256. <|endoftext|> serves as BOS."""
        if name not in STOCK_ENCODINGS:
            raise ValueError(f"unknown stock encoding {name!r}: expected one of {sorted(STOCK_ENCODINGS)}")
        spec = STOCK_ENCODINGS[name]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist (expected the {name}.tiktoken file from {spec['url']})")
        digest = sha256_file(path)
        if digest != spec["sha256"]:
            raise ValueError(f"{path} has sha256 {digest}, but the published {name} file has {spec['sha256']}: "
                             f"delete it and fetch it again from {spec['url']}")
        return cls(spec["pattern"], read_tiktoken_file(path), spec["special_tokens"], bos_token="<|endoftext|>", name=name)

    def save(self, directory):
        """Write tokenizer.tiktoken, token_bytes.pt, then tokenizer.json (each atomically)."""
        os.makedirs(directory, exist_ok=True)
        atomic_write_bytes(os.path.join(directory, "tokenizer.tiktoken"), ranks_to_tiktoken_text(self._ranks))
        buf = io.BytesIO()
        torch.save(self.token_bytes(), buf)
        atomic_write_bytes(os.path.join(directory, "token_bytes.pt"), buf.getvalue())
        meta = {"format": "nanochat-tokenizer-v1", "name": self.name, "pattern": self._pattern,
                "special_tokens": self._special, "bos_token": self._bos_token, "vocab_size": self.get_vocab_size(),
                "num_mergeable": len(self._ranks), "fingerprint": self.fingerprint}
        atomic_write_bytes(os.path.join(directory, "tokenizer.json"), (json.dumps(meta, indent=2) + "\n").encode())

    @classmethod
    def load(cls, directory):
        """Load what save() wrote. A missing or damaged tokenizer is a TokenizerError that names the path."""
        directory = str(directory)
        if not os.path.isdir(directory):
            raise TokenizerError(f"no tokenizer found at {directory}: {TRAIN_HINT}")
        paths = {f: os.path.join(directory, f) for f in ("tokenizer.json", "tokenizer.tiktoken", "token_bytes.pt")}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise TokenizerError(f"tokenizer at {directory} is incomplete (missing {', '.join(missing)}): {TRAIN_HINT}")

        def corrupt(reason):
            return TokenizerError(f"tokenizer at {directory} is corrupt ({reason}): delete it and {TRAIN_HINT}")

        try:
            with open(paths["tokenizer.json"], "rb") as f:
                meta = json.loads(f.read().decode("utf-8"))
            special = {str(k): int(v) for k, v in meta["special_tokens"].items()}
            pattern, bos = meta["pattern"], meta["bos_token"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise corrupt(f"{paths['tokenizer.json']}: {e}")
        try:  # a malformed ranks file, or ranks and pattern tiktoken cannot build an encoding from
            tok = cls(pattern, read_tiktoken_file(paths["tokenizer.tiktoken"]), special, bos_token=bos,
                      name=meta.get("name", "nanochat"))
        except Exception as e:
            raise corrupt(str(e))
        # Any other damage to the ranks file (lines lost or altered) changes the fingerprint.
        if tok.fingerprint != meta.get("fingerprint") or tok.get_vocab_size() != meta.get("vocab_size"):
            raise corrupt(f"fingerprint/vocab size in {paths['tokenizer.json']} do not match {paths['tokenizer.tiktoken']}")
        try:
            saved_tb = torch.load(paths["token_bytes.pt"], map_location="cpu", weights_only=True)
        except Exception as e:
            raise corrupt(f"{paths['token_bytes.pt']}: {e}")
        if not isinstance(saved_tb, torch.Tensor) or not torch.equal(saved_tb, tok.token_bytes()):
            raise corrupt(f"{paths['token_bytes.pt']} does not match the vocabulary")
        return tok

    @property
    def fingerprint(self):
        """sha256 hex over pattern, mergeable ranks and special tokens: same fingerprint = same token ids."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"nanochat-tokenizer-fingerprint-v1\n")
            h.update(self._pattern.encode("utf-8") + b"\n")
            h.update(ranks_to_tiktoken_text(self._ranks))
            h.update(json.dumps(sorted(self._special.items(), key=lambda kv: kv[1])).encode("utf-8"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def get_pattern(self):
        return self._pattern

    def get_mergeable_ranks(self):
        return dict(self._ranks)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        """Special-token strings, ordered by id."""
        return [tok for tok, _ in sorted(self._special.items(), key=lambda kv: kv[1])]

    def get_bos_token_id(self):
        return self._special[self._bos_token]

    def encode_special(self, s):
        try:
            return self._special[s]
        except (KeyError, TypeError):
            raise ValueError(f"{s!r} is not a special token of this tokenizer; known: {self.get_special_tokens()}")

    def _as_id(self, x):
        if isinstance(x, str):
            return self.encode_special(x)
        if isinstance(x, int) and 0 <= x < self.get_vocab_size():
            return x
        raise ValueError(f"prepend/append must be a token id in [0, {self.get_vocab_size()}) or a special-token string, got {x!r}")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int], or list[str] -> list[list[int]] (encoded in parallel threads).
        Special-token strings inside the text are encoded as plain text, never as special ids, so
        user-supplied text cannot forge conversation structure. prepend/append add one token
        (an id or a special-token string) to each sequence."""
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if not isinstance(text, (list, tuple)):  # tiktoken itself raises TypeError for a non-str item
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        return [pre + ids + post for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    __call__ = encode

    def decode(self, ids):
        """ids -> str (invalid UTF-8 from partial sequences becomes U+FFFD)."""
        return self.enc.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids.tolist() if isinstance(ids, torch.Tensor) else ids)

    def decode_single_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def token_bytes(self):
        """int32 tensor [vocab]: how many raw bytes each token stands for (0 for special tokens and
        unused ids). Taken from the raw token bytes, never via str: decoding a lone byte >= 0x80 to
        str gives U+FFFD, 3 bytes, which skewed bits-per-byte by ~0.05% in upstream nanochat."""
        if self._token_bytes is None:
            lengths = [0] * self.get_vocab_size()  # special tokens and holes in the id space (cl100k_base has some)
            for tok, rank in self._ranks.items():
                lengths[rank] = len(tok)
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes.clone()

    def render_conversation(self, conversation, max_tokens=None):
        """Tokenize a conversation (format: module docstring) -> (ids, mask). mask[i] = 1 where the
        model is trained to predict ids[i]: assistant text, its python tool calls (with their
        delimiters) and <|assistant_end|>. Everything the model does not author (bos, user turns,
        <|assistant_start|>, tool output) is 0."""
        turns = check_conversation(conversation)
        sp = self._special
        missing = [t for t in SPECIAL_TOKENS if t not in sp]
        if missing:
            raise ValueError(f"tokenizer {self.name!r} lacks the chat special tokens {missing}: use a nanochat-trained tokenizer")
        ids, mask = [self.get_bos_token_id()], [0]

        def add(m, text=None, start=None, end=None):  # [<|start|>] text [<|end|>], all with mask m
            tokens = ([sp[start]] if start else []) + (self.encode(text) if text else []) + ([sp[end]] if end else [])
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for _, role, content in turns:
            if role == "user":
                add(0, content, "<|user_start|>", "<|user_end|>")
                continue
            add(0, start="<|assistant_start|>")
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    add(1, part["text"])
                elif part["type"] == "python":
                    add(1, part["text"], "<|python_start|>", "<|python_end|>")
                else:  # python_output: produced by the tool at inference time, so never a prediction target
                    add(0, part["text"], "<|output_start|>", "<|output_end|>")
            add(1, end="<|assistant_end|>")
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the assistant's reply: the conversation minus its final assistant
        message, followed by <|assistant_start|>. The input is not modified."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is the assistant's "
                             "(it is dropped and the model is prompted to write it)")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]})
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize(self, ids, mask=None):
        """Debug view: each token as [text], green if it carries loss (mask 1), red if not."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        return "".join(f"{green if mask is not None and mask[k] else red}[{self.id_to_token(t)}]{reset}"
                       for k, t in enumerate(ids))


def get_tokenizer_dir():
    return os.path.join(get_base_dir(create=False), "tokenizer")  # Tokenizer.save makes it


def get_tokenizer():
    """The project's trained tokenizer (TokenizerError with a how-to if it is not there)."""
    return Tokenizer.load(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    """Byte length of every token id (int32 [vocab]) for bits-per-byte, on `device`."""
    return get_tokenizer().token_bytes().to(device)
