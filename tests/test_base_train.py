"""scripts/base_train.py end to end on the tiny real pipeline: the report, exact resume after SIGKILL,
Ctrl-C saving, atomic checkpoints under a kill mid-save, the dry-run plan, and clear errors on bad input."""

import os
import sys
import json
import time
import signal
import subprocess

import pytest
import torch

from tests.conftest import REPO, TINY_TRAIN_ARGS

ARGS = [a for a in TINY_TRAIN_ARGS if not a.startswith(("--num-iterations", "--eval-every"))] + ["--eval-every=-1"]


def run_train(base, *extra, check=True, timeout=600):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DTYPE": "float32"}
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", *ARGS, *extra], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"base_train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def report(base):
    with open(base / "report" / "base_train.json") as f:
        return json.load(f)


def test_report_has_the_promised_fields(tiny_base):
    r = report(tiny_base)  # written by the fixture's real run
    for key in ("val_bpb", "tok_per_sec", "mfu", "step", "total_training_time", "total_training_flops", "dtype",
                "depth", "num_params", "losses", "val_bpb_history"):
        assert key in r, key
    assert r["step"] == len(r["losses"]) == 60
    bpbs = [b for _, b in r["val_bpb_history"]]
    assert bpbs[-1] < bpbs[0]  # validation bits per byte falls during training
    assert r["tok_per_sec"] > 0 and 0 < r["mfu"] < 1


def test_exact_resume_after_sigkill(tiny_base):
    straight = run_train(tiny_base, "--num-iterations=24", "--model-tag=straight")
    assert straight.returncode == 0
    want = report(tiny_base)["losses"]
    # Same run, killed with SIGKILL after its step-8 checkpoint, then resumed.
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_base), "NANOCHAT_DTYPE": "float32"}
    cmd = [sys.executable, "-m", "scripts.base_train", *ARGS, "--num-iterations=24", "--model-tag=killed",
           "--save-every=8", "--keep-checkpoints=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tiny_base / "base_checkpoints" / "killed" / "meta_000008.json"
    deadline = time.time() + 300
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert meta.exists()
    assert not (tiny_base / "base_checkpoints" / "killed" / "meta_000024.json").exists(), "finished before the kill"
    run_train(tiny_base, "--num-iterations=24", "--model-tag=killed", "--save-every=8", "--resume")
    got = report(tiny_base)["losses"]
    assert got == want  # fp32 on CPU: bit-identical per-step losses


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tiny_base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_base), "NANOCHAT_DTYPE": "float32"}
    cmd = [sys.executable, "-m", "scripts.base_train", *ARGS, "--num-iterations=100000", "--model-tag=ctrlc"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 00003/"):
            break
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    from nanochat.checkpoint import list_steps
    steps = list_steps(tiny_base / "base_checkpoints" / "ctrlc")
    assert steps and steps[-1] >= 3
    assert f"SIGINT: saving step {steps[-1]} so --resume can continue from it" in out, out[-2000:]


KILL_MID_SAVE = r"""
import os, signal, torch
import nanochat.checkpoint as ck
ck.save_checkpoint(CKPT, 1, {"model_config": {}}, model_state={"w": torch.ones(3)}, rank=0, world_size=1)
real = ck.atomic_write_bytes
def dying_write(path, data):
    # write half of the file where a non-atomic writer would, then die as if the power went out
    with open(path + ".tmpdead", "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
ck.atomic_write_bytes = dying_write
ck.save_checkpoint(CKPT, 2, {"model_config": {}}, model_state={"w": torch.full((1000,), 2.0)}, rank=0, world_size=1)
"""


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    p = subprocess.run([sys.executable, "-c", KILL_MID_SAVE.replace("CKPT", repr(str(ckpt)))], cwd=REPO,
                       capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL
    from nanochat.checkpoint import list_steps, load_checkpoint
    assert list_steps(ckpt) == [1]
    state, meta, _, _ = load_checkpoint(ckpt, 1)
    assert torch.equal(state["w"], torch.ones(3)) and meta["step"] == 1


def test_truncated_checkpoint_file_is_a_clear_error(tmp_path):
    from nanochat.checkpoint import save_checkpoint, load_checkpoint, CheckpointError
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, 5, {"model_config": {}}, model_state={"w": torch.ones(1000)})
    path = ckpt / "model_000005.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model_000005.pt is corrupt or truncated"):
        load_checkpoint(ckpt, 5)


def test_dry_run_plan():
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth=24", "--target-param-data-ratio=8",
                        "--dry-run", "--gpus=8"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NANOCHAT_BASE_DIR": "/nonexistent-nanochat-test"})
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout.strip().splitlines()[-1])
    assert plan["total_batch_size"] == 2 ** 20
    assert plan["model_config"]["n_embd"] == 1536 and plan["model_config"]["n_head"] == 12
    assert 1e19 < plan["total_flops"] < 1e20
    assert 0.5 < plan["estimate"]["hours"] < 10 and plan["estimate"]["cost_usd"] > 0
    assert abs(plan["tokens_per_param"] - 8) < 0.5


@pytest.mark.parametrize("flags,message", [
    (["--depth=0"], "--depth 0: must be >= 1"),
    (["--total-batch-size=2000"], "is not a multiple of --max-seq-len 128"),
    (["--total-batch-size=3072", "--device-batch-size=16"], "does not divide into micro-batches"),
])
def test_bad_flags_are_clear_errors(tiny_base, flags, message):
    p = run_train(tiny_base, "--num-iterations=2", *flags, check=False)
    assert p.returncode != 0 and message in (p.stdout + p.stderr)
    assert "Traceback" not in p.stderr


def test_missing_tokenizer_is_a_clear_error(base_dir):
    p = run_train(base_dir, "--num-iterations=2", check=False)
    assert p.returncode != 0 and "python -m scripts.tok_train" in (p.stdout + p.stderr)
    assert "Traceback" not in p.stderr


def test_corrupt_shard_is_a_clear_error(tiny_base):
    shards = sorted((tiny_base / "base_data").glob("shard_*.parquet"))
    shards[0].write_bytes(b"this is not a parquet file" * 100)
    p = run_train(tiny_base, "--num-iterations=2", check=False)
    assert p.returncode != 0
    assert shards[0].name in (p.stdout + p.stderr) and "delete it" in (p.stdout + p.stderr)
    assert "Traceback" not in p.stderr


def test_checkpoint_from_another_tokenizer_is_refused(tiny_base):
    from nanochat.checkpoint import load_model, CheckpointError
    from scripts import tok_train
    tok_train.main(["--max-chars=1000000", "--vocab-size=2048", "--doc-cap=3000"])  # a different tokenizer
    with pytest.raises(CheckpointError, match="different tokenizer"):
        load_model("base", "cpu")
