"""How ``verify --vllm/--sglang`` reaches an engine (engines/__init__.py), where none is installed:
fp8vl's own venv never has vLLM or SGLang. The engines themselves: test_vllm_check.py, test_sglang_check.py."""

from __future__ import annotations

import json
import sys

import pytest

from fp8vl.check.engines import engine_version, find_python, run_check
from fp8vl.check.verify import verify
from helpers import run_cli


@pytest.fixture(scope="module", autouse=True)
def no_engine_here():
    if engine_version(sys.executable, "vllm") or engine_version(sys.executable, "sglang"):
        pytest.skip("this interpreter has an engine installed")


def test_without_the_engine_verify_says_how_to_install_it_and_skips(dense_fp8, tmp_path):
    r = verify(dense_fp8.out, engines=("vllm", "sglang"), engine_python=(str(tmp_path / "no-python"),))
    assert r.ok and r.skipped == ["vllm", "sglang"] and json.loads(r.to_json())["skipped"] == ["vllm", "sglang"]
    for engine, pin in (("vllm", "vllm==0.33.0"), ("sglang", "sglang==0.5.23")):
        (c,) = [c for c in r.checks if c.name == engine]
        assert c.level == "warning" and pin in c.message and "--engine-python" in c.message and "skipped" in c.message


def test_an_interpreter_without_the_engine_is_passed_over(tmp_path):
    assert find_python("vllm", (sys.executable, str(tmp_path / "missing"))) is None
    assert engine_version(str(tmp_path / "missing"), "sglang") is None


def test_a_check_that_cannot_run_comes_back_as_one_error_naming_why(dense_fp8):
    res = run_check("vllm", dense_fp8.out, sys.executable)        # no vLLM here: the import fails
    (c,) = res["checks"]
    assert c["level"] == "error" and "failed to run" in c["message"] and "vllm" in c["message"]


def test_the_cli_never_ends_on_a_bare_passed_when_the_engine_check_did_not_run(dense_fp8, tmp_path):
    """The structure passed, the requested vLLM check could not run: the last line says SKIPPED, exit code 3
    (0: everything requested ran and passed; 1: a check failed)."""
    r = run_cli("verify", dense_fp8.out, "--vllm", "--engine-python", tmp_path / "no-python", cwd=tmp_path)
    last = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 3, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert last.startswith("PASSED what ran; SKIPPED: vllm (not installed") and "Traceback" not in r.stderr, last
    assert "PASSED" not in r.stdout.strip().splitlines()[:-1][-1]
    as_json = run_cli("verify", dense_fp8.out, "--sglang", "--engine-python", tmp_path / "no-python", "--json", "-",
                      cwd=tmp_path)
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and report["ok"] and report["skipped"] == ["sglang"], as_json.stderr[-2000:]
    plain = run_cli("verify", dense_fp8.out, cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout.strip().splitlines()[-1] == "PASSED", plain.stdout[-2000:]


def test_a_failure_and_a_skipped_engine_are_both_said():
    from rich.console import Console

    from fp8vl.check.verify import Check, Report
    from fp8vl.report import print_verify

    console = Console(record=True, width=300)
    print_verify(Report("x", "fp8", [Check("error", "config", "bad")], skipped=["vllm", "sglang"]), console)
    assert console.export_text().strip().splitlines()[-1].startswith("FAILED; SKIPPED: vllm, sglang (not installed")
