"""
Run a snippet of Python in a separate, locked-down process and report what happened. Two callers:
the inference engine (the model's `<|python_start|> ... <|python_end|>` tool blocks, shown back to
the model via ExecutionResult.summary()) and HumanEval scoring (did the program exit cleanly).

    result = execute_code("print(sum(range(10)))")          # ExecutionResult(success=True, stdout="45\n", ...)
    execute_code("'strawberry'.count('r')", repl_mode=True)  # stdout "3\n", like the Python REPL

How the child is isolated (each layer is used when the machine allows it; the kernel layers are what
actually hold, the Python layer catches the ordinary cases everywhere):
  * a fresh interpreter (`python -I -B`, a new session/process group, never a fork of the caller), so
    it is safe to call from any thread; the wall-clock timeout is enforced by the parent, which kills
    the whole process group -- no SIGALRM, which only works on the main thread
  * rlimits: address space + data (memory), CPU seconds, file size, no core files
  * environment scrubbed to a minimal PATH, stdin closed, cwd = a fresh temp dir deleted afterwards
  * stdout/stderr read incrementally with a byte cap, so a child printing gigabytes costs the parent
    a bounded amount of memory
  * Linux: a new network namespace (inside a new user namespace when unprivileged users may create
    one), so there is no usable network interface at all
  * Linux >= 5.13: Landlock -- writes only beneath the temp dir, reads only from the Python install,
    system library dirs, the temp dir and a few harmless files (so no ~/.ssh, no other processes'
    /proc entries), no execve; on newer kernels also no TCP bind/connect and no signals to processes
    outside the sandbox
  * Linux x86-64/aarch64: a seccomp filter refusing fork/vfork/clone-without-CLONE_THREAD and execve,
    so no new process can exist (threads still work); where seccomp is unavailable, RLIMIT_NPROC=0
    instead (effective for non-root users only, and it also forbids threads)
  * everywhere: a `sys.addaudithook` hook (hooks cannot be removed from Python) that refuses sockets,
    process creation, signals, importing ctypes (and other raw native-memory modules), gc object
    enumeration, writes/renames/removals outside the temp dir, symlink creation and reads of other
    processes' /proc entries

What this does NOT protect against -- it is not a security boundary against a determined attacker:
  * native code and Python-level tricks: the audit hook only sees what Python reports to it -- a
    file opened through `dir_fd` is checked against the wrong directory, an extension module such as
    _ctypes loaded by hand through importlib slips past the import check, and native code then does
    as it likes; C extensions and interpreter bugs run with the caller's user id on the same kernel.
    On machines without Landlock/seccomp/namespaces (macOS, old kernels, some containers) only the
    audit hook and rlimits remain, so this is exactly what is left
  * the kernel is shared: kernel bugs, CPU side channels, and resource exhaustion that rlimits do
    not cover (total disk use in the temp dir is limited per file, not in total; many threads)
  * everything a same-user process may read is readable where Landlock is unavailable
For untrusted, multi-tenant use (a public web UI, an API served to strangers), run the whole server
or this function inside a container or VM with its own user, filesystem and network.

Linux and macOS only (needs POSIX process groups and the `resource` module).
"""

import os
import sys
import json
import math
import time
import shutil
import signal
import selectors
import tempfile
import subprocess
from dataclasses import dataclass

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY_LIMIT = 256 * 2**20
DEFAULT_MAX_OUTPUT = 64 * 1024
MIN_MEMORY_LIMIT = 32 * 2**20  # a bare interpreter with the sandbox set up already maps ~17 MiB
USER_FILE = "main.py"          # the code is written here (in the temp dir) so tracebacks can show source lines
CHILD_FLAG = "--sandbox-child"
_TAIL_BYTES = 4096             # past the output cap we still keep the end (where the exception is)
_READ_CHUNK = 65536


@dataclass
class ExecutionResult:
    success: bool            # exited with status 0, within the time limit
    stdout: str
    stderr: str
    error: str | None        # short and human readable: "timeout after 5.0s", the last exception line, ...
    timeout: bool            # killed for exceeding the wall-clock (or CPU-time) limit
    memory_exceeded: bool    # the memory limit was hit (MemoryError)
    output_truncated: bool = False  # stdout or stderr was longer than max_output_bytes; the middle was dropped
    protections: tuple[str, ...] = ()  # isolation layers the child managed to switch on, e.g. ("rlimits", "netns", ...)

    def summary(self) -> str:
        """The text shown to the model as tool output: stdout, plus "Error: ..." if the run failed."""
        out = self.stdout.rstrip("\n")
        if self.success:
            return out
        err = f"Error: {self.error or 'execution failed'}"
        return f"{out}\n{err}" if out.strip() else err

    def __str__(self):
        return self.summary()


def execute_code(code: str, timeout: float = DEFAULT_TIMEOUT, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT, *, repl_mode: bool = False) -> ExecutionResult:
    """Run `code` in a fresh, isolated Python process and return what it printed and how it ended.

    timeout: wall-clock seconds before the process group is killed (CPU time is capped a bit above it).
    memory_limit_bytes: address-space limit of the child; exceeding it shows up as memory_exceeded.
    max_output_bytes: at most this much of stdout and of stderr is kept (beginning and end); the rest
        is read and discarded, and output_truncated is set.
    repl_mode: if the last statement is an expression, print its repr like the interactive
        interpreter does (`'strawberry'.count('r')` prints 3). Used for the model's tool calls.

    Safe to call from any thread and concurrently. Not a security boundary against a determined
    attacker: see the module docstring for what is and is not isolated, and run untrusted
    multi-tenant workloads in a container or VM.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    if not (isinstance(memory_limit_bytes, int) and memory_limit_bytes >= MIN_MEMORY_LIMIT):
        raise ValueError(f"memory_limit_bytes={memory_limit_bytes!r} is too small: the interpreter itself needs "
                         f"about 20 MiB, pass at least {MIN_MEMORY_LIMIT} (32 MiB)")
    if not (isinstance(max_output_bytes, int) and max_output_bytes > 0):
        raise ValueError(f"max_output_bytes={max_output_bytes!r} must be a positive int")
    if os.name != "posix":
        raise RuntimeError("execute_code needs Linux or macOS (POSIX process groups and rlimits); "
                           "on Windows run nanochat under WSL or in a Linux container")
    if not sys.executable:
        raise RuntimeError("sys.executable is empty, so no fresh Python interpreter can be started for the sandbox")

    sandbox_dir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    proc = None
    status_r = status_w = -1
    try:
        # backslashreplace: a lone surrogate (which UTF-8 cannot hold) becomes its \uXXXX escape,
        # which inside a string literal -- the only place it can legally appear -- means the same thing
        with open(os.path.join(sandbox_dir, USER_FILE), "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(code)
        # A separate pipe on which the child reports which layers it switched on; it is closed before
        # the user code starts, so the code cannot forge the report.
        status_r, status_w = os.pipe()
        config = {"timeout": float(timeout), "memory_limit": memory_limit_bytes, "repl_mode": bool(repl_mode),
                  "status_fd": status_w}
        cmd = [sys.executable, "-I", "-B", "-X", "utf8", os.path.abspath(__file__), CHILD_FLAG, json.dumps(config)]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=sandbox_dir, env=_child_env(sandbox_dir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                                close_fds=True, start_new_session=True)
        os.close(status_w)
        status_w = -1
        out, err, status = _Capture(max_output_bytes), _Capture(max_output_bytes), _Capture(4096)
        timed_out = _collect(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status},
                             deadline=start + timeout)
    finally:
        if proc is not None:
            if proc.returncode is None:  # timed out, or we are unwinding from an exception: take it all down
                _kill_group(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        _remove_tree(sandbox_dir)

    return _make_result(proc.returncode, out, err, status, timed_out, timeout, memory_limit_bytes)


# -----------------------------------------------------------------------------
# Parent side

def _child_env(sandbox_dir):
    """A minimal environment: nothing of the caller's (API keys, tokens) reaches the child."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": sandbox_dir,
        "TMPDIR": sandbox_dir,  # tempfile.* in the child lands in the writable dir
        "LANG": "C.UTF-8",
        # one thread per math library, and few malloc arenas: each arena reserves 64 MiB of address
        # space, which would eat the RLIMIT_AS budget for nothing
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
    }


class _Capture:
    """Keeps the first (limit - tail) bytes and the last `tail` bytes of a stream; memory stays bounded."""

    def __init__(self, limit):
        self.tail_keep = min(_TAIL_BYTES, limit // 4)
        self.head_keep = limit - self.tail_keep
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, chunk):
        self.total += len(chunk)
        room = self.head_keep - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk and self.tail_keep:
            self.tail = (self.tail + chunk[-self.tail_keep:])[-self.tail_keep:]

    @property
    def truncated(self):
        return self.total > self.head_keep + self.tail_keep

    def text(self):
        head = self.head.decode("utf-8", errors="replace")
        tail = self.tail.decode("utf-8", errors="replace")
        if not self.truncated:
            return head + tail
        dropped = self.total - len(self.head) - len(self.tail)
        return f"{head}\n... [{dropped} bytes of output truncated] ...\n{tail}"


def _collect(proc, captures, deadline):
    """Drain the child's pipes until they close and it exits, or until the deadline. True on timeout."""
    timed_out = False
    with selectors.DefaultSelector() as sel:
        for fd in captures:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, _READ_CHUNK)
                if chunk:
                    captures[key.fd].add(chunk)
                else:
                    sel.unregister(key.fd)
        if not timed_out:
            try:  # the pipes are closed; the child may still be running (it closed them itself)
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            _kill_group(proc)
            proc.wait()
            # whatever it printed before being killed is still in the pipe; every writer is dead now,
            # so this ends at EOF (the 1 s guard only matters if some stray process kept a pipe open)
            while sel.get_map():
                ready = sel.select(1.0)
                if not ready:
                    break
                for key, _ in ready:
                    chunk = os.read(key.fd, _READ_CHUNK)
                    if chunk:
                        captures[key.fd].add(chunk)
                    else:
                        sel.unregister(key.fd)
    return timed_out


def _kill_group(proc):
    # The child leads its own session (start_new_session), so its pid is also its process group id.
    # Only called before the child is reaped, so the pid cannot have been reused.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.kill()
    except OSError:
        pass


def _remove_tree(path):
    # The code may have chmod-ed directories to 0; give them back to the owner so rmtree can empty them.
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
                except OSError:
                    pass
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _last_error_line(stderr_text):
    """The last top-level line of stderr: for a traceback that is "ValueError: message"."""
    for line in reversed(stderr_text.splitlines()):
        if line.strip() and not line[0].isspace() and not line.startswith("... ["):
            return line.strip()[:500]
    return None


def _make_result(returncode, out, err, status, timed_out, timeout, memory_limit):
    stdout, stderr = out.text(), err.text()
    try:
        protections = tuple(json.loads(status.text()).get("protections", ()))
    except ValueError:
        protections = ()
    last = _last_error_line(stderr)
    memory_exceeded = False
    cpu_killed = returncode == -signal.SIGXCPU and not timed_out
    if timed_out:
        error = f"timeout after {float(timeout)!r}s"
    elif cpu_killed:
        # RLIMIT_CPU fired first: several threads burning CPU in parallel outrun the wall clock
        timed_out, error = True, f"CPU time limit of {_cpu_limit(timeout)}s exceeded"
    elif last is not None and ("MemoryError" in last or "Cannot allocate memory" in last):
        memory_exceeded, error = True, f"memory limit {memory_limit / 2**20:g} MiB exceeded"
    elif returncode == 0:
        error = None
    elif returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        error = f"killed by signal {name}"
    else:
        error = last or f"exited with status {returncode}"
    return ExecutionResult(success=returncode == 0 and not timed_out, stdout=stdout, stderr=stderr, error=error,
                           timeout=timed_out, memory_exceeded=memory_exceeded,
                           output_truncated=out.truncated or err.truncated, protections=protections)


def _cpu_limit(timeout):
    return math.ceil(timeout) + 1


# -----------------------------------------------------------------------------
# Child side: runs inside the fresh interpreter, `python -I -B <this file> --sandbox-child <json>`.
# Order matters: rlimits, then kernel layers (which use ctypes), then the audit hook (which forbids
# ctypes), then the user code.

def _child_main(config_json):
    import ast, types, traceback, resource  # noqa: F401  (imported before the memory limit is set)
    cfg = json.loads(config_json)
    sandbox_dir = os.path.realpath(os.getcwd())
    with open(USER_FILE, encoding="utf-8") as f:
        source = f.read()

    protections = []
    _set_rlimits(resource, cfg["timeout"], cfg["memory_limit"])
    protections.append("rlimits")
    no_spawn = False
    if sys.platform.startswith("linux"):
        layers = _linux_kernel_layers(sandbox_dir)
        protections += layers
        no_spawn = "seccomp" in layers
    if not no_spawn:
        # fallback: no new processes (or threads) for this uid; root is exempt, which is why seccomp comes first
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
            protections.append("rlimit-nproc")
        except (ValueError, OSError, AttributeError):
            pass
    # ctypes was only needed to set up the kernel layers: forget it, and refuse to import it again
    # (its memmove/cast/from_address reach arbitrary memory without any audit event)
    for name in [m for m in sys.modules if m.split(".")[0] in _BLOCKED_MODULES]:
        del sys.modules[name]
    _install_audit_hook(sandbox_dir)
    protections.append("audit-hook")
    os.write(cfg["status_fd"], json.dumps({"protections": protections}).encode())
    os.close(cfg["status_fd"])

    # line buffering so that what was printed before a timeout kill is not lost in a buffer
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    sys.argv = [USER_FILE]
    _run_user_code(source, cfg["repl_mode"])


def _set_rlimits(resource, timeout, memory_limit):
    cpu = _cpu_limit(timeout)
    limits = [("RLIMIT_AS", memory_limit), ("RLIMIT_DATA", memory_limit), ("RLIMIT_FSIZE", memory_limit),
              ("RLIMIT_CORE", 0), ("RLIMIT_CPU", (cpu, cpu + 1))]
    for name, value in limits:
        soft, hard = value if isinstance(value, tuple) else (value, value)
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError, AttributeError):
            pass  # e.g. macOS rejects RLIMIT_AS; the other layers still apply
    # a write past RLIMIT_FSIZE should raise OSError(EFBIG) in the code, not kill it with SIGXFSZ
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _linux_kernel_layers(sandbox_dir):
    """Network namespace, no_new_privs, Landlock, seccomp; each is skipped if the kernel refuses it."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return []
    layers = []
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    # A new user namespace lets unprivileged users create the network namespace; as root it also
    # drops every capability the child had over the rest of the system. Plain CLONE_NEWNET is the
    # fallback for root where user namespaces are disabled.
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        layers.append("netns")
    elif libc.unshare(CLONE_NEWNET) == 0:
        layers.append("netns")
    PR_SET_NO_NEW_PRIVS = 38  # required for unprivileged Landlock and seccomp
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        return layers
    machine = os.uname().machine.lower()
    try:
        abi = _landlock(ctypes, libc, machine, sandbox_dir)
        if abi:
            layers.append(f"landlock-abi{abi}")
    except OSError:
        pass
    try:
        if _seccomp_no_processes(ctypes, libc, machine):
            layers.append("seccomp")
    except OSError:
        pass
    return layers


# Landlock filesystem rights (linux/landlock.h) and the ABI version that introduced them
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_ABI1_ALL = (1 << 13) - 1        # EXECUTE .. MAKE_SYM
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15   # ABI 2, 3, 5
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV
_LL_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}  # create_ruleset, add_rule, restrict_self


def _read_roots():
    """What the child may still read under Landlock: the Python install and the system's shared files."""
    dirs = ["/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc/ssl",
            "/proc/self", "/sys/devices/system/cpu",
            sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)), *sys.path]
    files = ["/etc/localtime", "/etc/timezone", "/etc/ld.so.cache", "/etc/passwd", "/etc/group",
             "/etc/nsswitch.conf", "/etc/os-release", "/etc/mime.types", "/dev/zero", "/dev/urandom",
             "/dev/random", "/proc/meminfo", "/proc/cpuinfo", "/proc/stat"]
    return [p for p in dirs + files if p]


def _landlock(ctypes, libc, machine, sandbox_dir):
    """Restrict this process: write only beneath sandbox_dir, read only the roots above, execute nothing.
    Returns the Landlock ABI version used, or 0 if Landlock is unavailable."""
    if machine not in _LL_SYSCALLS:
        return 0
    sys_create, sys_add, sys_restrict = _LL_SYSCALLS[machine]
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(sys_create), None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # 1 = get version
    if abi < 1:
        return 0
    fs = _LL_ABI1_ALL | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0) \
        | (_LL_IOCTL_DEV if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0      # BIND_TCP | CONNECT_TCP handled, no port allowed
    scoped = 0b11 if abi >= 6 else 0   # abstract unix sockets and signals only within the sandbox
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(ctypes.c_long(sys_create), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return False  # missing on this system
        try:
            if not os.path.isdir(path):
                access &= _LL_FILE_RIGHTS  # directory-only rights on a file are rejected (EINVAL)
            rule = PathBeneath(access & fs, fd)
            return libc.syscall(ctypes.c_long(sys_add), ctypes.c_int(ruleset), ctypes.c_int(1),  # PATH_BENEATH
                                ctypes.byref(rule), ctypes.c_uint32(0)) == 0
        finally:
            os.close(fd)

    try:
        if not allow(sandbox_dir, fs):
            return 0  # without this rule the code could not even write its own files; skip the layer
        for root in _read_roots():
            allow(root, _LL_READ_FILE | _LL_READ_DIR)
        allow("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE)
        if libc.syscall(ctypes.c_long(sys_restrict), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return 0
    finally:
        os.close(ruleset)
    return abi


def _seccomp_no_processes(ctypes, libc, machine):
    """A seccomp-BPF filter: fork, vfork, execve, execveat and clone without CLONE_THREAD fail with EPERM
    (threads still work). clone3 answers ENOSYS so that glibc falls back to clone, whose flags -- unlike
    clone3's, which sit behind a pointer -- the filter can inspect."""
    tables = {
        "x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone": 56, "clone3": 435}),
        "aarch64": (0xC00000B7, {"execve": 221, "execveat": 281, "clone": 220, "clone3": 435}),
    }
    if machine not in tables:
        return False
    arch, nr = tables[machine]
    LD_W_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    EPERM, ENOSYS, CLONE_THREAD = 1, 38, 0x00010000
    prog, labels = [], {}
    emit = lambda code, k, jt=0, jf=0: prog.append([code, jt, jf, k])  # noqa: E731
    emit(LD_W_ABS, 4)                        # seccomp_data.arch
    emit(JEQ, arch, 0, "enosys")             # foreign syscall ABI (e.g. i386 on x86-64): refuse everything
    emit(LD_W_ABS, 0)                        # seccomp_data.nr
    if machine == "x86_64":
        emit(JGE, 0x40000000, "enosys", 0)   # the x32 ABI numbers, which would dodge the checks below
    for name in ("fork", "vfork", "execve", "execveat"):
        if name in nr:
            emit(JEQ, nr[name], "eperm", 0)
    emit(JEQ, nr["clone3"], "enosys", 0)
    emit(JEQ, nr["clone"], 0, "allow")
    emit(LD_W_ABS, 16)                       # low 32 bits of args[0] = clone flags (little-endian)
    emit(JSET, CLONE_THREAD, "allow", "eperm")
    labels["allow"] = len(prog); emit(RET, ALLOW)          # noqa: E702
    labels["eperm"] = len(prog); emit(RET, ERRNO | EPERM)  # noqa: E702
    labels["enosys"] = len(prog); emit(RET, ERRNO | ENOSYS)  # noqa: E702

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))()
    for i, (code, jt, jf, k) in enumerate(prog):
        # jump targets are relative to the next instruction
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        filters[i] = SockFilter(code, jt, jf, k)
    fprog = SockFprog(len(prog), filters)
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    return libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


# audit event -> ((index of a path argument, index of its dir_fd argument or None), ...)
_PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "os.chflags": ((0, None),), "os.lchflags": ((0, None),),
}
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn",
                           "os.spawn", "os.startfile"})
_SIGNAL_EVENTS = frozenset({"os.kill", "os.killpg", "signal.pthread_kill"})
_NATIVE_EVENTS = frozenset({"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
                            "ctypes.cdata", "ctypes.string_at", "ctypes.wstring_at",
                            "sqlite3.enable_load_extension", "sqlite3.load_extension"})
# modules that give raw access to native memory or calls; importing them raises ImportError, which
# libraries with an optional ctypes dependency (numpy, for one) already handle
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_ctypes_test", "cffi", "_cffi_backend", "_testcapi",
                              "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testsinglephase",
                              "_testimportmultiple", "_xxtestfuzz", "_xxsubinterpreters"})
# gc enumeration is the one way to reach the hook function itself (and its captured state)
_INTROSPECTION_EVENTS = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames"})
_NETWORK_EVENTS = frozenset({"urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect",
                             "poplib.connect", "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open",
                             "webbrowser.open"})


def _install_audit_hook(sandbox_dir):
    """Refuse, at the Python level, what the sandbox forbids. Everything the hook uses is bound now
    (builtins, C functions from `posix`), so code that later monkeypatches os, os.path or builtins
    cannot change its decisions. Paths are normalized lexically; that is sound because symlink
    creation is refused, so nothing inside the sandbox dir can point outside it."""
    import posix
    hook = _make_audit_hook(sandbox_dir, posix.getcwd, posix.readlink, posix.fspath, posix.getpid(),
                            sys.getfilesystemencoding(),
                            os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                            isinstance, type, str, bytes, int, PermissionError, ImportError)
    sys.addaudithook(hook)


def _make_audit_hook(sandbox_dir, getcwd, readlink, fspath, own_pid, fs_encoding, write_flags,
                     isinstance, type, str, bytes, int, PermissionError, ImportError):
    # (builtins are parameters on purpose: the hook's closure must not look them up at call time)
    prefix = sandbox_dir.rstrip("/") + "/"
    own_proc = f"/proc/{own_pid}/"
    # a private copy: the module-level dict is reachable from user code through frame globals
    path_events, spawn, signals = dict(_PATH_EVENTS), _SPAWN_EVENTS, _SIGNAL_EVENTS
    native, introspection, network = _NATIVE_EVENTS, _INTROSPECTION_EVENTS, _NETWORK_EVENTS
    blocked_modules = _BLOCKED_MODULES

    def normalize(path, dir_fd):
        if isinstance(path, bytes):
            path = path.decode(fs_encoding, "surrogateescape")
        if not isinstance(path, str):
            raise PermissionError(f"unsupported path object in the sandbox: {type(path).__name__}")
        if not path.startswith("/"):
            base = getcwd() if dir_fd is None or dir_fd < 0 else readlink(f"/proc/self/fd/{dir_fd}")
            path = base + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def check_write(path, dir_fd=None):
        if isinstance(path, int) and type(path) is not bool:
            return  # an already open descriptor; its opening was checked
        full = normalize(path, dir_fd)
        if not (full + "/").startswith(prefix):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {full!r}")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = (flags or 0) & write_flags or (isinstance(mode, str) and (
                "w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if writing:
                if normalize(path, None) != "/dev/null":
                    check_write(path)
            else:
                full = normalize(path, None)
                if full.startswith("/proc/") and full[6:7].isdigit() and not (full + "/").startswith(own_proc):
                    raise PermissionError(f"reading other processes' /proc entries is disabled: {full!r}")
        elif event == "import":
            if isinstance(args[0], str) and args[0].split(".")[0] in blocked_modules:
                raise ImportError(f"module {args[0]!r} is disabled in the sandbox (raw native access)")
        elif event in path_events:
            for path_index, fd_index in path_events[event]:
                check_write(args[path_index], None if fd_index is None else args[fd_index])
        elif event == "os.symlink":
            raise PermissionError("creating symlinks is disabled in the sandbox")
        elif event.startswith("socket.") or event in network:
            raise PermissionError("network access is disabled in the sandbox")
        elif event in spawn:
            raise PermissionError("starting processes is disabled in the sandbox")
        elif event in signals:
            raise PermissionError("sending signals is disabled in the sandbox")
        elif event in native:
            raise PermissionError("loading or calling native code is disabled in the sandbox")
        elif event in introspection:
            raise PermissionError(f"{event} is disabled in the sandbox")
        elif event == "sqlite3.connect":
            db = fspath(args[0])  # sqlite opens its files in C, past the "open" event
            if isinstance(db, bytes):
                db = db.decode(fs_encoding, "surrogateescape")
            if db not in (":memory:", ""):
                if db.startswith("file:"):
                    raise PermissionError("sqlite URI filenames are disabled in the sandbox")
                check_write(db)

    return hook


def _run_user_code(source, repl_mode):
    import ast, types, traceback
    try:
        tree = ast.parse(source, USER_FILE)
    except (SyntaxError, ValueError) as e:  # ValueError: source contains null bytes
        sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
        sys.exit(1)
    last_expr = None
    if repl_mode and tree.body and isinstance(tree.body[-1], ast.Expr):
        last_expr = ast.Expression(tree.body.pop().value)
    main = types.ModuleType("__main__")  # fresh globals; pickle etc. find user classes in __main__
    main.__file__ = USER_FILE
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    try:
        exec(compile(tree, USER_FILE, "exec"), main.__dict__)
        if last_expr is not None:
            sys.displayhook(eval(compile(last_expr, USER_FILE, "eval"), main.__dict__))
    except SystemExit:
        raise
    except BaseException as e:
        # drop this function's frame so the traceback starts in the user's code
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.stderr.flush()
        sys.exit(1)


# -----------------------------------------------------------------------------

def _cli():
    import argparse
    parser = argparse.ArgumentParser(prog="python -m nanochat.execution",
                                     description="Run Python code in the nanochat sandbox and print the result "
                                                 "and which isolation layers were active.")
    parser.add_argument("path", nargs="?", help="file with the code to run ('-' = stdin); or use --code")
    parser.add_argument("-c", "--code", help="the code to run, as a string")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"wall-clock limit in seconds (default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_LIMIT // 2**20,
                        help=f"memory limit in MiB (default: {DEFAULT_MEMORY_LIMIT // 2**20})")
    parser.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT,
                        help=f"keep at most this many bytes of stdout and of stderr (default: {DEFAULT_MAX_OUTPUT})")
    parser.add_argument("--repl", action="store_true",
                        help="print the value of a final expression, like the interactive interpreter")
    args = parser.parse_args()
    if (args.code is None) == (args.path is None):
        parser.error("give exactly one of: a file path (or '-') or --code")
    if args.code is not None:
        code = args.code
    elif args.path == "-":
        code = sys.stdin.read()
    else:
        try:
            with open(args.path, encoding="utf-8") as f:
                code = f.read()
        except OSError as e:
            raise SystemExit(f"cannot read {args.path}: {e.strerror}")
    try:
        r = execute_code(code, timeout=args.timeout, memory_limit_bytes=args.memory_mb * 2**20,
                         max_output_bytes=args.max_output_bytes, repl_mode=args.repl)
    except ValueError as e:
        raise SystemExit(str(e))
    print(r.summary())
    if r.stderr and r.success:
        sys.stderr.write(r.stderr)
    print(f"[sandbox] success={r.success} timeout={r.timeout} memory_exceeded={r.memory_exceeded} "
          f"output_truncated={r.output_truncated} protections={','.join(r.protections) or 'none'}", file=sys.stderr)
    sys.exit(0 if r.success else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD_FLAG]:
        _child_main(sys.argv[2])
    else:
        _cli()
