"""The package's import graph: no circle between fp8vl's modules, imports inside functions included."""

import ast
from pathlib import Path

import fp8vl

ROOT = Path(fp8vl.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the fp8vl modules it imports anywhere in its source, functions included (``from .
    import x``: module ``x`` if it is one, else the package whose ``__init__`` defines ``x``)."""
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # a submodule imported by name depends on that module only (its package is always
                # initialized first, as its parent); any other name comes from the package itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_no_import_circle_between_modules():
    graph = import_graph()
    assert len(graph) > 20 and "fp8vl.engine" in graph["fp8vl.cli"] | graph["fp8vl.caption"]
    assert cycles(graph) == []


def test_the_check_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_cli_and_the_hub_path_import_without_torch():
    """A hub conversion imports torch once its first shard is downloading (hub.py); that only
    overlaps anything if reaching ``quantize_hub`` does not import torch first."""
    import subprocess
    import sys

    code = ("import sys, fp8vl.cli, fp8vl.convert, fp8vl.hub; "
            "print(sorted(m for m in ('torch', 'fp8vl.output', 'fp8vl.writer') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
