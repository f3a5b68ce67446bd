"""
Run Python code in the nanochat sandbox (nanochat/execution.py, the one the model's python tool and
HumanEval use) and print what it printed and which isolation layers held on this machine.

    python -m scripts.sandbox -c "print(sum(range(10)))"
    python -m scripts.sandbox --repl -c "'strawberry'.count('r')"
    echo "import socket; socket.socket()" | python -m scripts.sandbox -

Exit status 0 if the code ran cleanly, 1 if it failed (its error is printed) or the arguments are wrong.
"""

import argparse
import sys

from nanochat.common import run_cli, UserError
from nanochat.execution import DEFAULT_MAX_OUTPUT, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT, execute_code


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", help="file with the code to run ('-' = stdin); or use --code")
    p.add_argument("-c", "--code", help="the code to run, as a string")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="wall-clock seconds (default: %(default)s)")
    p.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_LIMIT // 2**20,
                   help=f"memory limit in MiB (default: {DEFAULT_MEMORY_LIMIT // 2**20})")
    p.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT,
                   help=f"keep at most this many bytes of stdout and of stderr (default: {DEFAULT_MAX_OUTPUT})")
    p.add_argument("--repl", action="store_true",
                   help="print the value of a final expression, like the interactive interpreter")
    args = p.parse_args(argv)
    if (args.code is None) == (args.path is None):
        p.error("give exactly one of: a file path (or '-') or --code")
    code = args.code
    if args.path == "-":
        code = sys.stdin.read()
    elif args.path is not None:
        try:
            with open(args.path, encoding="utf-8") as f:
                code = f.read()
        except OSError as e:
            raise UserError(f"cannot read {args.path}: {e.strerror}") from None
    try:
        r = execute_code(code, timeout=args.timeout, memory_limit_bytes=args.memory_mb * 2**20,
                         max_output_bytes=args.max_output_bytes, repl_mode=args.repl)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(r.summary())
    if r.stderr and r.success:
        sys.stderr.write(r.stderr)
    print(f"[sandbox] success={r.success} timeout={r.timeout} memory_exceeded={r.memory_exceeded} "
          f"output_truncated={r.output_truncated} protections={','.join(r.protections) or 'none'}", file=sys.stderr)
    return 0 if r.success else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
