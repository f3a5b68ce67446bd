"""
The DCLM CORE metric: 22 in-context-learning tasks scored from a base model's next-token losses, each reported as
accuracy and as centered accuracy (acc - b) / (1 - b), b = random baseline / 100 (0 is chance, 1 perfect); CORE =
the mean centered accuracy. The "eval bundle" (as published with DCLM): core.yaml (the tasks), eval_meta_data.csv
(baselines) and eval_data/<category>/<file>.jsonl; tasks whose data file is missing are left out of CORE by name.

Task types (few-shot examples from the rest of the task, blank-line separated, BOS prepended):
    multiple_choice   a prompt per choice (query + delim + choice), scored after the prefix all share
    schema            a prompt per context option (option + delim + continuation), scored on the suffix all share
    language_modeling context + delim + continuation; correct iff greedy decoding gives the continuation
multiple_choice and schema pick the option with the lowest mean loss. The tokens all options share run once into a
KV cache the remainders attend to, and only positions that predict a scored token reach the vocabulary: one forward
per prompt's arithmetic, several times cheaper for 10-shot prompts. An item longer than the context loses the same
number of tokens from the left of every prompt.
"""

import os
import csv
import json
import time
import random
import shutil
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import (get_base_dir, get_local_data_dir, download_file, print0, is_master, atomic_write_bytes,
                             DownloadError, UserError)

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "
FEWSHOT_SEPARATOR = "\n\n"
DATA_SHUFFLE_SEED = 1337    # order of a task's items (the first --max-per-task of it are evaluated)
FEWSHOT_SEED = 1234         # few-shot draw for item idx uses random.Random(FEWSHOT_SEED + idx)

# SQuAD ships raw (the v1.1 dev json); convert_squad() makes it a language_modeling task in the
# bundle's template, the first reference answer as the continuation (10-shot prompts are ~2K tokens).
SQUAD_URI = "reading_comprehension/squad.jsonl"
SQUAD_RAW = os.path.join("raw", "squad", "dev-v1.1.json.zip")
SQUAD_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


# ---------------------------------------------------------------- The bundle: task definitions, baselines, data files

@dataclass
class CoreTask:
    label: str
    dataset_uri: str
    num_fewshot: int
    task_type: str
    delimiter: str
    baseline: float          # random-guess accuracy in percent, from eval_meta_data.csv
    path: str | None = None  # the data file, None when it is missing


def converted_dir():
    """Where converted task files go when the bundle itself is read-only (e.g. a shared data folder)."""
    return os.path.join(get_base_dir(), "eval_bundle_converted")


def task_data_path(bundle_dir, dataset_uri):
    """The task's jsonl: in the bundle, else converted into the base dir; None when neither exists."""
    paths = [os.path.join(root, dataset_uri) for root in (os.path.join(bundle_dir, "eval_data"), converted_dir())]
    return next((path for path in paths if os.path.isfile(path)), None)


def load_tasks(bundle_dir):
    """The tasks of core.yaml, in its order, with baselines and resolved data paths."""
    import yaml
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    with open(yaml_path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or not isinstance(spec.get("icl_tasks"), list):
        raise ValueError(f"{yaml_path} has no 'icl_tasks' list")
    csv_path = os.path.join(bundle_dir, "eval_meta_data.csv")  # random baselines in percent
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
        raise ValueError(f"{csv_path} lacks the columns 'Eval Task' and 'Random baseline'")
    baselines = {r["Eval Task"].strip(): float(r["Random baseline"]) for r in rows}
    tasks = []
    for t in spec["icl_tasks"]:
        label, shots = t["label"], t["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) else shots
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{yaml_path}: task {label!r} has type {t['icl_task_type']!r}, expected one of {TASK_TYPES}")
        if label not in baselines:
            raise ValueError(f"{yaml_path}: task {label!r} has no random baseline in eval_meta_data.csv")
        tasks.append(CoreTask(label, t["dataset_uri"], int(shots), t["icl_task_type"],
                              t.get("continuation_delimiter", DEFAULT_DELIMITER), baselines[label],
                              task_data_path(bundle_dir, t["dataset_uri"])))
    return tasks


def load_task_data(path):
    """A task's items, shuffled with a fixed seed: --max-per-task takes the same random sample every run."""
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(DATA_SHUFFLE_SEED).shuffle(data)
    return data


# ---------------------------------------------------------------- Getting the bundle

def _is_bundle(path):
    return os.path.isfile(os.path.join(path, "core.yaml")) and os.path.isfile(os.path.join(path, "eval_meta_data.csv"))


def download_bundle(url, dest, progress=True):
    """Download the bundle zip (resumable, retried, CRCs checked before extracting) and unzip it to
    `dest`, whether the zip holds one top folder (the official eval_bundle/) or the files at its root."""
    zip_path = dest + ".zip"
    download_file(url, zip_path, progress=progress)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            if (bad := zf.testzip()) is not None:
                raise zipfile.BadZipFile(f"member {bad} fails its CRC check")
            tmp = dest + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            zf.extractall(tmp)  # extractall drops absolute paths and ".." components
    except zipfile.BadZipFile as e:
        os.remove(zip_path)  # so the next attempt downloads it afresh
        raise DownloadError(f"{zip_path} from {url} is not a valid zip ({e}); deleted it, run again") from None
    entries = [e for e in os.listdir(tmp) if not e.startswith("__MACOSX")]
    root = os.path.join(tmp, entries[0]) if len(entries) == 1 and not _is_bundle(tmp) else tmp
    if not _is_bundle(root):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{url} does not contain core.yaml and eval_meta_data.csv")
    os.replace(root, dest)  # atomic: dest exists only once complete
    shutil.rmtree(tmp, ignore_errors=True)
    os.remove(zip_path)
    return dest


def convert_squad(zip_path, out_path):
    """SQuAD v1.1 dev json (zipped, as published) -> language_modeling jsonl; returns the row count."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".json")]
        if len(names) != 1:
            raise ValueError(f"{zip_path} should hold exactly one .json file, has {names}")
        squad = json.loads(zf.read(names[0]).decode("utf-8"))
    rows = [{"context": SQUAD_TEMPLATE.format(context=par["context"].strip(), question=qa["question"].strip()),
             "continuation": qa["answers"][0]["text"].strip()}
            for article in squad["data"] for par in article["paragraphs"] for qa in par["qas"]]
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    atomic_write_bytes(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    return len(rows)


def _squad_pending(target):
    """True if SQuAD must still be converted from the raw file shipped beside the bundle."""
    return task_data_path(target, SQUAD_URI) is None and os.path.isfile(os.path.join(target, SQUAD_RAW))


def ensure_bundle(bundle_dir=None, url=None, progress=True):
    """Path of a ready eval bundle; call it on every rank before any training or eval loop. Order:
    bundle_dir, else $NANOCHAT_LOCAL_DATA/eval_core, else <base dir>/eval_bundle, downloaded from `url`
    ($NANOCHAT_EVAL_BUNDLE_URL, default the official zip) if not there yet. Local rank 0 downloads and
    converts under a file lock (jobs sharing a disk never race); the other ranks poll the disk rather
    than wait in a collective, whose timeout a slow download would trip (upstream nanochat lost whole
    multi-GPU runs that way). If the downloader fails, torchrun stops the others."""
    from filelock import FileLock
    if bundle_dir is None and get_local_data_dir() is not None:
        bundle_dir = os.path.join(get_local_data_dir(), "eval_core")
        if not _is_bundle(bundle_dir):
            raise UserError(f"NANOCHAT_LOCAL_DATA is set but {bundle_dir} has no core.yaml and eval_meta_data.csv; "
                            f"put the eval bundle there, pass --bundle-dir, or unset NANOCHAT_LOCAL_DATA to download it")
    if bundle_dir is not None and not _is_bundle(bundle_dir):
        raise UserError(f"--bundle-dir {bundle_dir}: no core.yaml and eval_meta_data.csv there "
                        f"(expected an unzipped CORE eval bundle)")
    target = bundle_dir or os.path.join(get_base_dir(), "eval_bundle")
    lock = FileLock(os.path.join(get_base_dir(), "eval_bundle.lock"))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with lock:
            if not _is_bundle(target):
                url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or BUNDLE_URL
                print0(f"Downloading the CORE eval bundle from {url} to {target}")
                try:
                    download_bundle(url, target, progress=progress and is_master())
                except DownloadError as e:
                    raise UserError(f"could not get the CORE eval bundle: {e}. Pass --bundle-dir to an "
                                    f"unzipped copy, or set NANOCHAT_LOCAL_DATA.") from None
            if _squad_pending(target):
                out = os.path.join(converted_dir(), SQUAD_URI)
                n = convert_squad(os.path.join(target, SQUAD_RAW), out)
                print0(f"Converted {os.path.join(target, SQUAD_RAW)} into {out} ({n:,} questions)")
    else:
        while True:
            with lock:
                if _is_bundle(target) and not _squad_pending(target):
                    break
            time.sleep(1.0)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return target


# ---------------------------------------------------------------- Prompts

def fewshot_indices(idx, n, k):
    """k distinct indices in range(n), never idx, drawn by random.Random(FEWSHOT_SEED + idx).
    Sampling range(n - 1) and skipping over idx keeps this O(k) even for 20K-item tasks."""
    if k <= 0:
        return []
    if k > n - 1:
        raise ValueError(f"cannot draw {k} few-shot examples from a task of {n} items (the item itself is excluded)")
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(n - 1), k)
    return [j + 1 if j >= idx else j for j in picks]


def render_prompts(task_type, item, fewshot, delimiter):
    """One item's prompts: one per choice / context option, or [without, with] the continuation."""
    if task_type == "multiple_choice":
        shots = [f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}" for ex in fewshot]
        return [FEWSHOT_SEPARATOR.join(shots + [f"{item['query']}{delimiter}{choice}"]) for choice in item["choices"]]
    if task_type == "schema":
        shots = [f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}" for ex in fewshot]
        return [FEWSHOT_SEPARATOR.join(shots + [f"{option}{delimiter}{item['continuation']}"])
                for option in item["context_options"]]
    if task_type == "language_modeling":
        shots = [f"{ex['context'].strip()}{delimiter}{ex['continuation']}" for ex in fewshot]
        without = FEWSHOT_SEPARATOR.join(shots + [f"{item['context'].strip()}{delimiter}"]).strip()
        with_cont = FEWSHOT_SEPARATOR.join(shots + [f"{item['context'].strip()}{delimiter}{item['continuation']}"])
        return [without, with_cont]
    raise ValueError(f"unknown task type {task_type!r}: expected one of {TASK_TYPES}")


def _common_prefix_len(seqs):
    # zip stops at the shortest sequence: the first column where the sequences differ, else its length
    return next((i for i, col in enumerate(zip(*seqs)) if len(set(col)) > 1), min(len(s) for s in seqs))


def tokenize_prompts(tokenizer, task_type, prompts):
    """(rows of token ids, [(start, end)] scored span per row). Every row starts with BOS; every span
    holds at least one token and never includes position 0 (it needs a position that predicts it)."""
    ids = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    shortest = min(len(s) for s in ids)
    if task_type == "multiple_choice":
        # Identical or nested choices would leave an empty span: keep at least the last token.
        start = max(1, min(_common_prefix_len(ids), shortest - 1)) if len(ids) > 1 else 1
        return ids, [(start, len(s)) for s in ids]
    if task_type == "schema":
        suffix = max(1, min(_common_prefix_len([s[::-1] for s in ids]), shortest - 1))
        return ids, [(len(s) - suffix, len(s)) for s in ids]
    if task_type == "language_modeling":
        without, with_cont = ids
        # The stripped prompt is normally a token prefix of the full one; if a merge crosses the
        # boundary, the span starts where the two first differ.
        start = max(1, min(_common_prefix_len([without, with_cont]), len(with_cont) - 1))
        return [with_cont], [(start, len(with_cont))]
    raise ValueError(f"unknown task type {task_type!r}: expected one of {TASK_TYPES}")


def crop_left(rows, spans, max_len):
    """Drop the same number of leading tokens from every row so the longest fits in max_len, shifting
    the spans to match; rows keep their BOS only when nothing is cut."""
    cut = max(0, max(len(r) for r in rows) - max_len)
    return [r[cut:] for r in rows], [(max(1, s - cut), e - cut) for s, e in spans]


# ---------------------------------------------------------------- Scoring

@torch.no_grad()
def span_logits(model, rows, spans, pad_id, device):
    """For each row, the fp32 softcapped logits (e - s, V) at the positions that predict its span [s, e).
    The rows' common prefix (up to the earliest span) runs once into a batch-1 KV cache copied into
    every row; the rest of each row runs as one right-padded batch after it."""
    from nanochat.engine import KVCache
    P = min(_common_prefix_len(rows), min(s for s, _ in spans) - 1) if len(rows) > 1 else 0
    cache = None
    if P > 0:
        prefix = KVCache.for_model(model, 1, P)
        model.trunk(torch.tensor([rows[0][:P]], dtype=torch.long, device=device), prefix)
        cache = KVCache.for_model(model, len(rows), max(len(r) for r in rows))
        cache.prefill(prefix)
    width = max(len(r) for r in rows) - P
    ids = torch.tensor([r[P:] + [pad_id] * (width - len(r) + P) for r in rows], dtype=torch.long)
    hidden = model.trunk(ids.to(device), cache)  # (B, T - P, C); position p of row i is hidden[i, p - P]
    return [model.logits(hidden[i, s - 1 - P:e - 1 - P]) for i, (s, e) in enumerate(spans)]


@torch.no_grad()
def evaluate_example(model, tokenizer, data, idx, task, device, max_len=None):
    """Score item data[idx] of `task` -> (correct, details: prompts, spans, and per-option mean losses and
    the chosen option, or the greedy prediction for language modeling)."""
    item, fewshot = data[idx], [data[j] for j in fewshot_indices(idx, len(data), task.num_fewshot)]
    prompts = render_prompts(task.task_type, item, fewshot, task.delimiter)
    rows, spans = tokenize_prompts(tokenizer, task.task_type, prompts)
    rows, spans = crop_left(rows, spans, max_len or model.config.sequence_len)
    logits = span_logits(model, rows, spans, tokenizer.get_bos_token_id(), device)
    targets = [torch.tensor(r[s:e], dtype=torch.long, device=device) for r, (s, e) in zip(rows, spans)]
    details = {"prompts": prompts, "spans": spans}
    if task.task_type == "language_modeling":
        predicted = logits[0].argmax(dim=-1)
        return bool(torch.equal(predicted, targets[0])), {**details, "predicted": predicted.tolist()}
    mean_losses = [torch.nn.functional.cross_entropy(lg, tg).item() for lg, tg in zip(logits, targets)]
    chosen = min(range(len(mean_losses)), key=mean_losses.__getitem__)
    return chosen == item["gold"], {**details, "mean_losses": mean_losses, "chosen": chosen}


def evaluate_task(model, tokenizer, task, device, max_per_task=-1, rank=0, world_size=1, progress=True):
    """Accuracy of the model on one task (items strided across ranks, correctness summed across them)."""
    from tqdm import tqdm
    data = load_task_data(task.path)
    n = len(data) if max_per_task is None or max_per_task < 0 else min(max_per_task, len(data))
    correct = torch.zeros(n, dtype=torch.float32, device=device)
    for idx in tqdm(range(rank, n, world_size), desc=task.label, disable=not (progress and rank == 0),
                    leave=False, dynamic_ncols=True):
        # Few-shot examples come from the whole task, so an item's prompt does not depend on n.
        correct[idx] = float(evaluate_example(model, tokenizer, data, idx, task, device)[0])
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item() if n else float("nan"), n


# ---------------------------------------------------------------- Aggregation

def centered_accuracy(accuracy, baseline_percent):
    """0 = random guessing, 1 = perfect: (acc - b) / (1 - b) with b = baseline_percent / 100."""
    return (accuracy - baseline_percent / 100.0) / (1.0 - baseline_percent / 100.0)


def core_summary(accuracies, tasks):
    """{label: acc} over `tasks` -> centered accuracies, CORE (their mean), tasks used and missing."""
    centered = {t.label: centered_accuracy(accuracies[t.label], t.baseline) for t in tasks if t.label in accuracies}
    missing = [t.label for t in tasks if t.label not in accuracies]
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"accuracy": {k: accuracies[k] for k in centered}, "centered": centered, "core": core,
            "tasks_used": len(centered), "tasks_total": len(tasks), "missing": missing}


def evaluate_core(model, tokenizer, tasks, device, max_per_task=-1, rank=0, world_size=1, progress=True, log=print0):
    """Every task that has data, aggregated: core_summary(...) plus items and seconds per task. The
    entry point for scripts; call ensure_bundle() first."""
    accuracies, items, seconds = {}, {}, {}
    for task in (t for t in tasks if t.path is not None):
        t0 = time.time()
        acc, n = evaluate_task(model, tokenizer, task, device, max_per_task, rank, world_size, progress)
        accuracies[task.label], items[task.label], seconds[task.label] = acc, n, time.time() - t0
        if log:
            log(f"{task.label:<35} accuracy {acc:.4f} | centered {centered_accuracy(acc, task.baseline):+.4f} | "
                f"{n:>6,} items | {seconds[task.label]:.1f}s")
    return {**core_summary(accuracies, tasks), "items": items, "seconds": seconds}


def write_results_csv(path, summary):
    """The per-task table (Task, Accuracy, Centered, and a final CORE row), padded like DCLM's."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    lines += [f"{t:<35}, {summary['accuracy'][t]:<10.6f}, {c:<10.6f}" for t, c in summary["centered"].items()]
    lines.append(f"{'CORE':<35}, {'':<10}, {summary['core']:<10.6f}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def read_results_csv(path):
    """A Task/Accuracy/Centered table (ours or published) -> ({label: (acc or None, centered)}, core)."""
    rows, core = {}, None
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        if header[:3] != ["Task", "Accuracy", "Centered"]:
            raise ValueError(f"{path}: expected the header Task, Accuracy, Centered; got {header}")
        for rec in reader:
            rec = [c.strip() for c in rec]
            if rec and rec[0] == "CORE":
                core = float(rec[2])
            elif rec and rec[0]:
                rows[rec[0]] = (float(rec[1]) if rec[1] else None, float(rec[2]))
    return rows, core
