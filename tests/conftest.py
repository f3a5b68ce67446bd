"""Shared pytest fixtures: where the real test data lives, and a throwaway base dir per test."""

import os
import pathlib

import pytest
import torch

from tests.httpserver import http_server  # noqa: F401 (a fixture: a local HTTP server serving real files)

REPO = pathlib.Path(__file__).resolve().parent.parent


def _shared_data_path():
    env = os.environ.get("NANOCHAT_LOCAL_DATA")
    return pathlib.Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """The folder of real public data (../shared/data beside the checkout, or $NANOCHAT_LOCAL_DATA).
    On a user's machine without it the test is skipped; in CI (env CI set) its absence is a failure."""
    path = _shared_data_path()
    if not path.is_dir():
        msg = f"real test data not found at {path} (set NANOCHAT_LOCAL_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """An empty NANOCHAT_BASE_DIR for one test, so tests never touch the user's ~/.cache/nanochat."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


# -----------------------------------------------------------------------------
# A tiny but real pipeline, built once per test session: shards imported from the real text in
# ../shared/data/pretrain_text, a small BPE tokenizer trained on them, and a depth-2 base model trained
# for a few dozen steps through scripts.base_train. Tests that need a model take `tiny_base` (a private
# copy of that base dir, set as NANOCHAT_BASE_DIR) so they can write freely without affecting others.

TINY_TRAIN_ARGS = ["--depth=2", "--max-seq-len=128", "--device-batch-size=8", "--total-batch-size=2048",
                   "--num-iterations=60", "--eval-every=30", "--eval-tokens=8192", "--sample-every=-1",
                   "--compile=off", "--warmup-steps=5"]


def _with_base_dir(path, fn):
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(path)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_run(shared_data, tmp_path_factory):
    """Path of a session-wide base dir holding shards, a tokenizer (vocab 2048) and a trained d2 base
    checkpoint (tag d2). Read-only: use `tiny_base` to get a writable copy."""
    base = tmp_path_factory.mktemp("tiny_run")

    def build():
        from nanochat.dataset import import_local
        from scripts import tok_train, base_train
        import_local(shared_data / "pretrain_text", doc_chars=2000, progress=False)
        tok_train.main(["--max-chars=3000000", "--vocab-size=2048"])
        base_train.main(TINY_TRAIN_ARGS)
    _with_base_dir(base, build)
    return base


@pytest.fixture
def tiny_base(tiny_run, tmp_path, monkeypatch):
    """A private, writable copy of the tiny pipeline's base dir, set as NANOCHAT_BASE_DIR."""
    import shutil
    dst = tmp_path / "base"
    shutil.copytree(tiny_run, dst)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(dst))
    return dst


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_run):
    """The tiny pipeline's trained tokenizer (vocab 2048)."""
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.load(str(tiny_run / "tokenizer"))


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models run fastest on one thread, and a second intra-op thread on a busy machine (CI, or
    other jobs on these 2 cores) makes every op wait for a descheduled peer: 10-50x slower. Modules of
    tiny-model tests take it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # compute_init() in the scripts leaves threads alone then
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def list_task(items, **view):
    """The conversations `items` as a Task (viewed through start/stop/step), like the datasets the
    batchers and mixtures hold."""
    from tasks.common import Task
    task = Task(**view)
    task.rows = list(items)
    return task
