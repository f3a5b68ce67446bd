"""
What every chat task shares: the Task base class (a sliceable list of conversations that can grade a
completion), TaskMixture/TaskSequence to combine tasks, the multiple-choice prompt, a checker for the
conversation format, and where task data comes from.

Conversation format (render_conversation in nanochat/tokenizer.py renders it):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str | [part, ...]}, ...]}
An optional leading system message, then user/assistant strictly alternating, starting with user and
ending with the assistant. An assistant's content may be a list of parts
{"type": "text"|"python"|"python_output", "text": str}: python parts are tool calls the engine runs,
python_output parts are what the tool printed (the model is not trained on those).
Categorical (multiple-choice) conversations also carry "letters", the allowed answer letters; the
last assistant message is the correct one.

Data: with NANOCHAT_LOCAL_DATA set (a folder laid out like ../shared/data) every task reads its local
copy and never touches the network; otherwise it downloads the real source, usually the HuggingFace
hub's parquet export, into <base dir>/task_data/.
"""

import os
import re
import gzip
import json
import random
import bisect

from nanochat.common import get_base_dir, get_local_data_dir, download_file, atomic_write_json, DownloadError

# -----------------------------------------------------------------------------
# Task and its combinations

class Task:
    """A dataset as a list of conversations, viewed through range(start, stop, step).

    Subclasses implement num_examples() and get_example(i) over the full underlying dataset, set
    eval_type ("categorical", "generative", or None for training-only data) and, for evals,
    evaluate(conversation, completion) -> bool.
    """
    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        if step is None or step < 1:
            raise ValueError(f"step must be a positive integer, got {step!r}")
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop, got start={start!r} stop={stop!r}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def _indices(self):
        # range slicing clips stop to the data size and does the arithmetic for us.
        return range(self.num_examples())[self.start:self.stop:self.step]

    def __len__(self):
        return len(self._indices())

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError(f"{type(self).__name__} indices must be integers, got {type(i).__name__} "
                            f"(slice with {type(self).__name__}(..., start=, stop=, step=) instead)")
        return self.get_example(self._indices()[i])  # range raises IndexError when out of bounds

    def __iter__(self):
        for i in self._indices():
            yield self.get_example(i)

    def evaluate(self, conversation, completion):
        raise NotImplementedError(f"{type(self).__name__} is training data: it has no evaluate()")

    def reward(self, conversation, completion):
        """RL reward: 1.0 for a correct completion, else 0.0."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """Every example of every task, in one deterministic shuffled order (random.Random(42)).
    Passing the same task twice oversamples it."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after another, in the order given (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.offsets = [0]
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        t = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[t][index - self.offsets[t]]


# -----------------------------------------------------------------------------
# Multiple choice and answer extraction

def render_mc(question, letters, choices):
    """The multiple-choice prompt. Each letter comes after its choice with no space after "=", so the
    letter token the model sees in the prompt is the same token it must answer with."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


LETTERS = "ABCDEFGHIJ"


def letter_is_correct(conversation, completion):
    """Grade a categorical answer: the completion (a letter) equals the last assistant message."""
    return completion.strip() == conversation["messages"][-1]["content"]

_FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def extract_answer(text):
    """The number after the first "#### " (GSM8K's final-answer marker), commas removed; None if absent."""
    m = _FINAL_ANSWER.search(text)
    if m is None:
        return None
    return m.group(1).replace(",", "").rstrip(".")  # a sentence-ending "." is not part of the number


def last_text(content):
    """The text of a message's last text part (or the whole string when content is a string)."""
    if isinstance(content, str):
        return content
    texts = [p["text"] for p in content if p["type"] == "text"]
    return texts[-1] if texts else ""


# -----------------------------------------------------------------------------
# Checking the format

PART_TYPES = ("text", "python", "python_output")


def validate_conversation(conversation):
    """Raise ValueError saying what is wrong if `conversation` breaks the format above; else return it."""
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError("a conversation must be an object with a 'messages' list")
    messages = conversation["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has role {m['role']!r}: use system, user or assistant")
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if len(body) < 2:
        raise ValueError(f"need at least a user and an assistant message, got {len(body)} "
                         f"message(s) besides the system prompt")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "a system message is only allowed first" if m["role"] == "system" else \
                    "roles must alternate user, assistant, user, ... starting with user"
            raise ValueError(f"message {i + offset} is {m['role']!r} where {expected!r} was expected ({where})")
    if body[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (there is nothing to learn from otherwise)")
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, str):
            if not content.strip():
                raise ValueError(f"message {i} ({m['role']}) has empty content")
        elif isinstance(content, list):
            if m["role"] != "assistant":
                raise ValueError(f"message {i}: only assistant content may be a list of parts; "
                                 f"{m['role']} content must be a string")
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} part {j} must be {{'type': one of {PART_TYPES}, 'text': str}}, got {part!r:.100}")
            if not any(p["text"].strip() for p in content):
                raise ValueError(f"message {i} ({m['role']}) has empty content")
        else:
            raise ValueError(f"message {i} content must be a string or a list of parts, got {type(content).__name__}")
    if "letters" in conversation:
        letters = conversation["letters"]
        if not (isinstance(letters, list) and letters and all(isinstance(x, str) for x in letters)):
            raise ValueError("'letters' must be a non-empty list of strings")
        if messages[-1]["content"] not in letters:
            raise ValueError(f"the answer {messages[-1]['content']!r} is not one of the letters {letters}")
    return conversation


# -----------------------------------------------------------------------------
# Where data comes from

class DataUnavailableError(RuntimeError):
    """Task data is neither in the local data folder nor downloadable."""


def local_data_path(relpath, real_source):
    """Path of `relpath` inside NANOCHAT_LOCAL_DATA, or None when that variable is unset (meaning:
    download `real_source` instead). A set variable with the file missing is an error, never a
    silent fall-back to the network."""
    root = get_local_data_dir()
    if root is None:
        return None
    path = os.path.join(root, relpath)
    if not os.path.exists(path):
        raise DataUnavailableError(
            f"{path} not found: NANOCHAT_LOCAL_DATA={root} has no local copy of {real_source}. "
            f"Add the file there, or unset NANOCHAT_LOCAL_DATA to download the real source.")
    return path


def read_jsonl(path):
    """Rows of a .jsonl or .jsonl.gz file (blank lines skipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def shuffled(rows, seed=42):
    """rows in the order datasets.Dataset.shuffle(seed) would give (numpy default_rng permutation), so
    an eval cut short (--max-problems) still samples every subject rather than the first few."""
    import numpy as np
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def hf_endpoint():
    return os.environ.get("NANOCHAT_HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def load_hub_parquet(repo, config, split):
    """One split of a HuggingFace hub dataset as a pyarrow Table, from the hub's automatic parquet
    export. The files are downloaded once to <base>/task_data/<owner--name>/<config>/<split>/ (under a
    file lock, so concurrent ranks don't race); manifest.json is written last and marks them complete.
    NANOCHAT_HF_ENDPOINT points at a mirror instead of https://huggingface.co."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from filelock import FileLock

    folder = os.path.join(get_base_dir(), "task_data", repo.replace("/", "--"), config, split)
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, "manifest.json")
    with FileLock(folder + ".lock"):
        if not os.path.exists(manifest_path):
            listing_url = f"{hf_endpoint()}/api/datasets/{repo}/parquet/{config}/{split}"
            hint = ("The hub may be unreachable: set NANOCHAT_HF_ENDPOINT to a mirror, or "
                    "NANOCHAT_LOCAL_DATA to a folder of local copies.")
            try:
                listing_path = download_file(listing_url, os.path.join(folder, "listing.json"), progress=False)
                with open(listing_path) as f:
                    try:
                        urls = json.load(f)
                    except ValueError:
                        urls = None
                if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                    os.remove(listing_path)  # so the next attempt asks again
                    raise DataUnavailableError(f"{listing_url} did not return a list of parquet URLs "
                                               f"(is {repo!r} config {config!r} split {split!r} right?)")
                files = []
                for n, url in enumerate(urls):
                    name = f"{n:05d}.parquet"
                    download_file(url, os.path.join(folder, name))
                    files.append(name)
            except DownloadError as e:
                raise DataUnavailableError(f"could not download {repo} ({config}/{split}) from "
                                           f"{listing_url}: {e}. {hint}") from e
            atomic_write_json(manifest_path, {"repo": repo, "config": config, "split": split,
                                              "urls": urls, "files": files})
    with open(manifest_path) as f:
        manifest = json.load(f)
    return pa.concat_tables([pq.read_table(os.path.join(folder, name)) for name in manifest["files"]])


def load_rows(local_relpath, repo, config, split):
    """Rows of a split as a list of dicts: the local jsonl copy when NANOCHAT_LOCAL_DATA is set,
    else the hub's parquet export."""
    path = local_data_path(local_relpath, f"{repo} ({config}/{split}) from the HuggingFace hub")
    if path is not None:
        return read_jsonl(path)
    return load_hub_parquet(repo, config, split).to_pylist()
