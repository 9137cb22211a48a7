"""The package's import graph, imports inside functions included: no circle between fp8vl's modules,
and no layer imports one above it."""

import ast
from pathlib import Path

import fp8vl

ROOT = Path(fp8vl.__file__).parent

# fp8vl's layers, lowest first: a module may import its own layer and the layers below, never one above.
# A dotted name stands for that module and, for a package, every module in it; the package root
# ("fp8vl", its __init__) stands for itself only. Every module of fp8vl must fall in one layer, so a
# new top-level module needs a place here.
LAYERS = [
    ["fp8vl.errors", "fp8vl.options", "fp8vl.version"],   # the base: errors, options, the version
    ["fp8vl.checkpoint"],   # what a checkpoint is and what becomes FP8
    ["fp8vl.kernels"],      # FP8 block numerics, GEMM and attention kernels
    ["fp8vl.conversion"],   # quantize (folder or hub), dequantize, the output and its card
    ["fp8vl.runtime"],      # FP8 modules, loader, decoder layers, prefill, engine
    ["fp8vl.inputs"],       # prompts and images
    ["fp8vl.check"],        # verify (and the engines' loaders), eval, their rendering
    ["fp8vl.serving"],      # GPU facts, vLLM memory plan, the server command
    ["fp8vl.report"],       # console rendering of the layers' results
    ["fp8vl.apps"],         # caption, doctor, demo, tiny models
    ["fp8vl.cli", "fp8vl.__main__", "fp8vl"],   # the command and the public API
]


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


def layer_of(module: str, layers: list[list[str]] = LAYERS) -> tuple[int, str] | None:
    """(index, name) of the layer entry that holds ``module``: the longest name that is the module or
    a package above it (a name without a dot, the root, holds itself only); None if there is none."""
    hits = [(len(n), i, n) for i, names in enumerate(layers) for n in names
            if module == n or ("." in n and module.startswith(n + "."))]
    return max(hits)[1:] if hits else None


def upward(graph: dict[str, set[str]], layers: list[list[str]] = LAYERS) -> list[str]:
    """Every import of a layer above the importer's, one line each."""
    found = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            (i, la), (j, lb) = layer_of(a, layers), layer_of(b, layers)
            if j > i:
                found.append(f"{a} (layer {i}: {la}) imports {b} (layer {j}: {lb})")
    return found


def test_no_import_circle_and_no_layer_imports_one_above():
    graph = import_graph()
    assert len(graph) > 20 and "fp8vl.runtime.engine" in graph["fp8vl.cli"] | graph["fp8vl.apps.caption_local"]
    assert cycles(graph) == []
    assert [m for m in sorted(graph) if layer_of(m) is None] == [], "modules in no layer: add them to LAYERS"
    assert upward(graph) == []


def test_the_checks_see_a_circle_and_an_import_of_a_layer_above():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    layers = [["p.low"], ["p.high", "p"]]
    graph = {"p.low.a": {"p.high.b"}, "p.high.b": {"p.low.a", "p.high.c"}, "p.high.c": set(), "p": {"p.low.a"}}
    assert upward(graph, layers) == ["p.low.a (layer 0: p.low) imports p.high.b (layer 1: p.high)"]
    assert layer_of("p.other", layers) is None and layer_of("p", layers) == (1, "p")


def test_the_cli_and_the_hub_path_import_without_torch():
    """A hub conversion imports torch once its first shard is downloading (conversion/hub.py); that only
    overlaps anything if reaching ``quantize_hub`` does not import torch first."""
    import subprocess
    import sys

    code = ("import sys, fp8vl.cli, fp8vl.conversion.convert, fp8vl.conversion.hub; "
            "print(sorted(m for m in ('torch', 'fp8vl.conversion.output', 'fp8vl.conversion.writer') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_no_benchmark_script_shadows_an_installed_module():
    """A script's folder comes first on sys.path: benchmarks/kernels.py once hid the ``kernels``
    package Transformers imports, so every benchmark that loaded a model died on import."""
    import importlib.util

    bench = ROOT.parents[1] / "benchmarks"
    names = [p.stem for p in bench.glob("*.py")]
    assert "caption" in names
    assert [n for n in names if importlib.util.find_spec(n) is not None] == []


def test_readme_says_how_to_reach_the_command_after_make_demo():
    """make demo installs into .venv, which is not on PATH: a bare `fp8vl` afterwards is 'command not found'."""
    readme = (ROOT.parents[1] / "README.md").read_text()
    two = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "`.venv/bin/fp8vl`" in two and "`. .venv/bin/activate`" in two
