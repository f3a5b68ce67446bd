"""SmolTalk: general multi-turn chat for SFT, from HuggingFace `HuggingFaceTB/smol-smoltalk` (train ~460K,
test ~24K conversations, already in our message format).

Offline stand-in (NANOCHAT_LOCAL_DATA set): the assistant conversations in chat_sft/ (LOCAL_SOURCES), made
valid by normalise() or dropped; ~5% by a hash of the first user message (so repeated prompts land on one
side) are the test split. Left out: fastchat's dummies (all "I am Vicuna, trained by LMSYS", which would fight
the Identity task), gpteacher/toolformer (a tool syntax our engine does not run), and folders that are not
assistant conversations (chit-chat, preference pairs, function-call transcripts).

`python -m tasks.smoltalk OUT.jsonl` writes the train split as plain-text documents ("User: ..." /
"Assistant: ..." paragraphs) for `python -m nanochat.dataset import`: offline 103M characters, six times
pretrain_text/ (16.5M, which a d4 overfits after about 3 epochs). The test split (the chat evals' prompts)
is written only when asked.
"""

import os
import json
import hashlib
import argparse
import functools

from nanochat.common import UserError, run_cli
from tasks.common import (Task, local_data_path, load_hub_parquet, read_jsonl, shuffled, validate_conversation,
                          check_choice)

REPO = "HuggingFaceTB/smol-smoltalk"
SPLITS = ("train", "test")

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def normalise(messages):
    """[(role, content), ...] -> a valid messages list, or None when it can't be made one honestly."""
    messages = [{"role": r, "content": c} for r, c in messages if isinstance(c, str) and c.strip()]
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system):]
    while body and body[0]["role"] == "assistant":  # some records start mid-conversation
        body = body[1:]
    while body and body[-1]["role"] == "user":  # a question left without an answer
        body = body[:-1]
    try:
        return validate_conversation({"messages": system + body})
    except ValueError:
        return None


def _sharegpt(path):
    for row in read_jsonl(path):
        turns = row.get("conversations") or []
        if any(t.get("from") not in SHAREGPT_ROLES for t in turns):
            continue
        yield [(SHAREGPT_ROLES[t["from"]], t.get("value")) for t in turns]


def _instruct(path, output_key="output"):
    """Alpaca-style records: an optional history [[question, answer], ...], then instruction (+ input) -> output."""
    with open(path, encoding="utf-8") as f:
        for row in json.load(f):
            turns = [t for q, a in row.get("history") or [] for t in (("user", q), ("assistant", a))]
            inp = row.get("input")
            prompt = f"{row['instruction']}\n\n{inp}" if inp and inp.strip() else row["instruction"]
            yield turns + [("user", prompt), ("assistant", row[output_key])]


LOCAL_SOURCES = [
    ("chat_sft/sharegpt/sharegpt_v3_complete_records.jsonl.gz", _sharegpt),
    ("chat_sft/lima/lima.json", _instruct),
    ("chat_sft/gpteacher/roleplay-simple-deduped-roleplay-instruct.json", lambda p: _instruct(p, "response")),
    ("chat_sft/gpteacher/codegen-instruct.json", lambda p: _instruct(p, "response")),
    ("chat_sft/llamafactory_demo/alpaca_en_demo.json", _instruct)]


@functools.lru_cache(maxsize=1)
def load_local_standin():
    """{"train": [...], "test": [...]} conversations from the local chat_sft files (parsed once per process)."""
    splits = {"train": [], "test": []}
    for relpath, parse in LOCAL_SOURCES:
        path = local_data_path(relpath, f"{REPO} (offline stand-in file {os.path.basename(relpath)})")
        for turns in parse(path):
            conversation = normalise(turns)
            if conversation is not None:
                first_user = next(m["content"] for m in conversation["messages"] if m["role"] == "user")
                test = hashlib.sha1(first_user.encode("utf-8")).digest()[0] < 13  # 13/256 = 5.1%
                splits["test" if test else "train"].append(conversation)
    return {k: shuffled(v) for k, v in splits.items()}


class SmolTalk(Task):
    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        check_choice("SmolTalk split", split, SPLITS)
        self.split, self.messages = split, None
        if local_data_path("chat_sft", REPO) is not None:
            self.rows = load_local_standin()[split]
        else:
            # ~460K rows: keep the arrow column and convert one conversation at a time.
            table = load_hub_parquet(REPO, "default", split)
            self.messages, self.rows = table.column("messages"), shuffled(list(range(len(table))))

    def get_example(self, index):
        if self.messages is None:
            return self.rows[index]
        messages = self.messages[self.rows[index]].as_py()
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def write_text(path, split="train"):
    """Write SmolTalk `split` to `path` as .jsonl rows {"text": ...}, each conversation as plain prose, one
    paragraph per message under its speaker's name (no special tokens: base pretraining sees documents, not
    the chat format); returns the row count. Written to a .partial file first, so an interrupted run leaves
    no half file to import."""
    task = SmolTalk(split)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        for conversation in task:
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in conversation["messages"])
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return len(task)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tasks.smoltalk", description="Write SmolTalk conversations "
                                     "as plain-text documents (.jsonl, a 'text' field) for nanochat.dataset import.")
    parser.add_argument("out", help="the .jsonl file to write (its folder is created)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="which split (default: train; test holds the chat evals' held-out prompts)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".jsonl"):
        raise UserError(f"{args.out!r} must end in .jsonl (nanochat.dataset import reads files by suffix)")
    n = write_text(args.out, args.split)
    print(f"Wrote {n:,} SmolTalk {args.split} conversations as text to {args.out}")


if __name__ == "__main__":
    run_cli(main)
