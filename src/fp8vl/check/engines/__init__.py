"""Run vLLM's or SGLang's own loader code on a checkpoint, on the CPU, in the engine's interpreter.

vLLM and SGLang pin their own torch and Transformers, so they live in their own virtual
environments, never in fp8vl's. ``fp8vl verify --vllm`` runs ``python -m fp8vl.check.engines.vllm_check``
in an interpreter that has the engine (the current one if it imports it, else one given with
``--engine-python``), with fp8vl's source on PYTHONPATH; the check writes its result as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# engine -> (distribution name, check module, the release the checks were written against)
ENGINES = {"vllm": ("vllm", "fp8vl.check.engines.vllm_check", "0.33.0"),
           "sglang": ("sglang", "fp8vl.check.engines.sglang_check", "0.5.23")}
SRC = Path(__file__).resolve().parents[3]   # the folder holding the fp8vl package


def engine_version(python: str, engine: str) -> str | None:
    """The engine's version in interpreter ``python``, or None if it does not have it."""
    dist = ENGINES[engine][0]
    probe = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def find_python(engine: str, candidates: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(interpreter, engine version): the first of ``candidates``, then the current interpreter,
    that has the engine installed."""
    for py in (*candidates, sys.executable):
        v = engine_version(py, engine)
        if v:
            return py, v
    return None


def install_hint(engine: str) -> str:
    dist, _, tested = ENGINES[engine]
    return (f"{engine} is not installed in this interpreter or any --engine-python given: install it in its "
            f"own venv (python3 -m venv ~/.venvs/{engine} && ~/.venvs/{engine}/bin/pip install "
            f"'{dist}=={tested}') and pass --engine-python ~/.venvs/{engine}/bin/python")


def run_check(engine: str, checkpoint: str | Path, python: str, tp_sizes: tuple[int, ...] = (),
              timeout: float = 3600) -> dict:
    """Run the engine's check on ``checkpoint`` in ``python``; its JSON result (see common.Result).

    A check that dies (import error, crash) comes back as a result with one error naming why."""
    module = ENGINES[engine][1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with tempfile.TemporaryDirectory(prefix="fp8vl-engine-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, "-m", module, str(checkpoint), "--json", str(out)]
        if tp_sizes:
            cmd += ["--tp", ",".join(map(str, tp_sizes))]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"engine": engine, "version": None, "checks": [
                {"level": "error", "name": engine, "message": f"the {engine} check ran past {timeout:.0f} s"}]}
        if out.is_file():
            return json.loads(out.read_text())
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"engine": engine, "version": None, "checks": [
            {"level": "error", "name": engine,
             "message": f"the {engine} check failed to run (exit {done.returncode}): " + " | ".join(tail)}]}


def check_engine(report, checkpoint: str | Path, engine: str, pythons: tuple[str, ...] = (),
                 tp_sizes: tuple[int, ...] = ()) -> dict | None:
    """Run ``engine``'s check on ``checkpoint`` and add its findings to ``report`` (verify.Report).

    Without the engine: one warning saying how to install it, and the engine in ``report.skipped`` (the
    CLI's last line then says SKIPPED, and its exit code is 3, not 0). vLLM's measured TP
    sizes are compared with fp8vl's own TP report (checkpoint/tp.py): a disagreement is a warning."""
    # absolute (not resolved: a venv's python is a link that must stay inside its venv): the check
    # runs in a temporary folder, where a relative path would name nothing
    found = find_python(engine, tuple(str(Path(p).expanduser().absolute()) for p in pythons))
    if found is None:
        report.add("warning", engine, install_hint(engine) + "; skipped")
        report.skipped.append(engine)
        return None
    python, version = found
    tested = ENGINES[engine][2]
    res = run_check(engine, checkpoint, python, tp_sizes if engine == "vllm" else ())
    shown = {"vllm": "vLLM", "sglang": "SGLang"}[engine]
    report.add("ok", engine, f"{shown} {version} ran its own loader on the CPU ({python})"
               + ("" if version == tested else f"; fp8vl's checks were written against {tested}"))
    for c in res["checks"]:
        report.add(c["level"], c["name"], c["message"])
    measured = {int(k): v for k, v in (res.get("tp") or {}).items()}
    predicted = (report.tp or {}).get("sizes", {})
    for tp, m in sorted(measured.items()):
        if tp not in predicted:
            continue
        fits = not predicted[tp]
        if fits != m["ok"]:
            said = "fits" if fits else f"fails at {report.tp['phase'][tp]}"
            got = "builds and loads" if m["ok"] else f"fails at {m['phase']}: {m['error']}"
            report.add("warning", f"{engine} tp",
                       f"TP {tp}: fp8vl's TP report (vLLM {report.tp.get('vllm')} rules) says it {said}, "
                       f"{shown} {version} {got}; trust {shown}")
    return res
