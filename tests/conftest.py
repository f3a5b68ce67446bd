"""Shared pytest fixtures: where the real test data lives, and a throwaway base dir per test."""

import os
import pathlib

import pytest

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
