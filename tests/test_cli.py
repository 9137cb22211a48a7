"""The ``fp8vl quantize`` command as a user runs it: a real subprocess, exit codes, one-line errors, signals."""

from __future__ import annotations

import glob
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import BAD_CASES, cli_env, file_hashes, language_linears, load_tensors, popen_cli, read_config, run_cli


def assert_one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_a_one_line_error_and_no_traceback(bad_inputs, case, tmp_path):
    bad = bad_inputs[case]
    line = assert_one_line_error(run_cli("quantize", bad.source, bad.output, cwd=tmp_path))
    for fragment in bad.fragments:
        assert fragment in line
    if case == "output not empty":
        assert [p.name for p in bad.output.iterdir()] == ["keep-me.txt"]
    else:
        assert not bad.output.exists()


def test_missing_output_without_dry_run_exits_2(dense_src, tmp_path):
    line = assert_one_line_error(run_cli("quantize", dense_src, cwd=tmp_path))
    assert "OUTPUT" in line and list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_plan_table_and_writes_nothing(dense_src, tmp_path):
    before = file_hashes(dense_src)
    r = run_cli("quantize", dense_src, tmp_path / "out", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    assert file_hashes(dense_src) == before
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    n_fp8 = len(language_linears(read_config(dense_src)))
    assert "FP8" in rows["language linears"] and f" {n_fp8} " in rows["language linears"]
    assert "keep" in rows["vision tower"] and "keep" in rows["lm_head"] and "keep" in rows["embeddings"]
    assert f" {len(load_tensors(dense_src))} " in rows["total"]


def test_quantize_command_writes_what_the_api_writes(dense_fp8, tmp_path):
    out = tmp_path / "out"
    r = run_cli("quantize", dense_fp8.src, out, "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got, api = file_hashes(out), file_hashes(dense_fp8.out)
    assert "fp8vl quantize" in (out / "README.md").read_text()
    got.pop("README.md"), api.pop("README.md")
    assert got == api


# ---------------------------------------------------------------- signals mid-run

@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    """512 MB of BF16 linears: about a second of conversion with one worker, long enough to interrupt."""
    src = tmp_path_factory.mktemp("big") / "src"
    src.mkdir()
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.full((4096, 4096), 0.01 * (i + 1),
                                                                      dtype=torch.bfloat16) for i in range(16)}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    yield src
    shutil.rmtree(src)


def start_and_signal(src, out, sig):
    """Start a conversion, send ``sig`` as soon as its staging folder exists; return (process, stdout, stderr,
    staging folders left)."""
    p = popen_cli("quantize", src, out, "--workers", "1", "--max-shard-size", "32MB", cwd=out.parent)
    pattern = str(out.parent / f".{out.name}.fp8vl-partial-*")
    deadline = time.monotonic() + 60
    while not glob.glob(pattern) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, "conversion ended before it could be interrupted"
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    return p, stdout, stderr, glob.glob(pattern)


def test_sigkill_mid_run_leaves_no_output(big_src, tmp_path):
    out = tmp_path / "out"
    p, _, _, staging = start_and_signal(big_src, out, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    assert staging, "killed before the staging folder existed: not mid-run"
    assert not out.exists()
    for s in staging:
        shutil.rmtree(s)


@pytest.fixture(scope="module")
def sigint_run(big_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigint") / "out"
    p, stdout, stderr, staging = start_and_signal(big_src, out, signal.SIGINT)
    return p.returncode, stdout, stderr, staging, out


def test_sigint_mid_run_exits_130_and_leaves_nothing(sigint_run):
    rc, _, stderr, staging, out = sigint_run
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and staging == []
    assert list(out.parent.iterdir()) == []


def test_sigint_mid_run_tells_the_user_it_was_interrupted(sigint_run):
    _, _, stderr, _, _ = sigint_run
    assert "interrupted" in stderr


# ---------------------------------------------------------------- start-up: no torch where none is needed

HEAVY = ("torch", "transformers", "openai", "triton")


def imported_by(args: list[str], cwd) -> dict:
    """Run ``fp8vl ARGS`` inside a fresh interpreter; which heavy modules it imported, and its exit code."""
    code = ("import json, sys\nfrom fp8vl.cli import main\nsys.argv = ['fp8vl', *json.loads(sys.argv[1])]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) for a in args])], capture_output=True,
                       text=True, cwd=cwd, env=cli_env(), timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_plan_serve_and_doctor_start_without_torch(dense_fp8, tmp_path):
    from fp8vl.gpus import gpu_driver_present

    assert imported_by(["--help"], tmp_path) == {"rc": 0, "heavy": []}
    assert imported_by(["plan", dense_fp8.out, "--gpu", "RTX 4080"], tmp_path) == {"rc": 0, "heavy": []}
    assert imported_by(["serve", dense_fp8.out, "--vram", "16GiB", "--dry-run"], tmp_path) == {"rc": 0, "heavy": []}
    doctor = imported_by(["doctor", "--output-dir", tmp_path], tmp_path)
    # with a GPU driver, doctor asks PyTorch what it sees (that is the check); without one it must not
    assert doctor["heavy"] == (["torch"] if gpu_driver_present() else [])
    # the package API is still there, imported on first use
    code = "import sys, fp8vl; assert 'torch' not in sys.modules; from fp8vl import quantize, Result; " \
           "print(fp8vl.quantize is quantize, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.stdout.split() == ["True", "True"], r.stderr
