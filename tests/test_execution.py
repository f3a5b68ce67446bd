"""Tests for the code-execution sandbox (nanochat/execution.py): results, limits, and that the code
cannot reach the network, spawn processes, write outside its temp dir or see the caller's secrets.
Each run starts a fresh interpreter (~0.1 s); the timeout tests take ~1 s each."""

import os
import ast
import sys
import time
import select
import signal
import socket
import pathlib
import tempfile
import textwrap
import threading
import subprocess
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from nanochat.execution import ExecutionResult, execute_code

REPO = pathlib.Path(__file__).resolve().parent.parent
START_CWD = os.getcwd()


@pytest.fixture(autouse=True)
def isolated_sandboxes(tmp_path, monkeypatch):
    """Sandbox temp dirs go under this test's tmp_path; afterwards they must all be gone, the parent's
    cwd unchanged and no child process left behind."""
    sandboxes = tmp_path / "sandboxes"
    sandboxes.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandboxes))
    yield sandboxes
    assert os.getcwd() == START_CWD
    assert list(sandboxes.iterdir()) == [], "sandbox temp dirs were not cleaned up"
    assert psutil.Process().children(recursive=True) == [], "a sandboxed process outlived its execute_code call"


def run(code, **kwargs):
    return execute_code(textwrap.dedent(code), **kwargs)


def has_landlock(result):
    return any(p.startswith("landlock") for p in result.protections)


# -----------------------------------------------------------------------------
# results

def test_happy_path_stdout():
    r = run("print('hello')\nprint(sum(range(10)))")
    assert r.success and not r.timeout and not r.memory_exceeded and not r.output_truncated
    assert r.stdout == "hello\n45\n"
    assert r.stderr == "" and r.error is None
    assert r.summary() == "hello\n45" and str(r) == r.summary()
    assert "audit-hook" in r.protections and "rlimits" in r.protections


def test_repl_mode_prints_value_of_last_expression():
    assert run("'strawberry'.count('r')", repl_mode=True).stdout == "3\n"
    assert run("x = 5\ndef f(y):\n    return y * 2\nf(x)", repl_mode=True).stdout == "10\n"
    assert run("'a' + 'b'", repl_mode=True).stdout == "'ab'\n"  # repr, like the REPL
    assert run("print('p')", repl_mode=True).stdout == "p\n"    # print() returns None: nothing extra
    assert run("x = 1", repl_mode=True).stdout == ""            # last statement is not an expression
    assert run("'strawberry'.count('r')").stdout == ""          # off by default
    r = run("1 / 0", repl_mode=True)
    assert not r.success and r.error == "ZeroDivisionError: division by zero"


def test_exception_captured_with_message_and_user_traceback():
    r = run("print('before')\nraise ValueError('bad value 42')")
    assert not r.success and not r.timeout and not r.memory_exceeded
    assert r.error == "ValueError: bad value 42"
    assert r.stdout == "before\n"
    assert 'File "main.py", line 2' in r.stderr and "raise ValueError('bad value 42')" in r.stderr
    assert r.summary() == "before\nError: ValueError: bad value 42"


def test_syntax_error():
    r = run("def f(:\n    pass")
    assert not r.success
    assert r.error.startswith("SyntaxError"), r.error
    assert "main.py" in r.stderr and r.stdout == ""


def test_stdin_closed_and_unusual_source():
    r = run("input()")
    assert not r.success and r.error == "EOFError: EOF when reading a line"
    assert run("").success
    r = run("s = '\ud800'\nprint(len(s), ascii(s))")  # a lone surrogate in a literal survives the trip
    assert r.success and r.stdout == "1 '\\ud800'\n", r.stderr
    r = run("x = 1\0")
    assert not r.success and "null bytes" in r.error  # SyntaxError or ValueError, depending on the 3.11.x
    r = run("print('h\u00e9llo \u2713')")
    assert r.stdout == "h\u00e9llo \u2713\n"


def test_exit_status():
    assert run("import sys; sys.exit(0)").success
    r = run("import sys; sys.exit(3)")
    assert not r.success and r.error == "exited with status 3"
    r = run("raise SystemExit('custom message')")
    assert not r.success and r.error == "custom message"


# -----------------------------------------------------------------------------
# limits

def test_infinite_loop_killed_within_timeout():
    t0 = time.monotonic()
    r = run("print('started')\nwhile True:\n    pass", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.timeout and not r.success
    assert r.error == "timeout after 1.0s"
    assert r.stdout == "started\n"  # what was printed before the kill is kept
    assert 1.0 <= elapsed < 2.5, elapsed


def test_sleeping_code_killed_by_wall_clock():
    # CPU-time limits never fire for a process that sleeps; the parent's wall clock must
    t0 = time.monotonic()
    r = run("import time\ntime.sleep(60)", timeout=0.5)
    assert r.timeout and time.monotonic() - t0 < 2.0


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS does not enforce RLIMIT_AS")
def test_memory_bomb_hits_memory_limit():
    r = run("x = bytearray(1 << 30)\nprint('allocated')")  # 1 GiB against the default 256 MiB
    assert r.memory_exceeded and not r.success and not r.timeout
    assert r.error == "memory limit 256 MiB exceeded"
    assert "allocated" not in r.stdout
    r = run("a = []\nwhile True:\n    a.append(' ' * 10**6)", memory_limit_bytes=64 * 2**20)
    assert r.memory_exceeded and r.error == "memory limit 64 MiB exceeded"


def test_file_size_limit():
    r = run("""
        with open('big.bin', 'wb') as f:
            for _ in range(100):
                f.write(b'x' * 2**20)
    """, memory_limit_bytes=32 * 2**20)  # RLIMIT_FSIZE follows the memory limit
    assert not r.success and "File too large" in r.error


def test_huge_output_is_truncated_and_parent_memory_bounded():
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    r = run("for _ in range(5):\n    print('x' * 10**8)\nprint('END')", timeout=30, memory_limit_bytes=2**30)
    rss_growth = proc.memory_info().rss - rss_before
    assert r.success and r.output_truncated
    assert len(r.stdout) < 64 * 1024 + 200          # the cap plus the "[... truncated]" marker line
    assert r.stdout.startswith("x" * 1000) and r.stdout.endswith("END\n")  # head and tail are kept
    assert "bytes of output truncated" in r.stdout
    assert rss_growth < 50 * 2**20, f"parent grew by {rss_growth / 2**20:.0f} MiB for 500 MB of child output"

    r = run("import sys\nfor i in range(10**5):\n    print(i)\nsys.stderr.write('E' * 10**6)\nraise RuntimeError('last')",
            max_output_bytes=1000)
    assert r.output_truncated and len(r.stdout) < 1200 and len(r.stderr) < 1200
    assert r.error == "RuntimeError: last"  # found in the kept tail of a truncated stderr


def test_invalid_arguments_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="timeout=0"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="timeout=nan"):
        execute_code("pass", timeout=float("nan"))
    with pytest.raises(ValueError, match="memory_limit_bytes=1000"):
        execute_code("pass", memory_limit_bytes=1000)
    with pytest.raises(ValueError, match="max_output_bytes=0"):
        execute_code("pass", max_output_bytes=0)
    with pytest.raises(TypeError, match="bytes"):
        execute_code(b"print(1)")


# -----------------------------------------------------------------------------
# isolation

# each attempt prints "<name> ALLOWED" or "<name> blocked: <error>"
ATTEMPT = """
def attempt(name, fn):
    try:
        fn()
        print(name, 'ALLOWED')
    except Exception as e:
        print(name, 'blocked:', type(e).__name__, e)
"""

PROCESS_ATTEMPTS = "import os, subprocess, pty, multiprocessing" + ATTEMPT + """
def fork():
    if os.fork() == 0:
        print('CHILD-RAN', flush=True)
        os._exit(0)
attempt('fork', fork)
attempt('subprocess', lambda: print(subprocess.run(['ls', '/'], capture_output=True).stdout))
attempt('system', lambda: os.system('echo SPAWNED'))
attempt('posix_spawn', lambda: os.posix_spawn('/bin/echo', ['echo', 'SPAWNED'], {}))
attempt('execv', lambda: os.execv('/bin/echo', ['echo', 'SPAWNED']))
attempt('pty', lambda: pty.spawn(['/bin/echo', 'SPAWNED']))
attempt('multiprocessing', lambda: multiprocessing.Process(target=print, args=('SPAWNED',)).start())
"""


def test_process_creation_is_refused():
    r = run(PROCESS_ATTEMPTS)
    assert r.success, r.stderr
    assert "ALLOWED" not in r.stdout and "SPAWNED" not in r.stdout and "CHILD-RAN" not in r.stdout
    assert "bin" not in r.stdout  # `ls /` never ran
    for name in ("fork", "subprocess", "system", "posix_spawn", "execv", "pty", "multiprocessing"):
        assert f"{name} blocked:" in r.stdout


def test_process_creation_refused_by_the_kernel_when_python_guard_is_bypassed():
    # Give the subprocess module a `sys` whose audit() does nothing: the audit hook never hears of the
    # Popen, so only the kernel layers (seccomp, Landlock's no-execute) stand in the way.
    r = run("""
        import subprocess, sys, types
        fake = types.ModuleType('sys'); fake.__dict__.update(sys.__dict__); fake.audit = lambda *a: None
        subprocess.sys = fake
        try:
            print(subprocess.run(['/bin/echo', 'SPAWNED'], capture_output=True).stdout)
        except OSError as e:
            print('refused:', e)
    """)
    nproc_effective = "rlimit-nproc" in r.protections and os.geteuid() != 0  # root is exempt from RLIMIT_NPROC
    if not ("seccomp" in r.protections or has_landlock(r) or nproc_effective):
        pytest.skip(f"no kernel-level process restriction on this machine ({r.protections})")
    assert r.success, r.stderr
    assert "SPAWNED" not in r.stdout and "refused:" in r.stdout


def test_network_is_unreachable_and_parent_gets_no_connection():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    try:
        r = run(f"""
            import socket
            for family, target in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET, ('8.8.8.8', 53))]:
                try:
                    socket.create_connection(target, timeout=2)
                    print('CONNECTED', target)
                except OSError as e:
                    print('refused', target, e)
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(b'x', ('127.0.0.1', {port}))
                print('SENT')
            except OSError as e:
                print('refused udp', e)
        """)
        readable, _, _ = select.select([listener], [], [], 0.5)
        assert readable == [], "the sandboxed code reached the parent's listening socket"
    finally:
        listener.close()
    assert r.success, r.stderr
    assert "CONNECTED" not in r.stdout and "SENT" not in r.stdout
    assert "network access is disabled in the sandbox" in r.stdout

    r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))")
    assert r.error == "PermissionError: network access is disabled in the sandbox"


def test_network_namespace_is_separate():
    parent_ns = os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None
    r = run("import os\nprint(os.readlink('/proc/self/ns/net'))")
    if "netns" not in r.protections:
        pytest.skip(f"network namespaces unavailable here ({r.protections})")
    assert r.success and r.stdout.strip() and r.stdout.strip() != parent_ns


WRITE_ATTEMPTS = "import os, pathlib, shutil, sqlite3" + ATTEMPT + """
OUT = {out!r}
KEEP = {keep!r}
attempt('open', lambda: open(OUT, 'w').write('x'))
attempt('open-append', lambda: open(OUT, 'a').write('x'))
attempt('relative', lambda: open('../../' + os.path.basename(OUT), 'w').write('x'))
attempt('os.open', lambda: os.open(OUT, os.O_WRONLY | os.O_CREAT))
attempt('pathlib', lambda: pathlib.Path(OUT).write_text('x'))
attempt('copy', lambda: shutil.copy('main.py', OUT))
open('inside.txt', 'w').write('x')
attempt('rename', lambda: os.rename('inside.txt', OUT))
attempt('link', lambda: os.link(KEEP, 'hardlink.txt'))
attempt('symlink', lambda: os.symlink(OUT, 'link.txt'))
attempt('remove', lambda: os.remove(KEEP))
attempt('chmod', lambda: os.chmod(KEEP, 0o777))
attempt('truncate', lambda: os.truncate(KEEP, 0))
attempt('sqlite', lambda: sqlite3.connect(OUT).execute('create table t (x)'))
attempt('sqlite-path', lambda: sqlite3.connect(pathlib.Path(OUT)).execute('create table t (x)'))
attempt('chdir-then-write', lambda: (os.chdir(os.path.dirname(OUT)), open(os.path.basename(OUT), 'w')))
"""


def test_writes_outside_the_sandbox_dir_are_refused(tmp_path):
    out = tmp_path / "escape.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    r = run(WRITE_ATTEMPTS.format(out=str(out), keep=str(keep)))
    assert r.success, r.stderr
    assert "ALLOWED" not in r.stdout, r.stdout
    assert r.stdout.count("blocked:") == 15
    assert not out.exists()
    assert keep.read_text() == "precious" and oct(keep.stat().st_mode & 0o777) != "0o777"


def test_writes_inside_the_sandbox_dir_work():
    r = run("""
        import os, tempfile, shutil, sqlite3, pathlib
        open('a.txt', 'w').write('alpha')
        os.makedirs('d/e')
        pathlib.Path('d/e/b.txt').write_text('beta')
        os.rename('a.txt', 'd/a.txt')
        fd, name = tempfile.mkstemp()
        os.write(fd, b'gamma'); os.close(fd)
        db = sqlite3.connect('db.sqlite'); db.execute('create table t (x)'); db.execute("insert into t values ('delta')")
        db.commit()
        print(open('d/a.txt').read(), open('d/e/b.txt').read(), open(name).read(),
              db.execute('select x from t').fetchone()[0], name.startswith(os.getcwd()))
        shutil.rmtree('d')
        os.chmod('.', 0o500)  # the parent must still be able to delete the dir afterwards
    """)
    assert r.success, r.stderr
    assert r.stdout == "alpha beta gamma delta True\n"


def test_python_guard_survives_monkeypatching(tmp_path):
    # The audit hook binds everything it uses at install time, so patching builtins, os or os.path
    # afterwards cannot talk it into allowing a write outside.
    out = tmp_path / "escape.txt"
    r = run(f"""
        import builtins, os, posixpath
        inside = os.getcwd() + '/x'
        posixpath.normpath = posixpath.abspath = posixpath.realpath = lambda p, *a, **k: inside
        os.getcwd = lambda: inside
        builtins.isinstance = lambda *a: False
        builtins.PermissionError = type('Nope', (Exception,), {{}})
        open({str(out)!r}, 'w').write('x')
    """)
    assert not r.success and "writing outside the sandbox directory is disabled" in r.error
    assert not out.exists()


def test_kernel_layer_blocks_what_the_python_guard_cannot_see(tmp_path):
    # No audit event exists for mkfifo, and plain reads are allowed by the hook: Landlock alone
    # stops these (writes beneath the temp dir only; reads from the Python install and system dirs only).
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    fifo = tmp_path / "fifo"
    r = run(f"""
        import os
        for name, fn in [('mkfifo', lambda: os.mkfifo({str(fifo)!r})),
                         ('read', lambda: print(open({str(secret)!r}).read())),
                         ('listdir', lambda: print(os.listdir({str(tmp_path)!r})))]:
            try:
                fn()
                print(name, 'ALLOWED')
            except OSError as e:
                print(name, 'blocked', e.errno)
        import json, decimal, sqlite3  # the Python install (modules, extension .so files) stays readable
        print(json.dumps([1]), decimal.Decimal('1.5') * 2)
    """)
    if not has_landlock(r):
        pytest.skip(f"Landlock unavailable on this kernel ({r.protections})")
    assert r.success, r.stderr
    assert "ALLOWED" not in r.stdout and "TOP-SECRET" not in r.stdout
    assert r.stdout.count("blocked 13") == 3  # EACCES
    assert r.stdout.endswith("[1] 3.0\n")
    assert not fifo.exists()


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2-in-os-environ")
    r = run("""
        import os
        print(sorted(os.environ))
        print(dict(os.environ))
        try:
            print(open(f'/proc/{os.getppid()}/environ', 'rb').read())
        except OSError as e:
            print('blocked', e)
    """)
    assert r.success, r.stderr
    assert "hunter2" not in r.stdout + r.stderr and "NANOCHAT_TEST_SECRET" not in r.stdout
    env_keys = ast.literal_eval(r.stdout.splitlines()[0])
    assert set(env_keys) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "OMP_NUM_THREADS",
                             "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_ARENA_MAX"}
    assert "blocked" in r.stdout


def test_launch_environment_of_the_caller_is_not_readable_through_proc():
    # A secret in the *initial* environment of the calling process (an API key given to a server at
    # start-up) is what /proc/<pid>/environ shows; the sandbox must not be able to read it.
    script = textwrap.dedent("""
        import os
        from nanochat.execution import execute_code
        code = '''
        import os
        ppid = os.getppid()
        for path in [f'/proc/{ppid}/environ', f'/proc/self/../{ppid}/environ', f'/proc/{ppid}/cmdline']:
            try:
                print(open(path, 'rb').read())
            except OSError as e:
                print('blocked', path, e)
        os.chdir('/proc')
        try:
            print(open(f'{ppid}/environ', 'rb').read())
        except OSError as e:
            print('blocked relative', e)
        '''
        r = execute_code(code)
        print(r.stdout, r.stderr)
    """)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "NANOCHAT_LAUNCH_SECRET": "sk-launch-secret-value"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                         cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert "sk-launch-secret-value" not in out.stdout
    assert out.stdout.count("blocked") == 4, out.stdout


def test_signals_to_other_processes_are_refused():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        r = run(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)")
        assert not r.success and r.error == "PermissionError: sending signals is disabled in the sandbox"
        time.sleep(0.1)
        assert victim.poll() is None, "the sandboxed code killed a process outside the sandbox"
    finally:
        victim.kill()
        victim.wait()


def test_native_memory_access_and_gc_introspection_are_refused():
    # ctypes (memmove, cast, from_address) reaches arbitrary memory without any audit event, and gc
    # enumeration is the way to reach the audit hook itself
    for code, expected in [("import ctypes", "ImportError: module 'ctypes' is disabled"),
                           ("import _ctypes", "ImportError: module '_ctypes' is disabled"),
                           ("import importlib\nimportlib.import_module('ctypes.util')", "ImportError"),
                           ("import gc\ngc.get_objects()", "PermissionError: gc.get_objects is disabled"),
                           ("import gc\ngc.get_referrers(print)", "PermissionError")]:
        r = run(code)
        assert not r.success and r.error.startswith(expected), (code, r.error)
    # libraries that merely try ctypes (numpy does, at import) still work
    if subprocess.run([sys.executable, "-I", "-c", "import numpy"], capture_output=True).returncode == 0:
        r = run("import numpy\nprint(numpy.arange(4).sum())")
        assert r.success and r.stdout == "6\n", r.stderr


# -----------------------------------------------------------------------------
# calling from threads, and the parent afterwards

def test_works_from_a_non_main_thread():
    results = {}

    def worker():
        results["ok"] = execute_code("print(6 * 7)")
        results["loop"] = execute_code("while True:\n    pass", timeout=1.0)

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert results["ok"].success and results["ok"].stdout == "42\n"
    assert results["loop"].timeout and results["loop"].error == "timeout after 1.0s"


def test_many_concurrent_executions_from_threads():
    codes = [f"import time\ntime.sleep(0.05)\nprint({i} * {i})" for i in range(12)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(execute_code, codes))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(12)]
    assert all(r.success for r in results)


def test_parent_unaffected_afterwards():
    handler = signal.getsignal(signal.SIGINT)
    env = dict(os.environ)
    for code in [PROCESS_ATTEMPTS, "import os\nos.chdir('/')\nos.environ['X'] = '1'\nos.umask(0o777)",
                 "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)"]:
        run(code)
    r = run("print('still fine')")
    assert r.success and r.stdout == "still fine\n"
    assert os.getcwd() == START_CWD
    assert dict(os.environ) == env and signal.getsignal(signal.SIGINT) == handler
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    assert old_umask != 0o777


def test_summary_for_the_model():
    ok = ExecutionResult(success=True, stdout="3\n", stderr="", error=None, timeout=False, memory_exceeded=False)
    assert ok.summary() == "3"
    failed = ExecutionResult(success=False, stdout="", stderr="...", error="timeout after 5.0s", timeout=True,
                             memory_exceeded=False)
    assert failed.summary() == "Error: timeout after 5.0s"
    r = run("print('partial')\nraise KeyError('k')")
    assert str(r) == "partial\nError: KeyError: 'k'"


def test_sandbox_script(capsys):
    from nanochat.common import UserError
    from scripts import sandbox
    assert sandbox.main(["--repl", "-c", "6 * 7"]) == 0
    out, err = capsys.readouterr()
    assert out == "42\n" and "success=True" in err and "audit-hook" in err
    assert sandbox.main(["-c", "1/0"]) == 1
    assert capsys.readouterr().out == "Error: ZeroDivisionError: division by zero\n"
    with pytest.raises(UserError, match="timeout=0"):
        sandbox.main(["--timeout", "0", "-c", "1"])
