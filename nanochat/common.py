"""
Shared plumbing used by every script: where files live, which device and dtype to compute in,
torchrun/process-group setup, rank-0 printing, seeding, a resilient file downloader, and the
peak-FLOPs figure that MFU is measured against.
"""

import os
import re
import sys
import json
import time
import random
import hashlib
import functools
import threading
import datetime
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


# Errors the user can fix

class UserError(Exception):
    """A problem with the user's input, data or files, whose message says what to do. Entry points
    print it without a traceback (see run_cli)."""


def run_cli(main):
    """Run a script's main(): a UserError becomes a one-line 'error: ...' on stderr and exit status 1;
    Ctrl-C, once a training loop has saved what it could, exit status 130 (the shell's convention)."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        raise SystemExit(130)


# Files

def get_base_dir(create=True):
    """Everything a run writes lives here (tokenizer, shards, checkpoints, reports). create=False for
    paths that are only read, so that a look (--dry-run, --help) leaves nothing behind."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    if create:
        os.makedirs(base, exist_ok=True)
    return base


def atomic_write_bytes(path, data: bytes):
    """Write via temp file + fsync + rename, so a crash never leaves a half-written file behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


def git_info():
    """Commit and dirty flag of the checkout this code runs from (for reports and checkpoint meta)."""
    here = os.path.dirname(os.path.abspath(__file__))
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        except Exception:
            return ""
    commit = run("rev-parse", "--short", "HEAD")
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit or "unknown", "dirty": dirty}


def get_local_data_dir():
    """Optional folder of local copies of the public datasets (laid out like ../shared/data):
    pretraining text, eval bundles, chat datasets, tiktoken files. Set NANOCHAT_LOCAL_DATA to use it
    instead of downloading; None means "download the real sources"."""
    path = os.environ.get("NANOCHAT_LOCAL_DATA")
    if path and not os.path.isdir(path):
        raise UserError(f"NANOCHAT_LOCAL_DATA={path!r} is not a directory")
    return path or None


# Logging

def get_dist_info():
    """(is_distributed, rank, local_rank, world_size) from the torchrun environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_master():
    return get_dist_info()[1] == 0


def print0(*args, **kwargs):
    """print() on rank 0 only, flushed so logs interleave sensibly under torchrun."""
    if is_master():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


class DummyWandb:
    """Stands in for a wandb run when logging is off (the default): every call is a no-op."""
    def log(self, *args, **kwargs): pass

    def finish(self): pass


def init_wandb(run_name, project, config):
    """wandb is optional: only used when --run is given something other than 'dummy', on rank 0."""
    if run_name == "dummy" or not is_master():
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise UserError("--run was set but wandb is not installed: pip install wandb (or drop --run)")
    return wandb.init(project=project, name=run_name, config=config)


# Device and dtype

def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_bf16_flags():
    """Which of the CPU's bf16 matmul extensions are present (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return []
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    flags = set(m.group(1).split()) if m else set()
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def parse_dtype(name):
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: use one of bfloat16, float16, float32")
    return _DTYPE_NAMES[name]


def autodetect_dtype(device_type):
    """The compute dtype for matmuls and activations, and why. Master weights stay fp32 regardless."""
    env = os.environ.get("NANOCHAT_DTYPE")
    if env:
        try:
            return parse_dtype(env), f"NANOCHAT_DTYPE={env}"
        except ValueError as e:
            raise UserError(f"NANOCHAT_DTYPE: {e}")
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16, f"CUDA SM{major}{minor} has native bf16"
        return torch.float32, f"CUDA SM{major}{minor} lacks fast bf16 (set NANOCHAT_DTYPE=float16 to try fp16)"
    if device_type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return torch.bfloat16, f"CPU has {'+'.join(flags)}: bf16 matmuls are several times faster than fp32"
        return torch.float32, "CPU has neither AMX nor AVX512-BF16: bf16 would be emulated and slow"
    return torch.float32, f"{device_type}: fp32 by default (NANOCHAT_DTYPE=bfloat16 works on recent macOS)"


@dataclass
class Runtime:
    """What compute_init() sets up: the process's place in the job and where/how it computes."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    device_type: str
    dtype: torch.dtype
    dtype_reason: str

    @property
    def master(self):
        return self.rank == 0


def tune_cpu_allocator():
    """Make glibc malloc keep freed memory instead of returning it to the OS. By default every allocation
    above 32 MiB is a fresh mmap, paying a page fault per 4 KiB on first touch: about 10x the arithmetic
    done on it on CPU (a 64 MiB bf16->fp32 copy: 24 ms fresh vs 2 ms into reused memory, measured here).
    With mmap off and no trimming, the step's big temporaries reuse the same pages; peak RSS stays at
    the high-water mark, which training needs anyway."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 40))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def compute_init(device_type="", seed=42):
    """Pick device and dtype, seed, and join the torchrun process group if launched by torchrun.

    NCCL on CUDA, gloo on CPU. The process-group timeout (NANOCHAT_DIST_TIMEOUT seconds, default 600)
    bounds how long surviving ranks wait in a collective when a peer dies, so a crash ends the job
    instead of hanging it forever.
    """
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device-type {device_type!r} is not one of cuda, mps, cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but torch sees no CUDA device")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type mps was asked for but MPS is not available")
    ddp, rank, local_rank, world_size = get_dist_info()
    seed_everything(seed)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left over
    if ddp and device_type == "mps":
        raise UserError("torchrun with MPS is not supported: run a single process on Apple silicon")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if device_type == "cpu":
        tune_cpu_allocator()
        # Several ranks on one CPU must split its cores rather than oversubscribe them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if "OMP_NUM_THREADS" not in os.environ or local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if ddp and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("NANOCHAT_DIST_TIMEOUT", "600")))
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        dist.barrier()
    dtype, reason = autodetect_dtype(device_type)
    return Runtime(ddp, rank, local_rank, world_size, device, device_type, dtype, reason)


class PeakRSS:
    """Samples this process's resident memory in a thread (ru_maxrss never goes down between runs)."""

    def __init__(self, interval=0.02):
        import psutil
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def compute_cleanup(barrier=True):
    """End the process group. The barrier first makes every rank finish its last collective before any
    rank tears its side down: gloo's worker threads can still hold a finished op (and its tensors) for a
    moment after wait() returns, and a process that exits under them dies with SIGABRT ("terminate called
    without an active exception"). Pass barrier=False when leaving on an error or Ctrl-C, where a peer may
    never arrive."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


# Peak FLOPs for MFU

# Dense bf16 tensor-core peaks from vendor datasheets (no sparsity). Matched by substring, first wins.
GPU_PEAK_BF16_FLOPS = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200 NVL", 836e12), ("H200", 989e12),
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("A10G", 125e12), ("A10", 125e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("RTX 5090", 209.5e12), ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12), ("RTX A6000", 155e12), ("MI300X", 1.3074e15), ("MI250X", 383e12),
]


@functools.cache  # once per process: a figure cached on disk, if measured while busy, would be wrong forever
def measure_cpu_matmul_peak(dtype, n=1024, seconds=1.0):
    """Best sustained FLOP/s of an n x n matmul in `dtype` on this CPU, timed for about `seconds`."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def get_peak_flops(device_type, dtype):
    """(peak FLOP/s per device, how it was obtained). GPUs: the datasheet table. CPUs: a matmul peak in
    `dtype`, measured (about a second)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16_FLOPS:
            if key in name:
                return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s bf16 datasheet peak"
        return float("inf"), f"{name}: unknown peak (MFU shown as 0; add it to GPU_PEAK_BF16_FLOPS)"
    if device_type == "cpu":
        flops = measure_cpu_matmul_peak(dtype)
        dname = str(dtype).removeprefix("torch.")
        return flops, (f"CPU {dname} 1024x1024 matmul peak measured now on {torch.get_num_threads()} threads: "
                       f"{flops / 1e9:.0f} GFLOP/s")
    return float("inf"), f"{device_type}: no peak known (MFU shown as 0)"


# Downloads

class DownloadError(UserError, RuntimeError):
    pass


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url, path, expected_size=None, sha256=None, retries=5, timeout=30, progress=True,
                  backoff=2.0):
    """Download url to path: resumable (HTTP Range on a .partial file), retried with exponential
    backoff, verified by size and optional sha256, renamed into place only when complete.
    A file already at `path` that passes verification is kept. Returns path.

    Client errors (404, 403, ...) fail at once: retrying will not fix a wrong address.
    """
    import requests
    from tqdm import tqdm

    def verified(p):
        if expected_size is not None and os.path.getsize(p) != expected_size:
            return f"size {os.path.getsize(p)} != expected {expected_size}"
        if sha256 is not None and sha256_file(p) != sha256:
            return "sha256 mismatch"
        return None

    if os.path.exists(path) and verified(path) is None:
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    last_err = None
    for attempt in range(1, retries + 1):
        try:
            have = os.path.getsize(partial) if os.path.exists(partial) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
                if r.status_code == 416:  # our partial already holds everything (or is bogus): restart
                    os.remove(partial)
                    raise DownloadError("server refused the resume range; restarting")
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    raise DownloadError(f"HTTP {r.status_code} for {url}: not retrying a client error")
                r.raise_for_status()
                if r.status_code == 200 and have:  # server ignored Range: start over
                    have = 0
                mode = "ab" if have else "wb"
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else expected_size
                bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=os.path.basename(path), disable=not progress, leave=False)
                with open(partial, mode) as f, bar:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                got = os.path.getsize(partial)
                if length is not None and got != total:
                    raise DownloadError(f"connection ended early: {got} of {total} bytes")
            problem = verified(partial)
            if problem:
                os.remove(partial)  # corrupt: the next attempt starts from zero
                raise DownloadError(f"downloaded file failed verification: {problem}")
            os.replace(partial, path)
            return path
        except DownloadError as e:
            last_err = e
            if "client error" in str(e):
                break
        except Exception as e:  # network errors, HTTP 5xx, timeouts
            last_err = e
        if attempt < retries:
            time.sleep(backoff ** attempt if backoff > 0 else 0)
    raise DownloadError(f"failed to download {url} after {attempt} attempt(s): {last_err}")


# Stage summaries

def report_dir():
    """report/ under the base dir: one <stage>.json per stage run, and report.md."""
    path = os.path.join(get_base_dir(), "report")
    os.makedirs(path, exist_ok=True)
    return path


def write_report_json(stage, data):
    """Every stage ends by writing report/<stage>.json under the base dir (rank 0 only); report.md is
    assembled from these files alone. Adds timestamp, git commit and the command line."""
    if not is_master():
        return None
    path = os.path.join(report_dir(), f"{stage}.json")
    payload = {"stage": stage, "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
               "git": git_info(), "command": " ".join(sys.argv), **data}
    atomic_write_json(path, payload)
    return path
