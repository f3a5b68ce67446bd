"""
Run a snippet of Python in a separate, locked-down process and report what happened. Two callers: the
inference engine (the model's `<|python_start|> ... <|python_end|>` tool blocks, shown back to the model via
ExecutionResult.summary()) and HumanEval scoring (did the program exit cleanly).

    result = execute_code("print(sum(range(10)))")          # ExecutionResult(success=True, stdout="45\n", ...)
    execute_code("'strawberry'.count('r')", repl_mode=True)  # stdout "3\n", like the Python REPL
    python -m scripts.sandbox -c "print(1)"                  # from the shell, with the layers that held

Isolation, layer by layer (each where the machine allows it; the kernel layers are what hold, the Python layer
catches the ordinary cases everywhere):
  * a fresh interpreter (`python -I -B`, its own process group, never a fork of the caller), so it is safe
    from any thread: the parent enforces the wall clock by killing the group (no SIGALRM)
  * rlimits (memory, CPU seconds, file size, no core files); a minimal environment, stdin closed, cwd = a
    fresh temp dir deleted afterwards; output read incrementally with a byte cap
  * Linux: a new network namespace (inside a new user namespace where allowed): no network at all
  * Linux >= 5.13: Landlock -- writes only beneath the temp dir, reads only from the Python install, system
    library dirs and a few harmless files (no ~/.ssh, no other processes' /proc), no execve; on newer
    kernels also no TCP bind/connect and no signals to processes outside
  * Linux x86-64/aarch64: seccomp refuses fork/vfork/clone-without-CLONE_THREAD and execve (threads still
    work); without seccomp, RLIMIT_NPROC=0 (non-root users only; it also forbids threads)
  * everywhere: an audit hook (which Python cannot remove) refusing sockets, processes, signals, ctypes and
    other raw native-memory modules, gc enumeration, writes outside the temp dir, symlinks, and reads of
    other processes' /proc entries

It is NOT a security boundary against a determined attacker: the audit hook sees only what Python reports (a
file opened through `dir_fd` is checked against the wrong directory; _ctypes loaded by hand through importlib
slips past the import check, and native code then does as it likes); C extensions and kernel bugs, side
channels and what rlimits do not cover (total disk use, many threads) remain; where Landlock, seccomp and
namespaces are missing (macOS, old kernels, some containers) only the audit hook and rlimits are left. For
untrusted, multi-tenant use (a public web UI or API), run the server in a container or VM with its own user,
filesystem and network. Linux and macOS only (POSIX process groups, the `resource` module).
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
import contextlib
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

    __str__ = summary


def execute_code(code: str, timeout: float = DEFAULT_TIMEOUT, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT, *, repl_mode: bool = False) -> ExecutionResult:
    """Run `code` in a fresh, isolated Python process and return what it printed and how it ended.
    timeout: wall-clock seconds before the process group is killed (CPU time is capped a bit above it);
    memory_limit_bytes: the child's address-space limit; max_output_bytes: how much of stdout and of stderr
    is kept, beginning and end; repl_mode: print the repr of a final expression, as the interactive
    interpreter does (`'strawberry'.count('r')` prints 3), for the model's tool calls."""
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
    proc, status_r, status_w = None, -1, -1
    try:
        # backslashreplace: a lone surrogate (which UTF-8 cannot hold) becomes its \uXXXX escape,
        # which inside a string literal -- the only place it can legally appear -- means the same thing
        with open(os.path.join(sandbox_dir, USER_FILE), "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(code)
        # A separate pipe on which the child reports which layers it switched on; it is closed before
        # the user code starts, so the code cannot forge the report.
        status_r, status_w = os.pipe()
        config = json.dumps({"timeout": float(timeout), "memory_limit": memory_limit_bytes,
                             "repl_mode": bool(repl_mode), "status_fd": status_w})
        cmd = [sys.executable, "-I", "-B", "-X", "utf8", os.path.abspath(__file__), CHILD_FLAG, config]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=sandbox_dir, env=_child_env(sandbox_dir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                                close_fds=True, start_new_session=True)
        os.close(status_w)
        status_w = -1  # closed: the finally below must not close it again
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
    # Nothing of the caller's (API keys, tokens) reaches the child. TMPDIR: tempfile.* lands in the writable
    # dir. One thread per math library and few malloc arenas (each reserves 64 MiB of RLIMIT_AS).
    return {"PATH": "/usr/bin:/bin", "HOME": sandbox_dir, "TMPDIR": sandbox_dir, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


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
        head, tail = (b.decode("utf-8", errors="replace") for b in (self.head, self.tail))
        if not self.truncated:
            return head + tail
        return f"{head}\n... [{self.total - len(self.head) - len(self.tail)} bytes of output truncated] ...\n{tail}"


def _drain(sel, captures, deadline):
    """Read the registered pipes into their captures until all are closed (True) or the deadline."""
    while sel.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for key, _ in sel.select(remaining):
            chunk = os.read(key.fd, _READ_CHUNK)
            if chunk:
                captures[key.fd].add(chunk)
            else:
                sel.unregister(key.fd)
    return True


def _collect(proc, captures, deadline):
    """Drain the child's pipes until they close and it exits, or until the deadline. True on timeout."""
    with selectors.DefaultSelector() as sel:
        for fd in captures:
            sel.register(fd, selectors.EVENT_READ)
        timed_out = not _drain(sel, captures, deadline)
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
            _drain(sel, captures, time.monotonic() + 1.0)
    return timed_out


def _kill_group(proc):
    # The child leads its own session (start_new_session), so its pid is also its process group id.
    # Only called before the child is reaped, so the pid cannot have been reused.
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        with contextlib.suppress(OSError):
            kill()


def _remove_tree(path):
    # The code may have chmod-ed directories to 0; give them back to the owner so rmtree can empty them.
    def unlock(p):
        with contextlib.suppress(OSError):
            os.chmod(p, 0o700, follow_symlinks=False)
    unlock(path)
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            unlock(os.path.join(root, d))
    shutil.rmtree(path, ignore_errors=True)


def _make_result(returncode, out, err, status, timed_out, timeout, memory_limit):
    stdout, stderr = out.text(), err.text()
    try:
        protections = tuple(json.loads(status.text()).get("protections", ()))
    except ValueError:
        protections = ()
    # the last top-level line of stderr: for a traceback that is "ValueError: message"
    tops = [ln.strip() for ln in stderr.splitlines() if ln[:1].strip() and not ln.startswith("... [")]
    last = tops[-1][:500] if tops else None
    memory_exceeded = False
    if timed_out:
        error = f"timeout after {float(timeout)!r}s"
    elif returncode == -signal.SIGXCPU:
        # RLIMIT_CPU fired first: several threads burning CPU in parallel outrun the wall clock
        timed_out, error = True, f"CPU time limit of {_cpu_limit(timeout)}s exceeded"
    elif last is not None and ("MemoryError" in last or "Cannot allocate memory" in last):
        memory_exceeded, error = True, f"memory limit {memory_limit / 2**20:g} MiB exceeded"
    elif returncode == 0:
        error = None
    elif returncode == -signal.SIGINT and last == "KeyboardInterrupt":  # unhandled, it re-raises SIGINT
        error = last
    elif returncode < 0:
        error = f"killed by signal {next((s.name for s in signal.Signals if s == -returncode), -returncode)}"
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
    import ast, types, traceback, resource  # imported before the memory limit is set
    cfg = json.loads(config_json)
    sandbox_dir = os.path.realpath(os.getcwd())
    with open(USER_FILE, encoding="utf-8") as f:
        source = f.read()
    _set_rlimits(resource, cfg["timeout"], cfg["memory_limit"])
    protections = ["rlimits"]
    if sys.platform.startswith("linux"):
        protections += _linux_kernel_layers(sandbox_dir)
    if "seccomp" not in protections:
        # fallback: no new processes (or threads) for this uid; root is exempt, which is why seccomp comes first
        with contextlib.suppress(ValueError, OSError, AttributeError):
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
            protections.append("rlimit-nproc")
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
    # An exception (a SyntaxError included) leaves the interpreter with status 1, its traceback
    # starting at the user's own frames; the code's own sys.exit(n) sets the status as usual.
    sys.excepthook = lambda kind, exc, tb: traceback.print_exception(kind, exc, _user_frames(tb))
    tree = ast.parse(source, USER_FILE)
    last_expr = None
    if cfg["repl_mode"] and tree.body and isinstance(tree.body[-1], ast.Expr):
        last_expr = ast.Expression(tree.body.pop().value)
    main = types.ModuleType("__main__")  # fresh globals; pickle etc. find user classes in __main__
    main.__file__, main.__builtins__ = USER_FILE, __builtins__
    sys.modules["__main__"] = main
    exec(compile(tree, USER_FILE, "exec"), main.__dict__)
    if last_expr is not None:
        sys.displayhook(eval(compile(last_expr, USER_FILE, "eval"), main.__dict__))


def _user_frames(tb):
    """The traceback from the first frame of the user's code on (the sandbox's own frames dropped)."""
    while tb is not None and tb.tb_frame.f_code.co_filename != USER_FILE:
        tb = tb.tb_next
    return tb


def _set_rlimits(resource, timeout, memory_limit):
    m, cpu = memory_limit, _cpu_limit(timeout)
    for name, limits in [("RLIMIT_AS", (m, m)), ("RLIMIT_DATA", (m, m)), ("RLIMIT_FSIZE", (m, m)),
                         ("RLIMIT_CORE", (0, 0)), ("RLIMIT_CPU", (cpu, cpu + 1))]:
        with contextlib.suppress(ValueError, OSError, AttributeError):  # e.g. macOS rejects RLIMIT_AS
            resource.setrlimit(getattr(resource, name), limits)
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
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWNET) == 0:
        layers.append("netns")
    PR_SET_NO_NEW_PRIVS = 38  # required for unprivileged Landlock and seccomp
    if libc.prctl(PR_SET_NO_NEW_PRIVS, *(ctypes.c_ulong(a) for a in (1, 0, 0, 0))) != 0:
        return layers
    machine = os.uname().machine.lower()
    with contextlib.suppress(OSError):
        if abi := _landlock(ctypes, libc, machine, sandbox_dir):
            layers.append(f"landlock-abi{abi}")
    with contextlib.suppress(OSError):
        if _seccomp_no_processes(ctypes, libc, machine):
            layers.append("seccomp")
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
    fs = (_LL_ABI1_ALL | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
          | (_LL_IOCTL_DEV if abi >= 5 else 0))
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
    for i, (code, jt, jf, k) in enumerate(prog):  # jump targets are relative to the next instruction
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        filters[i] = SockFilter(code, jt, jf, k)
    fprog = SockFprog(len(prog), filters)
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    return libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


# audit event -> ((index of a path argument, index of its dir_fd argument or None), ...)
_PATH_EVENTS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
                "os.link": ((0, 2), (1, 3)), "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
                **dict.fromkeys(("os.truncate", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags"),
                                ((0, None),))}
# modules that give raw access to native memory or calls; importing them raises ImportError, which
# libraries with an optional ctypes dependency (numpy, for one) already handle
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_ctypes_test", "cffi", "_cffi_backend", "_testcapi",
                              "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testsinglephase",
                              "_testimportmultiple", "_xxtestfuzz", "_xxsubinterpreters"})
# audit event -> the message it is refused with (every "socket.*" event is refused too)
_REFUSED = {
    **dict.fromkeys(("subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn",
                     "os.spawn", "os.startfile"), "starting processes is disabled in the sandbox"),
    **dict.fromkeys(("os.kill", "os.killpg", "signal.pthread_kill"), "sending signals is disabled in the sandbox"),
    **dict.fromkeys(("ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
                     "ctypes.string_at", "ctypes.wstring_at", "sqlite3.enable_load_extension",
                     "sqlite3.load_extension"), "loading or calling native code is disabled in the sandbox"),
    # gc enumeration is the one way to reach the hook function itself (and its captured state)
    **{e: f"{e} is disabled in the sandbox"
       for e in ("gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames")},
    **dict.fromkeys(("urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "poplib.connect",
                     "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open", "webbrowser.open"),
                    "network access is disabled in the sandbox"),
    "os.symlink": "creating symlinks is disabled in the sandbox",
}


def _install_audit_hook(sandbox_dir, isinstance=isinstance, type=type, str=str, bytes=bytes, int=int,
                        PermissionError=PermissionError, ImportError=ImportError):
    """Refuse, at the Python level, what the sandbox forbids. Everything the hook uses is bound now
    (builtins as parameters, C functions from `posix`), so code that later monkeypatches os, os.path or
    builtins cannot change its decisions. Paths are normalized lexically; that is sound because
    symlink creation is refused, so nothing inside the sandbox dir can point outside it."""
    import posix
    getcwd, readlink, fspath = posix.getcwd, posix.readlink, posix.fspath
    fs_encoding = sys.getfilesystemencoding()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    prefix = sandbox_dir.rstrip("/") + "/"
    own_proc = f"/proc/{posix.getpid()}/"
    # private copies: the module-level dicts are reachable from user code through frame globals
    path_events, refused, blocked_modules = dict(_PATH_EVENTS), dict(_REFUSED), _BLOCKED_MODULES

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
        elif event in refused:
            raise PermissionError(refused[event])
        elif event.startswith("socket."):
            raise PermissionError("network access is disabled in the sandbox")
        elif event == "sqlite3.connect":
            db = fspath(args[0])  # sqlite opens its files in C, past the "open" event
            if isinstance(db, bytes):
                db = db.decode(fs_encoding, "surrogateescape")
            if db not in (":memory:", ""):
                if db.startswith("file:"):
                    raise PermissionError("sqlite URI filenames are disabled in the sandbox")
                check_write(db)

    sys.addaudithook(hook)


if __name__ == "__main__" and sys.argv[1:2] == [CHILD_FLAG]:
    _child_main(sys.argv[2])
