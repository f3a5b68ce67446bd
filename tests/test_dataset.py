"""Tests for nanochat/dataset.py: importing real text into shards, the train/val split, clear errors on
corrupt shards, rank striding, and the hub downloader against a local HTTP server that misbehaves."""

import collections
import gzip
import hashlib
import json
import os
import shutil
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.common import run_cli
from nanochat.dataset import (DataError, documents_from_file, download_shards, import_local, list_parquet_files,
                              open_shard, parquets_iter_batched, read_row_group, split_text)
from tests.httpserver import Fault, LocalHTTPServer, Route


def real_files(shared_data):
    """A few MB of real prose in all the shapes the importer reads: plain books (no blank lines),
    a play with blank lines, and web documents in jsonl."""
    pt = shared_data / "pretrain_text"
    return [pt / "tinyshakespeare" / "input.txt", pt / "nltk_gutenberg" / "carroll-alice.txt",
            pt / "nltk_gutenberg" / "blake-poems.txt", pt / "llamafactory_demo" / "c4_demo.jsonl"]


@pytest.fixture
def src_dir(tmp_path, shared_data):
    d = tmp_path / "src"
    d.mkdir()
    for f in real_files(shared_data):
        os.symlink(f, d / f.name)
    (d / "README.md").write_text("not a text source\n")  # unsupported types are ignored
    return d


def all_docs(paths):
    return [doc for p in paths for rg in range(open_shard(p).num_row_groups) for doc in read_row_group(p, rg)]


# -----------------------------------------------------------------------------
# Splitting and importing

def test_split_text_is_a_partition_at_good_boundaries(shared_data):
    text = (shared_data / "pretrain_text" / "nltk_gutenberg" / "carroll-alice.txt").read_text()
    for max_chars in (500, 5_000, 20_000):
        pieces = split_text(text, max_chars)
        assert "".join(pieces) == text
        assert all(0 < len(p) <= max_chars for p in pieces)
        # No blank lines in this file: cuts fall at line ends, or inside lines longer than max_chars
        # (the longest is 942 chars) at a sentence end or a space.
        ends = ("\n",) if max_chars > 1_000 else ("\n", ". ", " ")
        assert all(p.endswith(ends) for p in pieces[:-1])
    play = (shared_data / "pretrain_text" / "tinyshakespeare" / "input.txt").read_text()
    pieces = split_text(play, 4_000)  # its longest speech is 3,080 chars
    assert "".join(pieces) == play and all(p.endswith("\n\n") for p in pieces[:-1])
    assert split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no separator at all: hard cuts
    assert split_text("", 10) == []


def test_import_real_text(tmp_path, src_dir, capsys):
    out = tmp_path / "base_data"
    paths = import_local(src_dir, shard_chars=300_000, doc_chars=5_000, data_dir=out, progress=False)
    printed = capsys.readouterr().out
    assert "4 files read (1 other files ignored)" in printed and "val:" in printed

    assert len(paths) >= 2 and paths == list_parquet_files(data_dir=out)
    assert list_parquet_files("val", data_dir=out) == paths[-1:]
    assert list_parquet_files("train", data_dir=out) == paths[:-1]

    # Every document comes back exactly once; none is longer than doc_chars; jsonl rows are intact.
    expected = [d for f in sorted(src_dir.iterdir()) if f.suffix != ".md" for d in documents_from_file(str(f), 5_000)]
    got = all_docs(paths)
    assert collections.Counter(got) == collections.Counter(expected)
    assert max(map(len, got)) <= 5_000
    c4 = [json.loads(line)["text"].strip() for line in open(src_dir / "c4_demo.jsonl")]
    assert all(t in got for t in c4 if len(t) <= 5_000)

    # Layout: one text column, zstd, full row groups except at the end, val has >= 8 row groups.
    source = dataset.read_source(out)
    assert source["source"] == "import" and source["docs"] == len(got)
    rg = source["row_group_size"]
    for p in paths:
        md = pq.ParquetFile(p).metadata
        assert md.schema.names == ["text"] and md.row_group(0).column(0).compression == "ZSTD"
        assert all(md.row_group(i).num_rows == rg for i in range(md.num_row_groups - 1))
    assert open_shard(paths[-1]).num_row_groups >= 8
    assert len(read_row_group(paths[-1], 0)) == rg
    assert not [f for f in os.listdir(out) if not f.endswith((".parquet", ".json"))]  # no temp leftovers

    # Deterministic in the seed; a different seed shuffles differently.
    again = import_local(src_dir, shard_chars=300_000, doc_chars=5_000, data_dir=tmp_path / "again", progress=False)
    assert all_docs(again) == got
    other = import_local(src_dir, shard_chars=300_000, doc_chars=5_000, seed=7, data_dir=tmp_path / "seed7",
                         progress=False)
    assert all_docs(other) != got and sorted(all_docs(other)) == sorted(got)


def test_import_refuses_to_mix_unless_overwrite(tmp_path, src_dir, shared_data):
    out = tmp_path / "base_data"
    first = import_local(src_dir, data_dir=out, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        import_local(src_dir, data_dir=out, progress=False)
    with pytest.raises(DataError, match="into itself"):
        import_local(out, data_dir=out, overwrite=True, progress=False)
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(shared_data / "pretrain_text" / "nltk_gutenberg" / "blake-poems.txt", small)
    paths = import_local(small, data_dir=out, overwrite=True, shard_chars=10_000, doc_chars=1_000, progress=False)
    assert len(paths) > len(first)  # the old shards are gone, only the new ones are listed
    assert list_parquet_files(data_dir=out) == paths
    assert sorted(all_docs(paths)) == sorted(documents_from_file(str(small / "blake-poems.txt"), 1_000))


def test_import_several_folders(tmp_path, src_dir, shared_data, capsys):
    # Two folders are one corpus: their documents shuffled together, each file read once even when a
    # folder is named twice; a missing or empty folder is named in the error.
    more = tmp_path / "more"
    (more / "inner").mkdir(parents=True)
    os.symlink(shared_data / "pretrain_text" / "llamafactory_demo" / "wiki_demo.txt", more / "inner" / "wiki.txt")
    paths = import_local([src_dir, more, more / "inner"], doc_chars=5_000, data_dir=tmp_path / "out", progress=False)
    assert "5 files read (1 other files ignored)" in capsys.readouterr().out
    files = [f for f in sorted(src_dir.iterdir()) if f.suffix != ".md"] + [more / "inner" / "wiki.txt"]
    expected = [d for f in files for d in documents_from_file(str(f), 5_000)]
    assert collections.Counter(all_docs(paths)) == collections.Counter(expected)
    assert dataset.read_source(tmp_path / "out")["src_dirs"] == [os.path.realpath(d) for d in (src_dir, more, more / "inner")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no importable files under .*empty"):
        import_local([src_dir, tmp_path / "empty"], data_dir=tmp_path / "out2", progress=False)
    with pytest.raises(DataError, match="nowhere.* is not a directory"):
        import_local([src_dir, tmp_path / "nowhere"], data_dir=tmp_path / "out3", progress=False)
    with pytest.raises(DataError, match="no import source"):
        import_local([], data_dir=tmp_path / "out4", progress=False)


def test_import_reads_gz_and_parquet_and_names_bad_rows(tmp_path, shared_data):
    text = (shared_data / "pretrain_text" / "nltk_gutenberg" / "blake-poems.txt").read_text()
    rows = [json.loads(line)["text"] for line in open(shared_data / "pretrain_text" / "llamafactory_demo" / "c4_demo.jsonl")]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    with gzip.open(src / "blake.txt.gz", "wt") as f:
        f.write(text)
    with gzip.open(src / "sub" / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"content": r}) + "\n" for r in rows[:100])
    pq.write_table(pa.table({"text": rows[100:200], "url": ["u"] * 100}), src / "sub" / "b.parquet")
    paths = import_local(src, data_dir=tmp_path / "out", progress=False)
    got = all_docs(paths)
    assert sum(len(d) for d in got) >= 0.99 * (len(text.strip()) + sum(len(r.strip()) for r in rows[:200]))
    assert all(r.strip() in got for r in rows[:200] if len(r) <= 20_000)

    (src / "sub" / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        import_local(src, data_dir=tmp_path / "out2", progress=False)
    (src / "sub" / "bad.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no string 'text' or 'content'"):
        import_local(src, data_dir=tmp_path / "out3", progress=False)


# -----------------------------------------------------------------------------
# Listing, corrupt files, striding

def test_missing_and_single_shard_errors(tmp_path, base_dir, src_dir):
    with pytest.raises(DataError) as e:
        list_parquet_files("train")
    assert "download -n 8" in str(e.value) and "import DIR" in str(e.value)
    assert dataset.get_data_dir() == str(base_dir / "base_data")
    paths = import_local(src_dir, progress=False)
    assert len(paths) == 2
    os.remove(paths[0])
    assert list_parquet_files() == paths[1:]
    with pytest.raises(DataError, match="at least 2"):
        list_parquet_files("val")
    with pytest.raises(ValueError, match="split"):
        list_parquet_files("test")


@pytest.fixture
def shards(tmp_path, src_dir):
    out = tmp_path / "base_data"
    return out, import_local(src_dir, shard_chars=300_000, doc_chars=5_000, data_dir=out, progress=False)


def test_corrupt_and_truncated_shards_name_the_file(shards):
    out, paths = shards
    data = open(paths[0], "rb").read()
    open(paths[0], "wb").write(os.urandom(len(data)))
    open(paths[1], "wb").write(data[:len(data) // 2])
    for p in paths[:2]:
        with pytest.raises(DataError) as e:
            open_shard(p)
        assert p in str(e.value) and "delete it and download/import it again" in str(e.value)
    with pytest.raises(DataError, match="shard_00000.parquet"):
        next(parquets_iter_batched("train", data_dir=out))

    # A damaged row group in an otherwise fine file: the error names the file and the row group.
    md = pq.ParquetFile(paths[2]).metadata
    col = md.row_group(1).column(0)
    raw = bytearray(open(paths[2], "rb").read())
    raw[col.data_page_offset:col.data_page_offset + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    open(paths[2], "wb").write(bytes(raw))
    pf = open_shard(paths[2])
    assert read_row_group(pf, 0)
    with pytest.raises(DataError) as e:
        read_row_group(pf, 1)
    assert paths[2] in str(e.value) and "row group 1" in str(e.value)


def test_striding_covers_every_row_group_once(shards):
    out, paths = shards
    train = list_parquet_files("train", data_dir=out)
    groups = [(p, rg) for p in train for rg in range(open_shard(p).num_row_groups)]
    assert len(groups) > 10
    everything = [read_row_group(p, rg) for p, rg in groups]
    assert list(parquets_iter_batched("train", data_dir=out)) == everything
    for world in (2, 3, 5):
        per_rank = [list(parquets_iter_batched("train", start=r, step=world, data_dir=out)) for r in range(world)]
        expected = [[read_row_group(p, rg) for p, rg in groups if rg % world == r] for r in range(world)]
        assert per_rank == expected
        flat = sorted(doc for batches in per_rank for batch in batches for doc in batch)
        assert flat == sorted(doc for batch in everything for doc in batch)
    val = list(parquets_iter_batched("val", data_dir=out))
    assert sum(map(len, val)) == dataset.read_source(out)["val_docs"]


# -----------------------------------------------------------------------------
# Downloading from a local stand-in for the HuggingFace hub

REPO = "test/tiny-shards"


@pytest.fixture
def hub(tmp_path, shards, monkeypatch):
    """A LocalHTTPServer laid out like the hub: real shards under /datasets/<repo>/resolve/main/ and
    the tree API listing (two pages, linked by a Link header) with sizes and sha256 of each file."""
    _, paths = shards
    root = tmp_path / "www"
    files = root / "datasets" / REPO / "resolve" / "main"
    files.mkdir(parents=True)
    entries = []
    for p in paths:
        shutil.copy(p, files)
        blob = open(p, "rb").read()
        entries.append({"type": "file", "path": os.path.basename(p), "size": len(blob), "oid": "0" * 40,
                        "lfs": {"oid": hashlib.sha256(blob).hexdigest(), "size": len(blob), "pointerSize": 134}})
    entries.insert(0, {"type": "directory", "path": "docs", "oid": "0" * 40, "size": 0})
    monkeypatch.setitem(dataset.SOURCES, "tiny", {"repo": REPO, "max_shard": len(paths) - 1})
    with LocalHTTPServer(root) as srv:
        api = f"/api/datasets/{REPO}/tree/main"
        srv.routes[api] = Route(json.dumps(entries[:3]).encode(), headers={"Link": f'<{srv.url}{api}?cursor=2>; rel="next"'})
        srv.routes[api + "?cursor=2"] = Route(json.dumps(entries[3:]).encode())
        srv.files = files
        srv.val = len(paths) - 1
        yield srv


def fetch(srv, tmp_path, indices, **kw):
    kw.setdefault("retries", 3)
    return download_shards(indices, num_workers=2, source="tiny", base_url=srv.url, progress=False,
                           data_dir=tmp_path / "dl", backoff=0, **kw)


def shard_url_path(i):
    return f"/datasets/{REPO}/resolve/main/shard_{i:05d}.parquet"


def test_download_happy_path_verifies_sha256(hub, tmp_path, capsys):
    paths = fetch(hub, tmp_path, [0, 1])
    names = [os.path.basename(p) for p in paths]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", f"shard_{hub.val:05d}.parquet"]  # + val
    for p in paths:
        assert open(p, "rb").read() == (hub.files / os.path.basename(p)).read_bytes()
    assert "verifying size+sha256" in capsys.readouterr().out
    manifest = json.load(open(tmp_path / "dl" / "manifest_tiny.json"))["files"]
    assert len(manifest) == hub.val + 1 and "docs" not in manifest  # both pages, files only
    assert list_parquet_files("val", data_dir=tmp_path / "dl") == paths[-1:]

    # A second run fetches nothing (listing cached, shards present).
    n = len(hub.requests)
    assert fetch(hub, tmp_path, [0, 1]) == paths and len(hub.requests) == n

    # Same size, different bytes: caught by sha256 and never renamed into place.
    served = hub.files / "shard_00002.parquet"
    blob = bytearray(served.read_bytes())
    blob[100] ^= 0xFF
    served.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="shard_00002.parquet: .*sha256 mismatch"):
        fetch(hub, tmp_path, [2])
    assert not os.path.exists(tmp_path / "dl" / "shard_00002.parquet")


def test_download_resumes_a_partial_file(hub, tmp_path):
    full = (hub.files / "shard_00001.parquet").read_bytes()
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "shard_00001.parquet.partial").write_bytes(full[:len(full) // 3])
    fetch(hub, tmp_path, [1])
    assert [r.range for r in hub.requests_for(shard_url_path(1))] == [f"bytes={len(full) // 3}-"]
    assert (tmp_path / "dl" / "shard_00001.parquet").read_bytes() == full
    assert not (tmp_path / "dl" / "shard_00001.parquet.partial").exists()

    # A connection that dies mid-body is retried and ends byte-identical.
    hub.faults[shard_url_path(0)] = Fault(cut_after=len(full) // 2)
    fetch(hub, tmp_path, [0])
    assert len(hub.requests_for(shard_url_path(0))) == 2
    assert (tmp_path / "dl" / "shard_00000.parquet").read_bytes() == (hub.files / "shard_00000.parquet").read_bytes()


def test_download_retries_server_errors(hub, tmp_path):
    hub.faults[shard_url_path(0)] = Fault(fail_first=2)
    paths = fetch(hub, tmp_path, [0])
    assert len(hub.requests_for(shard_url_path(0))) == 3
    assert open(paths[0], "rb").read() == (hub.files / "shard_00000.parquet").read_bytes()


def test_download_wrong_size_fails_cleanly(hub, tmp_path):
    hub.faults[shard_url_path(1)] = Fault(size_delta=100)
    with pytest.raises(DataError) as e:
        fetch(hub, tmp_path, [0, 1])
    msg = str(e.value)
    assert "1 of 3 shards failed" in msg and "shard_00001.parquet" in msg and "!= expected" in msg
    assert len(hub.requests_for(shard_url_path(1))) == 3  # all retries used
    left = sorted(os.listdir(tmp_path / "dl"))
    assert "shard_00001.parquet" not in left and "shard_00001.parquet.partial" not in left
    assert "shard_00000.parquet" in left  # the others are kept


def test_download_404_fails_fast_and_val_is_required(hub, tmp_path):
    hub.faults[shard_url_path(hub.val)] = Fault(status=404)
    with pytest.raises(DataError, match="HTTP 404"):
        fetch(hub, tmp_path, [0, 1], retries=5)
    assert len(hub.requests_for(shard_url_path(hub.val))) == 1
    # Train shards arrived but the val shard did not: the split refuses to use a train shard as val.
    with pytest.raises(DataError, match="validation shard .* is missing"):
        list_parquet_files("train", data_dir=tmp_path / "dl")


def test_download_without_listing_checks_length_and_footer(hub, tmp_path, capsys):
    api = f"/api/datasets/{REPO}/tree/main"
    hub.routes[api] = Route(b"rate limited", status=500)
    garbage = os.urandom(5000)
    (hub.files / "shard_00001.parquet").write_bytes(garbage)
    with pytest.raises(DataError) as e:
        fetch(hub, tmp_path, [0, 1])
    out = capsys.readouterr().out
    assert "could not fetch the file listing" in out and "Content-Length+parquet footer" in out
    assert "shard_00001.parquet: downloaded file is not valid parquet" in str(e.value)
    left = os.listdir(tmp_path / "dl")
    assert "shard_00001.parquet" not in left and "shard_00000.parquet" in left
    assert not (tmp_path / "dl" / "manifest_tiny.json").exists()


def test_download_offline_and_mixing_errors(hub, tmp_path, shards):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DataError, match="cannot reach the HuggingFace hub"):
        download_shards([0], source="tiny", base_url=dead, data_dir=tmp_path / "dl", backoff=0, progress=False)
    out, _ = shards  # imported shards: a download must not mix into them
    with pytest.raises(DataError, match="mix datasets"):
        download_shards([0], source="tiny", base_url=hub.url, data_dir=out, backoff=0, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        fetch(hub, tmp_path, [hub.val + 1])


# -----------------------------------------------------------------------------
# CLI

def test_cli(base_dir, src_dir, capsys):
    with pytest.raises(DataError, match="no importable files"):
        dataset.main(["import", str(base_dir)])
    with pytest.raises(SystemExit) as e:  # as `python -m nanochat.dataset` runs it: one line, exit status 1
        run_cli(lambda: dataset.main(["import", str(base_dir)]))
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: no importable files")
    dataset.main(["import", str(src_dir), "--shard-chars", "300000", "--val-fraction", "0.1"])
    assert len(list_parquet_files()) >= 2
    dataset.main(["import", str(src_dir), str(src_dir), "--overwrite"])  # several folders; a repeat is read once
    assert "4 files read" in capsys.readouterr().out
    with pytest.raises(DataError, match="--overwrite"):
        dataset.main(["import", str(src_dir)])
    capsys.readouterr()
    dataset.main(["info"])
    out = capsys.readouterr().out
    assert "source=import" in out and " val " in out and "Total:" in out
    for cmd in (["--help"], ["download", "--help"], ["import", "--help"], ["info", "--help"]):
        with pytest.raises(SystemExit) as e:
            dataset.main(cmd)
        assert e.value.code == 0
    helptext = capsys.readouterr().out
    assert "--num-workers" in helptext and "--val-fraction" in helptext and "--overwrite" in helptext


def test_local_http_server_ranges_and_faults(http_server):
    import requests
    blob = os.urandom(1000)
    (http_server.root / "f.bin").write_bytes(blob)
    url = http_server.url + "/f.bin"
    r = requests.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == blob[10:20] and r.headers["Content-Range"] == "bytes 10-19/1000"
    assert requests.get(url, headers={"Range": "bytes=-5"}).content == blob[-5:]
    assert requests.get(url, headers={"Range": "bytes=990-"}).content == blob[990:]
    assert requests.get(url, headers={"Range": "bytes=1000-"}).status_code == 416
    assert requests.get(http_server.url + "/missing").status_code == 404
    assert requests.get(http_server.url + "/../etc/passwd").status_code == 404
    http_server.faults["/f.bin"] = Fault(fail_first=1, fail_status=503, size_delta=-10)
    assert requests.get(url).status_code == 503
    assert requests.get(url).content == blob[:-10]
    assert [r.range for r in http_server.requests_for("/f.bin")][:3] == ["bytes=10-19", "bytes=-5", "bytes=990-"]


def test_cli_download_uses_endpoint_from_env(hub, base_dir, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HF_ENDPOINT", hub.url)
    dataset.main(["download", "-n", "1", "--source", "tiny", "-w", "1"])
    assert [os.path.basename(p) for p in list_parquet_files()] == ["shard_00000.parquet", f"shard_{hub.val:05d}.parquet"]
    assert "Downloaded 2/2 shards" in capsys.readouterr().out
    hub.faults[shard_url_path(1)] = Fault(status=404)
    with pytest.raises(DataError) as e:
        dataset.main(["download", "-n", "2", "--source", "tiny"])
    assert "1 of 3 shards failed" in str(e.value) and "shard_00001.parquet: " in str(e.value)
