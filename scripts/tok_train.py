"""Train the BPE tokenizer on the train split of the pretraining shards and save it to <base dir>/tokenizer
(see nanochat/tokenizer.py for the files). Writes report/tok_train.json.

    python -m scripts.tok_train                       # 2B chars, 32,768 tokens
    python -m scripts.tok_train --max-chars 100000000 --vocab-size 8192
"""

import time
import argparse

from nanochat.common import UserError, print0, write_report_json, run_cli
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS, MIN_VOCAB_SIZE, get_tokenizer_dir

# Round-trip check after saving: mixed scripts, emoji, code, digits, whitespace runs and a
# special-token string that must stay plain text.
SANITY_TEXT = ("Tokenizers meet Unicode: naïve café, Größe, ¿qué tal?, Привет мир, 日本語のテキスト, 한국어 문장, "
               "مرحبا, हिन्दी, emoji 🙂👩‍💻🇫🇷, math ∑x² ≤ ∞.\n"
               "def area(r):\n\treturn 3.14159 * r ** 2  # 1234567890\n\n\n   trailing spaces   \n"
               "<|bos|> and <|assistant_end|> are just text here.\r\n")


def text_iterator(max_chars, doc_cap, stats):
    """Documents from the train shards, each cropped to doc_cap chars, until max_chars are used.
    Crops keep one giant document from dominating the pair counts."""
    for batch in parquets_iter_batched("train"):
        for doc in batch:
            doc = doc[:doc_cap]
            stats["chars"] += len(doc)
            stats["docs"] += 1
            yield doc
            if stats["chars"] >= max_chars:
                return


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the pretraining shards (train split).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters of text")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to at most this many characters")
    parser.add_argument("--vocab-size", type=int, default=32768, help=f"vocabulary incl. 256 bytes and "
                        f"{len(SPECIAL_TOKENS)} special tokens (minimum {MIN_VOCAB_SIZE})")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab-size {args.vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
                     f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)")
    if args.max_chars <= 0 or args.doc_cap <= 0:
        parser.error(f"--max-chars ({args.max_chars}) and --doc-cap ({args.doc_cap}) must be positive")
    print0(f"training a {args.vocab_size:,}-token tokenizer on up to {args.max_chars:,} chars "
           f"(docs cropped to {args.doc_cap:,} chars)")

    stats = {"chars": 0, "docs": 0}
    t0 = time.time()
    try:  # a DataError (no shards, a damaged shard, ...) passes through: its message says what to do
        tokenizer = Tokenizer.train(text_iterator(args.max_chars, args.doc_cap, stats), args.vocab_size)
    except UserError:
        raise
    except ValueError as e:  # too little text for the vocab size
        raise UserError(f"tokenizer training failed: {e}" if stats["chars"] else "the train split yielded no "
                        "text: import or download shards first (python -m nanochat.dataset --help)")
    train_time = time.time() - t0
    print0(f"trained on {stats['chars']:,} chars from {stats['docs']:,} docs in {train_time:.2f}s")

    tok_dir = get_tokenizer_dir()
    tokenizer.save(tok_dir)
    print0(f"saved to {tok_dir} (fingerprint {tokenizer.fingerprint[:16]}...)")

    # Reload from disk so the check covers what later stages will actually use.
    loaded = Tokenizer.load(tok_dir)
    ids = loaded.encode(SANITY_TEXT)
    if loaded.decode(ids) != SANITY_TEXT or ids != tokenizer.encode(SANITY_TEXT):
        raise SystemExit(f"round-trip sanity check FAILED for the tokenizer saved in {tok_dir}")
    print0(f"round-trip sanity check passed ({len(SANITY_TEXT.encode('utf-8'))} bytes -> {len(ids)} tokens)")

    tb = loaded.token_bytes()
    regular = tb[tb > 0].float()
    tb_stats = {"min": int(regular.min()), "max": int(regular.max()), "mean": round(float(regular.mean()), 4)}
    print0(f"token_bytes: {int((tb == 0).sum())} special tokens (0 bytes); regular tokens min {tb_stats['min']}, "
           f"max {tb_stats['max']}, mean {tb_stats['mean']:.3f} bytes")

    report = {"args": vars(args), "train_time_s": round(train_time, 3), "vocab_size": loaded.get_vocab_size(),
              "num_special_tokens": len(SPECIAL_TOKENS), "token_bytes": tb_stats, "chars_used": stats["chars"],
              "docs_used": stats["docs"], "fingerprint": loaded.fingerprint, "tokenizer_dir": tok_dir}
    print0(f"wrote {write_report_json('tok_train', report)}")
    return report


if __name__ == "__main__":
    run_cli(main)
