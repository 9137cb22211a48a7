"""How ``verify --vllm/--sglang`` reaches an engine (engines/__init__.py), where none is installed:
fp8vl's own venv never has vLLM or SGLang. The engines themselves: test_vllm_check.py, test_sglang_check.py."""

from __future__ import annotations

import sys

import pytest

from fp8vl.check.engines import engine_version, find_python, run_check
from fp8vl.check.verify import verify


@pytest.fixture(scope="module", autouse=True)
def no_engine_here():
    if engine_version(sys.executable, "vllm") or engine_version(sys.executable, "sglang"):
        pytest.skip("this interpreter has an engine installed")


def test_without_the_engine_verify_says_how_to_install_it_and_skips(dense_fp8, tmp_path):
    r = verify(dense_fp8.out, engines=("vllm", "sglang"), engine_python=(str(tmp_path / "no-python"),))
    assert r.ok
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
