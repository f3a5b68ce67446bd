"""What every chat task shares: Task (a sliceable list of conversations that can grade a completion),
TaskMixture/TaskSequence, the multiple-choice prompt, the check of a task's conversations (the format of
nanochat/tokenizer.py, complete; multiple-choice ones also carry "letters", the allowed answers), and where
task data comes from: with NANOCHAT_LOCAL_DATA set (a folder laid out like ../shared/data) the local copy,
never the network; otherwise the real source, usually the hub's parquet export, into <base dir>/task_data/.
"""

import os
import re
import gzip
import json
import random
import bisect
import itertools

from nanochat.common import UserError, get_base_dir, get_local_data_dir, download_file, atomic_write_json, DownloadError
from nanochat.tokenizer import check_conversation


class Task:
    """A dataset as a list of conversations, viewed through range(start, stop, step). Subclasses keep
    their data in self.rows and make row i a conversation in get_example(i) (by default it is one);
    generated data sets rows = range(size) and builds example i there. eval_type: "categorical",
    "generative", or None for training data; evals implement evaluate(conversation, completion) -> bool."""
    eval_type = None
    rows = ()

    def __init__(self, start=0, stop=None, step=1):
        if step is None or step < 1 or start < 0 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop and step >= 1, got start={start!r} stop={stop!r} step={step!r}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return self.rows[index]

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
        return map(self.get_example, self._indices())

    def evaluate(self, conversation, completion):
        raise NotImplementedError(f"{type(self).__name__} is training data: it has no evaluate()")

    def reward(self, conversation, completion):
        """RL reward: 1.0 for a correct completion, else 0.0."""
        return float(self.evaluate(conversation, completion))


def check_choice(what, value, allowed):
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {allowed}")


class TaskMixture(Task):
    """Every example of every task, in one deterministic shuffled order (random.Random(42)).
    Passing the same task twice oversamples it."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.rows = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.rows)

    def get_example(self, index):
        t, i = self.rows[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after another, in the order given (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.offsets = [0, *itertools.accumulate(len(task) for task in self.tasks)]

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        t = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[t][index - self.offsets[t]]


LETTERS = "ABCDEFGHIJ"
_FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def render_mc(question, letters, choices):
    """The multiple-choice prompt. Each letter comes after its choice with no space after "=", so the
    letter token the model sees in the prompt is the same token it must answer with."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"] + [f"- {c}={letter}" for letter, c in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question, choices, answer, **extra):
    """A multiple-choice conversation: the prompt, the letter of choice `answer` as the reply, the letters."""
    letters = list(LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": letters[answer]}], "letters": letters, **extra}


class MultipleChoiceTask(Task):
    """Graded by the answer letter: the completion must equal the reference reply."""
    eval_type = "categorical"

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]


def extract_answer(text):
    """The number after the first "#### " (GSM8K's final-answer marker), commas removed; None if absent."""
    m = _FINAL_ANSWER.search(text)
    return None if m is None else m.group(1).replace(",", "").rstrip(".")  # a sentence-ending "." is not part of it


def last_text(content):
    """The text of a message's last text part (or the whole string when content is a string)."""
    if isinstance(content, str):
        return content
    texts = [p["text"] for p in content if p["type"] == "text"]
    return texts[-1] if texts else ""


def validate_conversation(conversation):
    """Raise ValueError saying what is wrong if `conversation` is not a complete conversation
    (check_conversation in nanochat/tokenizer.py) or its letters lack the answer; else return it."""
    check_conversation(conversation, complete=True)
    if "letters" in conversation:
        letters, answer = conversation["letters"], conversation["messages"][-1]["content"]
        if not (isinstance(letters, list) and letters and all(isinstance(x, str) for x in letters)):
            raise ValueError("'letters' must be a non-empty list of strings")
        if answer not in letters:
            raise ValueError(f"the answer {answer!r} is not one of the letters {letters}")
    return conversation


class DataUnavailableError(UserError, RuntimeError):
    """Task data is neither in the local data folder nor downloadable."""


def local_data_path(relpath, real_source):
    """Path of `relpath` in NANOCHAT_LOCAL_DATA, or None when it is unset (download `real_source` instead).
    A set variable with the file missing is an error, never a silent fall-back to the network."""
    root = get_local_data_dir()
    if root is None:
        return None
    path = os.path.join(root, relpath)
    if not os.path.exists(path):
        raise DataUnavailableError(f"{path} not found: NANOCHAT_LOCAL_DATA={root} has no local copy of {real_source}. "
                                   f"Add the file there, or unset NANOCHAT_LOCAL_DATA to download the real source.")
    return path


def read_jsonl(path):
    """Rows of a .jsonl or .jsonl.gz file (blank lines skipped)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def shuffled(rows, seed=42):
    """rows in the order datasets.Dataset.shuffle(seed) would give (numpy default_rng permutation), so
    an eval cut short (--max-problems) still samples every subject rather than the first few."""
    import numpy as np
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def load_hub_parquet(repo, config, split):
    """One split of a HuggingFace hub dataset (NANOCHAT_HF_ENDPOINT or HF_ENDPOINT: a mirror) as a pyarrow
    Table, from the hub's parquet export, downloaded once to <base>/task_data/<owner--name>/<config>/<split>/
    under a file lock (concurrent ranks don't race); manifest.json, written last, marks it complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from filelock import FileLock
    from nanochat.dataset import hub_endpoint

    folder = os.path.join(get_base_dir(), "task_data", repo.replace("/", "--"), config, split)
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, "manifest.json")
    with FileLock(folder + ".lock"):
        if not os.path.exists(manifest_path):
            listing_url = f"{hub_endpoint()}/api/datasets/{repo}/parquet/{config}/{split}"
            try:
                listing_path = download_file(listing_url, os.path.join(folder, "listing.json"), progress=False)
                try:
                    with open(listing_path) as f:
                        urls = json.load(f)
                except ValueError:
                    urls = None
                if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                    os.remove(listing_path)  # so the next attempt asks again
                    raise DataUnavailableError(f"{listing_url} did not return a list of parquet URLs "
                                               f"(is {repo!r} config {config!r} split {split!r} right?)")
                files = [f"{n:05d}.parquet" for n in range(len(urls))]
                for url, name in zip(urls, files):
                    download_file(url, os.path.join(folder, name))
            except DownloadError as e:
                raise DataUnavailableError(f"could not download {repo} ({config}/{split}) from {listing_url}: {e}. "
                                           f"The hub may be unreachable: set NANOCHAT_HF_ENDPOINT to a mirror, or "
                                           f"NANOCHAT_LOCAL_DATA to a folder of local copies.") from e
            atomic_write_json(manifest_path, {"repo": repo, "config": config, "split": split,
                                              "urls": urls, "files": files})
    with open(manifest_path) as f:
        manifest = json.load(f)
    return pa.concat_tables([pq.read_table(os.path.join(folder, name)) for name in manifest["files"]])


def load_rows(local_relpath, repo, config, split):
    """Rows of a split as a list of dicts: the local jsonl copy when NANOCHAT_LOCAL_DATA is set, else the hub's."""
    path = local_data_path(local_relpath, f"{repo} ({config}/{split}) from the HuggingFace hub")
    return read_jsonl(path) if path is not None else load_hub_parquet(repo, config, split).to_pylist()
