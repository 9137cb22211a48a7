"""benchmarks/*.py as a user first meets them: ``--help`` answers at once, with a usage line, whatever the
machine (the benchmarks themselves need a GPU, and import torch, Triton and fp8vl only after their
arguments are read)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from helpers import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
HEAVY = ("torch", "triton", "numpy", "fp8vl", "transformers")
RUN = ("import json, runpy, sys\n"
       "sys.argv = [sys.argv[1], '--help']\n"
       "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n    rc = None\n"
       "except SystemExit as e:\n    rc = e.code\n"
       f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")


def test_every_benchmark_is_listed():
    assert {"attention.py", "caption.py", "convert.py", "e2e.py", "hub.py", "linears.py", "tune.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_at_once_without_importing_torch(script):
    path = ROOT / "benchmarks" / script
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=path.parent)
    seconds = time.perf_counter() - t
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script} "), r.stdout[:500] + r.stderr[-2000:]
    assert seconds < 3, f"{script} --help took {seconds:.1f} s"    # ~0.1-0.7 s; 6-10 s with torch imported first
    done = subprocess.run([sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=path.parent)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}, done.stderr[-2000:]
