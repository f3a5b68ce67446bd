"""
Distributed training on CPU with gloo, world size 2: the sharded optimizer step equals the single-process
step; torchrun training gives the same losses as one process with the same total batch; optimizer state
is split across ranks; checkpoints resume across world sizes (2 -> 1, 1 -> 2); a two-"node" c10d
rendezvous on 127.0.0.1 completes and trains like one node; a rank that freezes or dies makes the
others fail (within the process-group timeout, or at once) and leaves the last checkpoint loadable.

Every multi-rank launch is a real `python -m torch.distributed.run`, with fp32 math
(NANOCHAT_DTYPE=float32) so the comparisons can be tight.
"""

import os
import time
import signal
import subprocess

import pytest

from tests.distributed_helpers import (run_optim_scenario, load_result, make_params, make_optimizer, job_env,
                                       torchrun_cmd, single_cmd, run, report, max_rel_diff, copy_step, free_port, REPO)

# -----------------------------------------------------------------------------
# Unit level: MuonAdamW sharded over 2 gloo ranks


def test_sharded_optimizer_matches_single_process_and_reshards(tmp_path):
    """Steps on 2 ranks equal steps on one process (which runs here without any process group, so a
    collective on the single-process path would raise), and optimizer state saved on 2 ranks continues
    on 1 and vice versa."""
    d = {k: str(tmp_path / k) for k in ("s3", "s5", "t3", "t5", "s3_t5", "t3_s5")}
    # one process: steps 0-4 (saving after 3 and 5)
    run_optim_scenario(1, [(None, 0, 5, {3: d["s3"], 5: d["s5"]})])
    # two ranks: the same 5 steps, then steps 3-4 again starting from the single-process state (1 -> 2)
    run_optim_scenario(2, [(None, 0, 5, {3: d["t3"], 5: d["t5"]}), (d["s3"], 3, 5, {5: d["s3_t5"]})])
    # one process resuming the two-rank state (2 -> 1)
    run_optim_scenario(1, [(d["t3"], 3, 5, {5: d["t3_s5"]})])

    ref, ref_shards, ref_bytes = load_result(d["s5"])
    for other in ("t5", "s3_t5", "t3_s5"):
        params, _, _ = load_result(d[other])
        for name in ref:
            diff = (params[name] - ref[name]).abs().max().item()
            assert diff <= 1e-6, f"{other}: parameter {name} differs from the single-process run by {diff}"

    # the sharded run really is sharded: each rank holds a part, together about the single total
    _, shards, two_bytes = load_result(d["t5"])
    assert len(shards) == 2 and [s["rank"] for s in shards] == [0, 1]
    assert shards[0]["adamw"]["emb"]["exp_avg"].shape == (32, 32)  # rows 0-31 of 64
    assert shards[0]["adamw"]["odd"]["exp_avg"].shape == (1025, 2)  # 1025 rows: replicated
    assert shards[0]["muon"]["attn0"]["momentum_buffer"].shape[0] == 2  # 3 matrices: 2 + 1 (+1 padding)
    assert shards[1]["muon"]["attn0"]["momentum_buffer"].shape[0] == 1
    assert "gate" not in shards[1]["muon"]  # rank 1 owns only the padding slot of a 1-matrix group
    # together the ranks hold the single-process state once, plus a copy of the replicated AdamW moments
    opt = make_optimizer(make_params(), 0, 2)
    replicated = sum(2 * 4 * p.numel() for g in opt.param_groups if g["kind"] == "adamw" for p in g["params"]
                     if not opt._adamw_sharded(p))
    print(f"\noptimizer state bytes: single process {ref_bytes[0]:,}; 2 ranks {two_bytes} "
          f"({replicated:,} bytes of small or indivisible AdamW tensors replicated)")
    assert sum(two_bytes) == ref_bytes[0] + replicated
    assert max(two_bytes) < 0.7 * ref_bytes[0]


def test_optimizer_shards_of_another_model_are_refused(tmp_path):
    import torch
    from tests.distributed_helpers import set_grads
    params = make_params()
    opt = make_optimizer(params, 0, 1)
    set_grads(params, 0, 0, 1)
    opt.step()
    shard = opt.shard_state_dict()
    with pytest.raises(ValueError, match="ranks 0..1"):  # a shard missing
        make_optimizer(make_params(), 0, 1).load_shard_state_dicts([{**shard, "world_size": 2}])
    other = make_params()
    other["emb"] = torch.nn.Parameter(torch.zeros(32, 32))
    with pytest.raises(ValueError, match="different model"):
        make_optimizer(other, 0, 1).load_shard_state_dicts([shard])
    shard["muon"]["attn0"]["count"] = 4
    with pytest.raises(ValueError, match="different model"):
        make_optimizer(make_params(), 0, 1).load_shard_state_dicts([shard])


# -----------------------------------------------------------------------------
# base_train under torchrun: d2, 64-token rows, 1,024-token global batch (4 micro-batches of 4 rows on
# one process, 2 per rank on two). Learning rates are raised so 20 steps move the loss well away from
# its start (7.6 -> ~6), which makes any difference between the runs visible.

TRAIN = ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=1024", "--num-iterations=20",
         "--warmup-steps=5", "--eval-every=-1", "--eval-tokens=1024", "--sample-every=-1", "--compile=off",
         # 1K-token batches: the LRs are scaled by base_train's floor of 0.5, so these train at matrix 0.0177,
         # embedding 0.265 (x the width factor), ... fast enough to learn in 20 steps and not chaotic.
         "--matrix-lr=0.0354", "--embedding-lr=0.53", "--unembedding-lr=0.01414", "--scalar-lr=0.442", "--weight-decay=0.001"]
REL_TOL = 1e-5  # fp32; the runs differ only in the order gradients are summed


def train(base, nproc, tag, extra=()):
    """(report/base_train.json, log) of a run on one plain process or on nproc torchrun ranks."""
    args = [*TRAIN, f"--model-tag={tag}", *extra]
    cmd = single_cmd("scripts.base_train", args) if nproc == 1 else torchrun_cmd("scripts.base_train", args, nproc)
    log = run(cmd, job_env(base))
    rep = report(base)
    assert rep["model_tag"] == tag, "the run did not write its report"
    return rep, log


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """The same 20-step run on one process and on 2 ranks, each checkpointed at steps 10 and 20."""
    import shutil
    base = tmp_path_factory.mktemp("dist") / "base"
    shutil.copytree(tiny_run, base)
    one, _ = train(base, 1, "one", ["--save-every=10"])
    two, log = train(base, 2, "two", ["--save-every=10"])
    return {"base": base, "one": one, "two": two, "two_log": log}


def test_two_ranks_give_the_same_losses_as_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 20
    diff = max_rel_diff(two["losses"], one["losses"])
    print(f"\nlosses, 1 process: {[round(x, 6) for x in one['losses']]}")
    print(f"losses, 2 ranks:   {[round(x, 6) for x in two['losses']]}")
    print(f"max relative difference over 20 steps: {diff:.2e}; final val bpb {one['val_bpb']:.6f} vs {two['val_bpb']:.6f}")
    assert diff < REL_TOL
    assert one["losses"][-1] < one["losses"][0] - 1.0  # it really trained
    # evaluation reads the same validation rows whatever the world size
    assert abs(one["val_bpb"] - two["val_bpb"]) / one["val_bpb"] < REL_TOL


def test_optimizer_state_is_split_across_ranks(runs):
    single = runs["one"]["optimizer_state_bytes_per_rank"]
    per_rank = runs["two"]["optimizer_state_bytes_per_rank"]
    print(f"\noptimizer state bytes: 1 process {single}; 2 ranks {per_rank} "
          f"(largest rank / single = {max(per_rank) / single[0]:.4f})")
    assert "Optimizer state bytes per rank:" in runs["two_log"]
    assert len(single) == 1 and len(per_rank) == 2
    assert all(0.45 < b / single[0] < 0.55 for b in per_rank)


@pytest.mark.parametrize("saved_with,resume_with", [(2, 1), (1, 2)])
def test_resume_across_world_sizes(runs, saved_with, resume_with):
    """Resume the step-10 checkpoint of one run on a different number of ranks: steps 11-20 match."""
    base = runs["base"]
    src = {1: "one", 2: "two"}[saved_with]
    tag = f"resume_{saved_with}_to_{resume_with}"
    ckpt_root = os.path.join(str(base), "base_checkpoints")
    copy_step(os.path.join(ckpt_root, src), os.path.join(ckpt_root, tag), 10)
    resumed, log = train(base, resume_with, tag, ["--resume"])
    assert "Resumed from" in log and "step 10" in log
    ref = runs[src]
    diff = max_rel_diff(resumed["losses"][10:], ref["losses"][10:])
    print(f"\nsaved on {saved_with}, resumed on {resume_with}: steps 11-20 {[round(x, 6) for x in resumed['losses'][10:]]}")
    print(f"uninterrupted run:                 steps 11-20 {[round(x, 6) for x in ref['losses'][10:]]}")
    print(f"max relative difference {diff:.2e}")
    assert resumed["world_size"] == resume_with
    assert diff < REL_TOL


def test_two_nodes_on_localhost(runs, tmp_path):
    """Two torchrun invocations, one process each, meeting through a c10d rendezvous on 127.0.0.1: one job
    of world size 2 that trains exactly like the single-node run."""
    base = runs["base"]
    endpoint = f"127.0.0.1:{free_port()}"
    env = job_env(base)
    args = [*TRAIN, "--model-tag=twonode"]
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = []
    try:
        for r in (0, 1):
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(torchrun_cmd("scripts.base_train", args, nproc=1, nnodes=2, node_rank=r,
                                                           endpoint=endpoint),
                                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"node {r} exited with {p.returncode}\n{logs[r].read_text()[-4000:]}"
    rep = report(base)
    assert rep["model_tag"] == "twonode" and rep["world_size"] == 2
    diff = max_rel_diff(rep["losses"], runs["one"]["losses"])
    print(f"\ntwo nodes: 20 steps, final loss {rep['losses'][-1]:.6f}, max relative difference to 1 process {diff:.2e}")
    assert diff < REL_TOL


@pytest.mark.parametrize("fault", ["freeze", "kill"])
def test_failed_rank_ends_the_job_and_keeps_last_checkpoint(runs, monkeypatch, fault):
    """A two-"node" job (one torchrun per node, so the survivor's torchrun cannot see its peer) loses
    rank 1 right after the step-5 checkpoint: frozen (SIGSTOP: alive but silent, like a hung GPU or an
    unreachable node) or killed (SIGKILL). Rank 0 must fail on its own, on the process-group timeout
    (NANOCHAT_DIST_TIMEOUT) or at once on the closed connection, never wait forever; and the last
    complete checkpoint must load (model, every optimizer shard, every loader state)."""
    import threading
    import psutil
    from nanochat.checkpoint import list_steps, load_checkpoint
    timeout = 10
    base = runs["base"]
    tag = f"fault_{fault}"
    args = [*TRAIN, "--num-iterations=500", "--save-every=5", f"--model-tag={tag}"]  # the last value of a flag wins
    env = job_env(base, NANOCHAT_DIST_TIMEOUT=timeout)
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen(torchrun_cmd("scripts.base_train", args, nproc=1, nnodes=2, node_rank=r, endpoint=endpoint),
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for r in (0, 1)]
    lines, saved = [], threading.Event()

    def drain(agent):
        for line in agent.stdout:
            lines.append(line)
            if line.startswith("Saved checkpoint") and line.rstrip().endswith("step 5"):
                saved.set()
    drains = [threading.Thread(target=drain, args=(agent,), daemon=True) for agent in agents]
    for t in drains:
        t.start()
    workers = {}
    try:
        assert saved.wait(240), "no checkpoint at step 5:\n" + "".join(lines[-50:])
        for agent in agents:
            for child in psutil.Process(agent.pid).children(recursive=True):
                rank = child.environ().get("RANK")
                if rank is not None:
                    workers[int(rank)] = child
        assert sorted(workers) == [0, 1]
        os.kill(workers[1].pid, signal.SIGSTOP if fault == "freeze" else signal.SIGKILL)
        t0 = time.time()
        try:
            workers[0].wait(timeout + 60)  # not our child: psutil polls; the exit code is torchrun's to see
        except psutil.TimeoutExpired:
            pytest.fail(f"rank 0 still waiting {timeout + 60} s after rank 1 was lost (timeout {timeout} s)")
        waited = time.time() - t0
        print(f"\nrank 1 {'frozen' if fault == 'freeze' else 'killed'} after step 5; rank 0 failed and exited "
              f"{waited:.1f} s later (NANOCHAT_DIST_TIMEOUT={timeout})")
        assert waited < timeout + 30
    finally:
        for w in workers.values():  # SIGKILL also ends a stopped process
            if w.is_running():
                w.kill()
        for agent in agents:
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
    for t in drains:  # an exited agent can still have output in the pipe: read it all before looking
        t.join(30)
    log = "".join(lines)
    assert agents[0].returncode != 0 and agents[1].returncode != 0
    assert psutil.Process().children(recursive=True) == [], "a rank outlived its job"
    # gloo words a timeout two ways, depending on whether rank 0 was receiving or sending when it expired
    whys = ("timed out", "timeout caused pair closure") if fault == "freeze" else ("connection closed",)
    errors = [line.lower() for line in log.splitlines() if line.startswith("[rank0]") and "error" in line.lower()]
    assert any(why in e for e in errors for why in whys), "\n".join(errors) or log[-3000:]
    print("rank 0 said:", errors[-1] if errors else None)

    ckpt_dir = os.path.join(str(base), "base_checkpoints", tag)
    steps = list_steps(ckpt_dir)
    assert steps and steps[-1] >= 5
    model_state, meta, shards, loader_states = load_checkpoint(ckpt_dir, steps[-1], load_optimizer=True, load_loader=True)
    assert meta["world_size"] == 2 and len(shards) == 2 and len(loader_states) == 2
    # the saved state rebuilds a working single-process model, optimizer and loader
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.dataloader import DataLoader
    from nanochat.tokenizer import get_tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    model = build_model(GPTConfig(**meta["model_config"]), "cpu")
    model.load_state_dict(model_state)
    opt = model.setup_optimizer()
    opt.load_shard_state_dicts(shards)
    assert opt.state_bytes() > 0
    loader = DataLoader(get_tokenizer(), 4, 64, "train", rows_per_step=16, resume_states=loader_states)
    x, _ = next(loader)
    assert x.shape == (4, 64)
