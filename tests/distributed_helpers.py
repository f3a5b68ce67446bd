"""
Helpers for the distributed tests: launching real torchrun jobs (gloo on CPU) of the training scripts,
reading their losses back, and a small optimizer scenario that runs the same MuonAdamW steps on one
process or sharded across torchrun ranks (this file is then the ranks' program) so the results can be
compared.
"""

import os
import sys
import json
import socket
import datetime
import subprocess

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(base_dir, **extra):
    """Environment for a training subprocess: its own base dir, exact fp32 math, one thread per rank
    (2 ranks share this machine's cores), no warnings spam."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DTYPE": "float32",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun_cmd(module, args, nproc=2, nnodes=1, node_rank=None, endpoint=None):
    """`python -m torch.distributed.run ... -m <module> -- <args>`: single node (standalone, a free port
    picked by torchrun) unless an endpoint is given, then a c10d rendezvous for nnodes nodes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if endpoint is None:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}", "--rdzv-id=nanochat-test", "--max-restarts=0"]
    return cmd + ["-m", module, "--", *args]


def single_cmd(module, args):
    return [sys.executable, "-m", module, *args]


def run(cmd, env, timeout=600):
    """Run to completion; fail with the tail of the log if the exit code is not 0."""
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-4000:]}")
    return p.stdout


def report(base_dir, stage="base_train"):
    with open(os.path.join(base_dir, "report", f"{stage}.json")) as f:
        return json.load(f)


def max_rel_diff(a, b):
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def copy_step(src_dir, dst_dir, step):
    """Copy one complete checkpoint step (every file named in its meta) to a new tag directory, so a
    run can resume from that step although later ones exist."""
    import shutil
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(src_dir, f"meta_{step:06d}.json")) as f:
        meta = json.load(f)
    for name in meta["files"] + [f"meta_{step:06d}.json"]:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


# -----------------------------------------------------------------------------
# An optimizer scenario small enough to run in a second, shaped to hit every sharding case with 2 ranks:
# AdamW tensors that are row-sharded, too small to shard, and indivisible by the world size; Muon
# shape-groups with an even count, an odd count (one padding slot) and a single matrix (rank 1 owns only
# padding), wide and tall.

NUM_SOURCES = 2  # gradients come from 2 "ranks"; one process averages them, 2 ranks take one each


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (64, 32), "head": (96, 16), "scalars": (5,), "odd": (1025, 2),
              "attn0": (16, 32), "attn1": (16, 32), "attn2": (16, 32), "gate": (8, 8),
              "fc0": (32, 16), "fc1": (32, 16)}
    params = {n: torch.nn.Parameter(torch.randn(*s, generator=g) * 0.5) for n, s in shapes.items()}
    return params


def make_optimizer(params, rank, world_size):
    from nanochat.optim import MuonAdamW

    def adamw(names, lr, wd):
        return {"kind": "adamw", "params": [params[n] for n in names], "names": names, "lr": lr,
                "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": wd}

    def muon(names):
        return {"kind": "muon", "params": [params[n] for n in names], "names": names, "lr": 0.02,
                "momentum": 0.9, "weight_decay": 0.1}
    groups = [adamw(["emb", "head"], 0.01, 0.01), adamw(["scalars", "odd"], 0.05, 0.0),
              muon(["attn0", "attn1", "attn2"]), muon(["gate"]), muon(["fc0", "fc1"])]
    return MuonAdamW(groups, rank=rank, world_size=world_size, ortho_dtype=torch.float32)


def source_grad(params, step, source):
    g = torch.Generator().manual_seed(1000 * step + source)
    return {n: torch.randn(p.shape, generator=g) for n, p in params.items()}


def set_grads(params, step, rank, world_size):
    """Rank r of 2 takes source r's gradient; one process takes the mean of both (the same sum and
    division the sharded step performs, so the results agree to the last bit or nearly)."""
    if world_size == NUM_SOURCES:
        grads = source_grad(params, step, rank)
    else:
        a, b = (source_grad(params, step, s) for s in range(NUM_SOURCES))
        grads = {n: (a[n] + b[n]) / NUM_SOURCES for n in a}
    for n, p in params.items():
        p.grad = grads[n]


def _save(params, opt, rank, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.save(opt.shard_state_dict(), os.path.join(out_dir, f"shard_{rank}.pt"))
    with open(os.path.join(out_dir, f"state_bytes_{rank}.json"), "w") as f:
        json.dump(opt.state_bytes(), f)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in params.items()}, os.path.join(out_dir, "params.pt"))


def _job(rank, world_size, load_from, first_step, last_step, saves):
    saves = {int(k): v for k, v in saves.items()}  # JSON (the torchrun path) turns the keys into strings
    params = make_params()
    opt = make_optimizer(params, rank, world_size)
    if load_from:
        saved = torch.load(os.path.join(load_from, "params.pt"))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        shards = [torch.load(os.path.join(load_from, name)) for name in sorted(os.listdir(load_from))
                  if name.startswith("shard_")]
        opt.load_shard_state_dicts(shards)
    for step in range(first_step, last_step):
        set_grads(params, step, rank, world_size)
        opt.step()
        if step + 1 in saves:
            _save(params, opt, rank, saves[step + 1])


def optim_scenario(rank, world_size, jobs):
    """Run jobs on this rank of `world_size` (1 = no process group; more = launched by torchrun). A job is
    (load_from, first_step, last_step, {after step: directory}): optionally start from the params and
    the optimizer shards (of any world size) saved in load_from, run steps [first_step, last_step), and
    after the given steps save the params (rank 0), this rank's shard and its state bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; several threads per rank only fight over the cores
    if world_size > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        for job in jobs:
            _job(rank, world_size, *job)
    finally:
        torch.set_num_threads(threads)


def run_optim_scenario(world_size, jobs):
    """optim_scenario in this process (world size 1) or on `world_size` gloo ranks under torchrun (a
    subprocess that leaves nothing behind, unlike multiprocessing's resource tracker)."""
    if world_size == 1:
        optim_scenario(0, 1, jobs)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "tests.distributed_helpers", json.dumps(jobs)]
        run(cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def load_result(out_dir):
    """(params, shards, state bytes per rank) saved by a job."""
    names = sorted(os.listdir(out_dir))
    shards = [torch.load(os.path.join(out_dir, n)) for n in names if n.startswith("shard_")]
    nbytes = []
    for n in names:
        if n.startswith("state_bytes_"):
            with open(os.path.join(out_dir, n)) as f:
                nbytes.append(json.load(f))
    return torch.load(os.path.join(out_dir, "params.pt")), shards, nbytes


if __name__ == "__main__":  # a rank of run_optim_scenario under torchrun
    optim_scenario(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), json.loads(sys.argv[1]))
    # Every result is on disk now. gloo's teardown (destroy_process_group, then the interpreter's exit)
    # can abort a rank with SIGABRT ("terminate called without an active exception") after all of that:
    # 5 runs in 10 under a CPU hog with no barrier, and still now and then behind one. What is tested
    # here is the optimizer, so the ranks meet once more and leave without running that teardown.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
