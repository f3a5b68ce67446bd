"""Pretraining text shards: where they live, how to get them, and how to read them back.

A shard is <base dir>/base_data/shard_NNNNN.parquet: one `text` column (a document per row), zstd, row
groups of 1024 documents, the unit of reading (under torchrun rank r reads row groups r, r+W, ...). The
last shard is the validation split, the others train, so at least two are needed. base_data/source.json
says where the shards came from, so a download never mixes into imported shards (or another hub dataset)
and a hub download without its validation shard is caught.

    python -m nanochat.dataset download -n 8          # ClimbMix from the HuggingFace hub (+ its val shard)
    python -m nanochat.dataset import DIR [DIR2 ...]  # your own .txt / .jsonl(.gz) / .parquet files
    python -m nanochat.dataset info                   # what is there
"""

import os
import gzip
import json
import time
import random
import shutil
import argparse
import contextlib
import datetime
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir, atomic_write_json, download_file, run_cli, DownloadError

ROW_GROUP_SIZE = 1024
DEFAULT_ENDPOINT = "https://huggingface.co"
# The hub datasets of pre-shuffled shards; index max_shard is the validation shard.
SOURCES = {"climbmix": {"repo": "karpathy/climbmix-400b-shuffle", "max_shard": 6542},
           "fineweb": {"repo": "karpathy/fineweb-edu-100b-shuffle", "max_shard": 1822}}
SOURCE_FILE = "source.json"
GET_SHARDS_HINT = ("Get shards with one of:\n"
                   "  python -m nanochat.dataset download -n 8      (ClimbMix from the HuggingFace hub)\n"
                   "  python -m nanochat.dataset import DIR         (a folder of your own .txt/.jsonl/.parquet files)")


class DataError(UserError, ValueError):
    """A problem with the shards on disk, their sources or the request for them, saying what to do."""


def get_data_dir():
    path = os.path.join(get_base_dir(), "base_data")
    os.makedirs(path, exist_ok=True)
    return path


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def _shard_names(data_dir):
    """Shard file names in data_dir, sorted (in-flight *.partial and *.tmpPID files are not shards)."""
    if not os.path.isdir(data_dir):
        return []
    return sorted(f for f in os.listdir(data_dir)
                  if f.endswith(".parquet") and os.path.isfile(os.path.join(data_dir, f)))


def read_source(data_dir=None):
    """base_data/source.json (where the shards came from), or None."""
    with contextlib.suppress(OSError, ValueError), open(os.path.join(data_dir or get_data_dir(), SOURCE_FILE)) as f:
        return json.load(f)
    return None


# Reading

def list_parquet_files(split=None, data_dir=None):
    """Paths of the shards, sorted by name: split None = all, "train" = all but the last, "val" = the last."""
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', not {split!r}")
    data_dir = data_dir or get_data_dir()
    names = _shard_names(data_dir)
    if not names:
        raise DataError(f"no pretraining shards in {data_dir}.\n{GET_SHARDS_HINT}")
    paths = [os.path.join(data_dir, n) for n in names]
    if split is None:
        return paths
    if len(paths) < 2:
        raise DataError(f"only one shard in {data_dir} ({names[0]}): at least 2 are needed, because the "
                        f"last one is held out for validation.\n{GET_SHARDS_HINT}")
    source = (read_source(data_dir) or {}).get("source")
    # Without its own val shard the last train shard would silently become "val", and val loss
    # would change with the number of shards downloaded.
    if source in SOURCES and names[-1] != shard_name(SOURCES[source]["max_shard"]):
        raise DataError(f"the {source} validation shard {shard_name(SOURCES[source]['max_shard'])} is missing from "
                        f"{data_dir}. Fetch it with:\n  python -m nanochat.dataset download -n 0 --source {source}")
    return paths[:-1] if split == "train" else paths[-1:]


def _unreadable(path, err, what="it"):
    return DataError(f"{path} is not a readable parquet shard ({what}: {err}). It is corrupt or was cut "
                     f"short, e.g. by an interrupted copy: delete it and download/import it again "
                     f"(python -m nanochat.dataset download ... / import DIR).")


def open_shard(path):
    """Open a shard for reading (footer only; row groups are read on demand)."""
    if not os.path.isfile(path):
        raise DataError(f"shard {path} does not exist.\n{GET_SHARDS_HINT}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (it has {pf.schema_arrow.names}): it is not a "
                        f"pretraining shard; delete it and download/import again.")
    pf.shard_path = path  # so errors from read_row_group can name the file
    return pf


def read_row_group(pf_or_path, i):
    """The documents (list of str) in row group i of a shard (a path or an open_shard() result)."""
    pf = pf_or_path if isinstance(pf_or_path, pq.ParquetFile) else open_shard(pf_or_path)
    path = getattr(pf, "shard_path", "<parquet file>")
    if not 0 <= i < pf.num_row_groups:
        raise IndexError(f"row group {i} out of range: {path} has {pf.num_row_groups} row groups")
    try:
        return pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e, f"row group {i}") from e


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the documents of row groups start, start+step, ... of every shard of the split, in order.
    With start=rank, step=world_size each row group goes to exactly one rank."""
    for path in list_parquet_files(split, data_dir):
        pf = open_shard(path)
        for rg in range(start, pf.num_row_groups, step):
            yield read_row_group(pf, rg)


# Downloading from the HuggingFace hub

def hub_endpoint(base_url=None):
    # HF_ENDPOINT is the variable huggingface_hub reads for a mirror.
    url = base_url or os.environ.get("NANOCHAT_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return url.rstrip("/")


def fetch_manifest(source, endpoint, data_dir, retries=3, timeout=30, backoff=2.0):
    """{file name: {"size", "sha256"}} of the source's hub repo, cached in base_data/manifest_<source>.json,
    else from the hub's tree API (following Link: rel=next pages); None when there is no listing.
    DataError when the hub cannot be reached at all: every download would fail the same way."""
    import requests
    from urllib3.util import Retry

    cache = os.path.join(data_dir, f"manifest_{source}.json")
    with contextlib.suppress(OSError, ValueError, KeyError), open(cache) as f:
        return json.load(f)["files"]
    repo = SOURCES[source]["repo"]
    url, files = f"{endpoint}/api/datasets/{repo}/tree/main", {}
    http = requests.Session()  # retried with exponential backoff on connection errors and 429/5xx
    http.mount(endpoint, requests.adapters.HTTPAdapter(max_retries=Retry(
        total=retries - 1, backoff_factor=backoff, status_forcelist=(429, 500, 502, 503, 504), raise_on_status=False)))
    try:
        while url:
            r = http.get(url, timeout=timeout)
            r.raise_for_status()
            for entry in r.json():
                if entry.get("type", "file") == "file":
                    lfs = entry.get("lfs") or {}
                    files[entry["path"]] = {"size": lfs.get("size", entry.get("size")), "sha256": lfs.get("oid")}
            nxt = r.links.get("next", {}).get("url")
            url = urllib.parse.urljoin(r.url, nxt) if nxt else None
    except requests.ConnectionError as e:
        raise DataError(f"cannot reach the HuggingFace hub at {endpoint} ({e}).\n"
                        f"Offline? Import local text instead: python -m nanochat.dataset import DIR\n"
                        f"Behind a mirror? Set NANOCHAT_HF_ENDPOINT (or pass base_url).") from e
    except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"WARNING: could not fetch the file listing of {repo} from {endpoint} ({e}); downloads "
              f"will be verified by Content-Length and parquet footer only (no size/sha256 check).")
        return None
    atomic_write_json(cache, {"repo": repo, "endpoint": endpoint, "files": files,
                              "fetched": datetime.datetime.now().isoformat(timespec="seconds")})
    return files


def download_shards(indices, num_workers=4, source="climbmix", base_url=None, progress=True,
                    data_dir=None, retries=5, backoff=2.0, timeout=30):
    """Download train shards `indices` of a hub dataset, plus its validation shard, into base_data/ with
    a thread pool: each file resumable, retried, checked against the hub's size and sha256, renamed into
    place when complete and opened as parquet. Returns the paths; DataError lists every shard that failed."""
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    repo, max_shard = SOURCES[source]["repo"], SOURCES[source]["max_shard"]
    indices = sorted(set(int(i) for i in indices) | {max_shard})
    bad = [i for i in indices if not 0 <= i <= max_shard]
    if bad:
        raise DataError(f"shard indices {bad[:5]} out of range: {source} has shards 0..{max_shard} "
                        f"({max_shard} is the validation shard)")
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    # Hub shards next to shards from somewhere else would break the split rule and val loss.
    names, have = _shard_names(data_dir), (read_source(data_dir) or {}).get("source")
    if names and have != source:
        what = f"from '{have}'" if have else "of unknown origin (no source.json)"
        raise DataError(f"{data_dir} already holds {len(names)} shards {what}; adding {source} shards would "
                        f"mix datasets. Use another NANOCHAT_BASE_DIR, or delete {data_dir} first.")
    endpoint = hub_endpoint(base_url)
    manifest = fetch_manifest(source, endpoint, data_dir, timeout=timeout, backoff=backoff)
    atomic_write_json(os.path.join(data_dir, SOURCE_FILE), {"source": source, "repo": repo, "endpoint": endpoint})

    def fetch(i):
        name = shard_name(i)
        path = os.path.join(data_dir, name)
        if manifest is not None and name not in manifest:
            raise DataError(f"not in the file listing of {repo}")
        size, sha = (manifest[name]["size"], manifest[name]["sha256"]) if manifest is not None else (None, None)
        # A file at its final name was verified before it was renamed there, so a size check is
        # enough; re-hashing hundreds of 100 MB shards on every run would take minutes.
        if not (os.path.exists(path) and (size is None or os.path.getsize(path) == size)):
            download_file(f"{endpoint}/datasets/{repo}/resolve/main/{name}", path, expected_size=size, sha256=sha,
                          retries=retries, timeout=timeout, progress=progress and num_workers == 1, backoff=backoff)
        try:
            open_shard(path)
        except DataError as e:
            os.remove(path)
            raise DataError(f"downloaded file is not valid parquet ({e.__cause__ or e}); removed it") from e
        return path

    done, failed = {}, {}
    mode = "size+sha256" if manifest is not None else "Content-Length+parquet footer"
    print(f"Downloading {len(indices)} {source} shards ({len(indices) - 1} train + val {shard_name(max_shard)}) "
          f"from {endpoint} to {data_dir} with {num_workers} workers, verifying {mode}")
    from tqdm import tqdm
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers))
    try:
        futures = {pool.submit(fetch, i): i for i in indices}
        with tqdm(total=len(indices), unit="shard", desc="shards", disable=not progress) as bar:
            for fut in as_completed(futures):
                try:
                    done[futures[fut]] = fut.result()
                except (DownloadError, DataError, OSError) as e:
                    failed[futures[fut]] = str(e)
                bar.update(1)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        print("Interrupted: finished shards are kept and partial ones resume on the next run.")
        raise
    pool.shutdown()
    print(f"Downloaded {len(done)}/{len(indices)} shards to {data_dir}")
    if failed:
        lines = "\n".join(f"  {shard_name(i)}: {msg}" for i, msg in sorted(failed.items()))
        raise DataError(f"{len(failed)} of {len(indices)} shards failed:\n{lines}\n"
                        f"Run the same command again to retry (finished shards are kept, partial ones resume).\n"
                        f"No network? Import local text instead: python -m nanochat.dataset import DIR")
    return [done[i] for i in indices]


# Importing local text

IMPORT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_SEPARATORS = ("\n\n", "\n", ". ", " ")  # paragraph, line, sentence, word: coarsest first


def split_text(text, max_chars, separators=_SEPARATORS):
    """Cut text into consecutive pieces of at most max_chars at the coarsest separators that allow it
    (hard cuts only when none is left). "".join(pieces) == text."""
    if len(text) <= max_chars:
        return [text] if text else []
    seps = [s for s in separators if s in text]
    if not seps:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    sep, finer = seps[0], seps[1:]
    parts = text.split(sep)
    pieces = []
    for k, p in enumerate(parts):
        p = p + sep if k < len(parts) - 1 else p  # keep the separator with the text before it
        pieces.extend(split_text(p, max_chars, finer) if len(p) > max_chars else [p] if p else [])
    chunks, cur, cur_len = [], [], 0  # greedy merge of neighbours back up to max_chars
    for p in pieces:
        if cur and cur_len + len(p) > max_chars:
            chunks.append("".join(cur))
            cur, cur_len = [], 0
        cur.append(p)
        cur_len += len(p)
    return chunks + (["".join(cur)] if cur else [])


def file_texts(path):
    """The raw texts in one source file: a whole .txt, each .jsonl row's text/content, each parquet row."""
    low = path.lower()
    if low.endswith(".parquet"):
        try:  # a file without a text column reads as an empty table, and .column("text") raises KeyError
            texts = pq.ParquetFile(path).read(columns=["text"]).column("text").to_pylist()
        except (pa.ArrowException, OSError, KeyError) as e:
            raise DataError(f"{path}: not a readable parquet file with a 'text' column ({e})") from e
        yield from (t for t in texts if t)
        return
    with (gzip.open if low.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        if low.endswith((".txt", ".txt.gz")):
            yield f.read()
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e}). Each line of a .jsonl file "
                                f"must be a JSON object with a 'text' (or 'content') field.") from e
            text = row.get("text", row.get("content")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: no string 'text' or 'content' field in this row "
                                f"(keys: {list(row)[:10] if isinstance(row, dict) else type(row).__name__}).")
            yield text


def documents_from_file(path, doc_chars=20_000):
    """An import's documents from one file: its texts cut into pieces of at most doc_chars (0/None: uncut),
    stripped, empties dropped. A book is many documents: the dataloader crops documents longer than a row."""
    for text in file_texts(path):
        for piece in (split_text(text, doc_chars) if doc_chars else [text]):
            if piece := piece.strip():
                yield piece


def find_import_files(src_dir, exclude=None):
    """(importable files under src_dir, recursive, sorted, hidden and `exclude` skipped; how many others)."""
    found, ignored = [], 0
    exclude = os.path.realpath(exclude) if exclude else None
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != exclude)
        for f in sorted(f for f in files if not f.startswith(".")):
            if f.lower().endswith(IMPORT_SUFFIXES):
                found.append(os.path.join(root, f))
            else:
                ignored += 1
    return found, ignored


def import_local(src_dirs, val_fraction=0.05, shard_chars=250_000_000, seed=42, doc_chars=20_000,
                 overwrite=False, data_dir=None, row_group_size=None, progress=True):
    """Turn one folder (or a list of folders) of .txt / .jsonl(.gz) / .parquet files into shards in
    base_data/: documents shuffled together with `seed`, the last val_fraction of them (at least one doc,
    and a full row group when there are 10 or more) in the validation shard, the rest in train shards
    of about shard_chars characters. Returns the shard paths."""
    t0 = time.time()
    src_dirs = [src_dirs] if isinstance(src_dirs, (str, os.PathLike)) else list(src_dirs)
    if not src_dirs:
        raise DataError("no import source given: name at least one folder")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction (--val-fraction) must be between 0 and 1, got {val_fraction}")
    if shard_chars <= 0:
        raise DataError(f"shard_chars (--shard-chars) must be positive, got {shard_chars}")
    if row_group_size is not None and row_group_size < 1:
        raise DataError(f"row_group_size (--row-group-size) must be at least 1, got {row_group_size}")
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    real_data, real_srcs = os.path.realpath(data_dir), [os.path.realpath(d) for d in src_dirs]
    for src_dir, real_src in zip(src_dirs, real_srcs):
        if not os.path.isdir(src_dir):
            raise DataError(f"import source {str(src_dir)!r} is not a directory")
        if real_src == real_data or real_src.startswith(real_data + os.sep):
            raise DataError(f"cannot import {src_dir} into itself ({data_dir}): point import at your source files")
    existing = _shard_names(data_dir)
    if existing and not overwrite:
        raise DataError(f"{data_dir} already holds {len(existing)} shards ({existing[0]} ...); importing would mix "
                        f"datasets. Pass --overwrite (overwrite=True) to replace them, or use another NANOCHAT_BASE_DIR.")

    files, ignored = {}, 0  # real path -> path: a folder named twice, or inside another one, is read once
    for src_dir in src_dirs:
        found, skipped = find_import_files(src_dir, exclude=data_dir)
        if not found:
            raise DataError(f"no importable files under {src_dir} (looked for {', '.join(IMPORT_SUFFIXES)})")
        ignored += skipped
        for f in found:
            files.setdefault(os.path.realpath(f), f)
    files = list(files.values())
    where = ", ".join(map(str, src_dirs))
    from tqdm import tqdm
    docs = [d for path in tqdm(files, desc="reading", unit="file", disable=not progress)
            for d in documents_from_file(path, doc_chars)]
    n = len(docs)
    if n < 2:
        raise DataError(f"{where} yielded {n} document(s); need at least 2 (one for train, one for val)")
    random.Random(seed).shuffle(docs)

    n_val = min(max(1, round(val_fraction * n), ROW_GROUP_SIZE if n >= 10 * ROW_GROUP_SIZE else 1), n - 1)
    # Row groups are what ranks stride over, so a small corpus gets smaller groups: the val shard
    # keeps >= 8 of them and up to 8 ranks all get val data.
    rg = row_group_size or min(ROW_GROUP_SIZE, max(1, n_val // 8))
    train, val = docs[:n - n_val], docs[n - n_val:]

    # Train shards close once they hold shard_chars characters and a whole number of row groups.
    groups, cur, cur_chars = [], [], 0
    for d in train:
        cur.append(d)
        cur_chars += len(d)
        if cur_chars >= shard_chars and len(cur) % rg == 0:
            groups.append(cur)
            cur, cur_chars = [], 0
    groups += [cur, val] if cur else [val]

    # Write everything to a hidden staging dir first, then rename into place: a crash never leaves
    # train shards without their val shard (the last one) behind.
    staging = os.path.join(data_dir, ".importing")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    names = [shard_name(k) for k in range(len(groups))]
    for name, group in zip(tqdm(names, desc="writing", unit="shard", disable=not progress), groups):
        # The hub shards' layout: zstd level 3, no dictionary or statistics (useless for prose).
        pq.write_table(pa.table({"text": pa.array(group, type=pa.string())}), os.path.join(staging, name),
                       row_group_size=rg, compression="zstd", compression_level=3, use_dictionary=False,
                       write_statistics=False)
    if overwrite:  # old shards and any half-downloaded ones
        for name in os.listdir(data_dir):
            if name.endswith((".parquet", ".parquet.partial")):
                os.remove(os.path.join(data_dir, name))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(data_dir, name))
    shutil.rmtree(staging, ignore_errors=True)

    chars, val_chars = sum(map(len, docs)), sum(map(len, val))
    atomic_write_json(os.path.join(data_dir, SOURCE_FILE), {
        "source": "import", "src_dirs": real_srcs, "files": len(files), "ignored_files": ignored, "docs": n,
        "chars": chars, "train_docs": n - n_val, "val_docs": n_val, "shards": len(names), "row_group_size": rg,
        "seed": seed, "doc_chars": doc_chars, "shard_chars": shard_chars, "val_fraction": val_fraction,
        "created": datetime.datetime.now().isoformat(timespec="seconds")})
    print(f"Imported {where}: {len(files)} files read ({ignored} other files ignored), "
          f"{n:,} documents, {chars:,} characters")
    print(f"  train: {len(names) - 1} shard(s), {n - n_val:,} docs, {chars - val_chars:,} chars")
    print(f"  val:   1 shard ({names[-1]}), {n_val:,} docs, {val_chars:,} chars")
    print(f"  {len(names)} shards in row groups of {rg} docs written to {data_dir} in {time.time() - t0:.1f}s")
    return [os.path.join(data_dir, name) for name in names]


# Info and CLI

def print_info(data_dir=None):
    data_dir = data_dir or get_data_dir()
    names, source = _shard_names(data_dir), read_source(data_dir)
    print(f"Shards in {data_dir}: {len(names)}")
    if source:
        shown = ("source", "repo", "endpoint", "src_dir", "src_dirs", "docs", "chars", "seed", "created")
        print("Source: " + ", ".join(f"{k}={v}" for k, v in source.items() if k in shown))
    if not names:
        print(GET_SHARDS_HINT)
        return
    total_docs = total_bytes = 0
    print(f"{'shard':<22}{'split':<7}{'docs':>12}{'row groups':>12}{'MB on disk':>12}{'MB text':>10}")
    for k, name in enumerate(names):
        split = "val" if k == len(names) - 1 and len(names) > 1 else "train"
        size = os.path.getsize(os.path.join(data_dir, name))
        total_bytes += size
        try:
            md = open_shard(os.path.join(data_dir, name)).metadata
        except DataError as e:
            print(f"{name:<22}{split:<7}  UNREADABLE: {e}")
            continue
        text_mb = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / 1e6
        total_docs += md.num_rows
        print(f"{name:<22}{split:<7}{md.num_rows:>12,}{md.num_row_groups:>12}{size / 1e6:>12.1f}{text_mb:>10.1f}")
    print(f"Total: {total_docs:,} docs, {total_bytes / 1e6:.1f} MB on disk")
    if len(names) < 2:
        print("Only one shard: at least 2 are needed (the last is validation).")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.dataset", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("download", help="download pretraining shards from the HuggingFace hub", formatter_class=fmt)
    p.add_argument("-n", "--num-files", type=int, default=8, help="number of train shards to fetch, shards 0..n-1 "
                   "(-1 = all of them; ~100 MB each); the validation shard is always fetched too")
    p.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--source", choices=sorted(SOURCES), default="climbmix", help="fineweb: the legacy FineWeb-EDU")
    p.add_argument("--endpoint", help=f"hub base URL, e.g. a mirror (None: $NANOCHAT_HF_ENDPOINT, $HF_ENDPOINT "
                   f"or {DEFAULT_ENDPOINT})")
    p.add_argument("--retries", type=int, default=5, help="attempts per file before giving up")
    p = sub.add_parser("import", help="turn folders of .txt/.jsonl(.gz)/.parquet files into shards", formatter_class=fmt)
    p.add_argument("src_dirs", nargs="+", metavar="src_dir",
                   help="folder(s) to import, each searched recursively; their documents are shuffled together")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation")
    p.add_argument("--shard-chars", type=int, default=250_000_000, help="characters per train shard")
    p.add_argument("--doc-chars", type=int, default=20_000, help="cut longer texts (e.g. whole books) into documents "
                   "of at most this many characters at paragraph/line/sentence boundaries; 0 = never cut")
    p.add_argument("--row-group-size", type=int, help="documents per parquet row group (None: 1024, less for small "
                   "corpora so the val shard has at least 8 row groups)")
    p.add_argument("--seed", type=int, default=42, help="seed of the document shuffle")
    p.add_argument("--overwrite", action="store_true", help="delete the shards already in base_data first")
    sub.add_parser("info", help="list the shards in base_data: split, documents, sizes")
    args = parser.parse_args(argv)

    if args.command == "download":
        if args.num_files < -1:
            parser.error(f"-n/--num-files must be -1 (all) or >= 0, got {args.num_files}")
        n = SOURCES[args.source]["max_shard"] if args.num_files == -1 else args.num_files
        download_shards(range(n), num_workers=args.num_workers, source=args.source, base_url=args.endpoint,
                        retries=args.retries)
    elif args.command == "import":
        import_local(args.src_dirs, val_fraction=args.val_fraction, shard_chars=args.shard_chars, seed=args.seed,
                     doc_chars=args.doc_chars, overwrite=args.overwrite, row_group_size=args.row_group_size)
    else:
        print_info()


if __name__ == "__main__":
    run_cli(main)
