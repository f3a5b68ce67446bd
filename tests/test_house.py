"""The shape of the house, from the code's own imports (every import statement, including the ones inside
functions): the library never imports a script, no script imports another script, no import cycle
anywhere, and no file grows past one sitting (600 lines)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nanochat", "scripts", "tasks")


def project_modules():
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for pkg in PACKAGES for p in (REPO / pkg).glob("*.py") if p.name != "__init__.py"}


def imports_of(path, modules):
    """The project modules `path` imports, resolved to module names (from a.b import c -> a.b.c if that
    is a module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            if name in modules:
                found.add(name)
            elif name.rsplit(".", 1)[0] in modules:
                found.add(name.rsplit(".", 1)[0])
    return found


def graph():
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_scripts_import_the_library_only():
    g = graph()
    s2s = sorted((m, d) for m, deps in g.items() if m.startswith("scripts.") for d in deps if d.startswith("scripts."))
    assert not s2s, f"scripts importing scripts: {s2s}"
    up = sorted((m, d) for m, deps in g.items() if not m.startswith("scripts.") for d in deps if d.startswith("scripts."))
    assert not up, f"library modules importing scripts: {up}"


def test_no_import_cycle():
    g = graph()
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_real_edges():
    """The checks above are only as good as the graph: it must see top-level and in-function imports."""
    g = graph()
    assert "nanochat.training" in g["scripts.base_train"] and "nanochat.checkpoint" in g["nanochat.training"]
    assert "nanochat.engine" in g["nanochat.finetune"]  # imported inside a function


def test_no_file_past_one_sitting():
    files = [p for pkg in (*PACKAGES, "runs") for p in (REPO / pkg).rglob("*") if p.suffix in (".py", ".sh", ".html")]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"files over 600 lines: {long}"
