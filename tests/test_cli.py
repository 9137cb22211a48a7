"""The ``fp8vl quantize`` command as a user runs it: a real subprocess, exit codes, one-line errors, signals."""

from __future__ import annotations

import glob
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import (BAD_CASES, astronaut, cli_env, file_hashes, language_linears, load_tensors, popen_cli,
                     read_config, run_cli)


def assert_one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


# Every bad input is judged through the API in conversion/test_convert.py; the command is checked on three of
# them for what the CLI adds: exit code 2, one line, no traceback, nothing written.
CLI_CASES = ("missing folder", "corrupt header", "output not empty")
assert set(CLI_CASES) <= set(BAD_CASES)


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_input_exits_2_with_a_one_line_error_and_no_traceback(bad_inputs, case, tmp_path):
    bad = bad_inputs[case]
    line = assert_one_line_error(run_cli("quantize", bad.source, bad.output, cwd=tmp_path))
    for fragment in bad.fragments:
        assert fragment in line
    if case == "output not empty":
        assert [p.name for p in bad.output.iterdir()] == ["keep-me.txt"]
    else:
        assert not bad.output.exists()


def test_unknown_option_gets_clicks_usage_message_and_exit_2_without_traceback(tmp_path):
    r = run_cli("quantize", "--no-such-flag", cwd=tmp_path)
    assert r.returncode == 2 and "No such option: --no-such-flag" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    v = run_cli("--version", cwd=tmp_path)
    from fp8vl.version import __version__
    assert v.returncode == 0 and v.stdout.strip() == f"fp8vl {__version__}", (v.stdout, v.stderr)


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

def start_and_signal(src, out, sig):
    """Start a conversion, send ``sig`` as soon as its staging folder exists; return (process, stdout, stderr,
    staging folders left)."""
    p = popen_cli("quantize", src, out, "--workers", "1", "--max-shard-size", "32MB", cwd=out.parent)
    pattern = str(out.parent / f".{out.name}.fp8vl-partial*")
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


def run_in_process(args: list[str], cwd) -> dict:
    """Run ``fp8vl ARGS`` inside a fresh interpreter: its exit code, stderr, and which heavy modules it
    had imported when it ended."""
    code = ("import json, sys\nfrom fp8vl.cli import main\nsys.argv = ['fp8vl', *json.loads(sys.argv[1])]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) for a in args])], capture_output=True,
                       text=True, cwd=cwd, env=cli_env(), timeout=120)
    *printed, last = r.stdout.rstrip("\n").split("\n")
    return {**json.loads(last), "stdout": printed, "stderr": r.stderr}


def imported_by(args: list[str], cwd) -> dict:
    """Run ``fp8vl ARGS`` inside a fresh interpreter; which heavy modules it imported, and its exit code."""
    done = run_in_process(args, cwd)
    return {"rc": done["rc"], "heavy": done["heavy"]}


def test_help_plan_serve_and_doctor_start_without_torch(dense_fp8, tmp_path):
    from fp8vl.serving.gpus import gpu_driver_present

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


def test_sigterm_mid_run_cleans_up_like_ctrl_c_and_exits_143(big_src, tmp_path):
    """`timeout`, SLURM and `docker stop` send SIGTERM: the staging folder and the lock go, exit 128 + 15."""
    out = tmp_path / "out"
    p, _, stderr, staging = start_and_signal(big_src, out, signal.SIGTERM)
    assert p.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated" in stderr
    assert staging == [] and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- one writer per OUTPUT, stale staging

# A real conversion (the API in its own process) that holds OUTPUT mid-run until the file GO exists.
PAUSED = r"""
import sys, time, pathlib
from fp8vl import QuantizeOptions, quantize
go = pathlib.Path(sys.argv[3])
def progress(done, total):
    while not go.exists():
        time.sleep(0.01)
quantize(sys.argv[1], sys.argv[2], QuantizeOptions(workers=1), progress=progress)
print("DONE")
"""


def start_paused(src, out, go):
    import subprocess
    import sys

    from helpers import ROOT, cli_env
    p = subprocess.Popen([sys.executable, "-c", PAUSED, str(src), str(out), str(go)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    deadline = time.monotonic() + 120
    while not glob.glob(str(out.parent / f".{out.name}.fp8vl-partial*")) and p.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()
    time.sleep(0.5)     # well inside the run: the first job is done and progress() waits
    return p


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(dense_src, tmp_path, overwrite):
    out, go = tmp_path / "work" / "out", tmp_path / "go"
    first = start_paused(dense_src, out, go)
    try:
        r = run_cli("quantize", dense_src, out, "--workers", "1", *(["--overwrite"] if overwrite else []),
                    cwd=tmp_path)
        line = assert_one_line_error(r)
        assert str(out) in line and "another fp8vl run" in line
        assert first.poll() is None
    finally:
        go.touch()
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0 and "DONE" in stdout, stderr[-2000:]
    assert [p.name for p in out.parent.iterdir()] == ["out"]     # no staging folder, no lock file


def test_rerun_after_sigkill_removes_the_stale_staging_folder_and_says_so(dense_src, dense_fp8, tmp_path):
    out, go = tmp_path / "work" / "out", tmp_path / "go"
    killed = start_paused(dense_src, out, go)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    stale = [p.name for p in out.parent.iterdir()]
    assert any("fp8vl-partial" in n for n in stale), stale         # the OOM killer's leftovers
    r = run_cli("quantize", dense_src, out, "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr
    staging = next(n for n in stale if "fp8vl-partial" in n)
    assert "removed" in said and staging in said and f"pid {killed.pid}" in said, said
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    got, api = file_hashes(out), file_hashes(dense_fp8.out)
    got.pop("README.md"), api.pop("README.md")
    assert got == api


# ---------------------------------------------------------------- headers the safetensors library rejects

def overlap_header(folder):
    """Point the second of two same-sized tensors at the first one's bytes (its own become a gap)."""
    import struct

    shard = sorted(folder.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    by_size = {}
    for name, h in header.items():
        if name != "__metadata__":
            by_size.setdefault((h["dtype"], h["data_offsets"][1] - h["data_offsets"][0]), []).append(name)
    a, b = next(v for (_, size), v in by_size.items() if len(v) >= 2 and size > 0)[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    shard.write_bytes(struct.pack("<Q", len(js)) + js + raw[8 + n:])
    return shard, a, b


@pytest.mark.parametrize("what", ["quantize", "verify"])
def test_overlapping_data_offsets_are_refused_in_one_line(dense_src, dense_fp8, tmp_path, what):
    folder = tmp_path / "overlap"
    shutil.copytree(dense_src if what == "quantize" else dense_fp8.out, folder)
    shard, a, b = overlap_header(folder)
    args = ("quantize", folder, tmp_path / "out") if what == "quantize" else ("verify", folder)
    line = assert_one_line_error(run_cli(*args, cwd=tmp_path))
    assert str(shard) in line and (f"'{a}'" in line or f"'{b}'" in line), line
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_and_only_when_asked(tmp_path):
    missing = tmp_path / "nope"
    plain = run_cli("quantize", missing, tmp_path / "out")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and str(missing) in plain.stderr
    debug = run_cli("--debug", "quantize", missing, tmp_path / "out")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FP8VLError" in debug.stderr


# ---------------------------------------------------------------- path arguments, refused at once

def _refusals(dense_src, dense_fp8, tmp_path) -> dict[str, tuple[list, str]]:
    """case -> (fp8vl's arguments, run in tmp_path; the one error line they must give)."""
    images = tmp_path / "images"
    images.mkdir()
    astronaut().resize((64, 64)).save(images / "a.png")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep-me.txt").write_text("x")
    return {
        "quantize ./missing": (["quantize", "./nope", "out"], "no such folder: ./nope"),
        "quantize ../missing": (["quantize", "../nope", "out"], "no such folder: ../nope"),
        "quantize /missing": (["quantize", tmp_path / "nope", "out"], f"no such folder: {tmp_path / 'nope'}"),
        "quantize a name that is no hub id": (["quantize", "nope", "out"], "no such folder: nope; a hub repo id"),
        "quantize into a full OUTPUT": (["quantize", dense_src, full], f"{full}: exists and is not empty"),
        "quantize into SOURCE": (["quantize", dense_src, dense_src / "fp8"],
                                 f"{dense_src / 'fp8'}: OUTPUT must not be SOURCE or inside it"),
        "quantize a hub id into a full OUTPUT": (["quantize", "org/name", full], f"{full}: exists and is not empty"),
        "dequantize ./missing": (["dequantize", "./nope", "out"], "no such folder: nope"),
        "dequantize into a full OUTPUT": (["dequantize", dense_fp8.out, full], f"{full}: exists and is not empty"),
        "verify ./missing": (["verify", "./nope"], "no such folder: nope"),
        "verify --source ./missing": (["verify", dense_fp8.out, "--source", "./nope"], "no such folder: ./nope"),
        "eval ./missing source": (["eval", "./no-such-model", dense_fp8.out], "no such folder: ./no-such-model"),
        "eval ./missing copy": (["eval", dense_fp8.src, "./no-such-model"], "no such folder: no-such-model"),
        "caption --model ./missing": (["caption", images, "--model", "./no-such-model"],
                                      "no such folder: ./no-such-model"),
        "plan ./missing": (["plan", "./nope", "--vram", "16GiB"], "no such folder: nope"),
        "doctor --model ./missing": (["doctor", "--model", "./nope"], "no such folder: nope"),
    }


REFUSALS = ("quantize ./missing", "quantize ../missing", "quantize /missing", "quantize a name that is no hub id",
            "quantize into a full OUTPUT", "quantize into SOURCE", "quantize a hub id into a full OUTPUT",
            "dequantize ./missing", "dequantize into a full OUTPUT", "verify ./missing", "verify --source ./missing",
            "eval ./missing source", "eval ./missing copy", "caption --model ./missing", "plan ./missing",
            "doctor --model ./missing")


@pytest.mark.parametrize("case", REFUSALS)
def test_a_path_argument_is_checked_first_in_one_line_without_the_hub_or_torch(dense_src, dense_fp8, tmp_path,
                                                                                case):
    """Anything written as a path (./, ../, /, ~) or existing is a local path, and a missing one is "no such
    folder" (never a hub error); an OUTPUT that exists is refused too; all of it before torch and
    Transformers are imported (seconds), so the answer comes at once. (The hub is offline here: a name
    that reached it would answer with a hub message, not these.)"""
    args, line = _refusals(dense_src, dense_fp8, tmp_path)[case]
    done = run_in_process(args, tmp_path)
    lines = done["stderr"].strip().splitlines()
    assert done["rc"] == 2 and len(lines) == 1 and lines[0].startswith(f"error: {line}"), done
    assert "Traceback" not in done["stderr"] and "hf download" not in done["stderr"]
    assert done["heavy"] == [] and done["stdout"] == [], done       # nothing before it (no progress bar drawn)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_caption_in_process_device_cuda_without_a_gpu_is_one_line_with_the_fix(dense_fp8, tmp_path):
    astronaut().resize((64, 64)).save(tmp_path / "a.png")
    r = run_cli("caption", tmp_path, "--model", dense_fp8.out, "--device", "cuda", cwd=tmp_path)
    line = assert_one_line_error(r)
    assert line.startswith("error: --device cuda: ") and "--device cpu" in line, line
    assert not (tmp_path / "a.txt").exists()


def test_caption_summary_says_where_an_in_process_run_ran():
    from rich.console import Console

    from fp8vl.apps.caption_options import CaptionSummary
    from fp8vl.report import print_caption_summary

    for device, said in (("cpu", "(tiny (fp8 w8a8)) on cpu"), ("cuda", "on cuda"), (None, "(tiny (fp8 w8a8))\n")):
        console = Console(record=True, width=300)
        print_caption_summary(CaptionSummary(done=1, seconds=1.0, model="tiny (fp8 w8a8)"), console, device)
        assert said in console.export_text(), console.export_text()


# ---------------------------------------------------------------- pasteable output

def test_text_from_data_prints_as_is_not_as_rich_markup():
    """Paths, messages and fixes can hold [word]: rich would read it as a style and drop it."""
    from rich.console import Console

    from fp8vl.apps.doctor import Finding
    from fp8vl.check.verify import Check, Report
    from fp8vl.report import print_doctor, print_verify

    console = Console(record=True, width=400)
    print_doctor([Finding("warning", "vllm [serve]", "[bold]not[/bold] installed", "pip install 'fp8vl[serve]'")],
                 console)
    print_verify(Report("/models/x [v2]", "fp8", [Check("error", "config", "expected [red]x[/red]")]), console)
    text = console.export_text()
    for literal in ("vllm [serve]", "[bold]not[/bold] installed", "pip install 'fp8vl[serve]'", "/models/x [v2]",
                    "expected [red]x[/red]"):
        assert literal in text, (literal, text)


@pytest.mark.parametrize("command", [[], ["quantize"], ["verify"], ["eval"], ["caption"], ["serve"]])
def test_help_shows_flags_as_plain_switches(command, tmp_path):
    """typer 0.2x's rich help wrote `--debug <bool>`, as if the flag took a value."""
    r = run_cli(*command, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "<bool>" not in r.stdout and "Usage: fp8vl" in r.stdout, r.stdout
    flag = {(): "--debug", ("quantize",): "--dry-run", ("verify",): "--vllm", ("eval",): "--update-card",
            ("caption",): "--overwrite", ("serve",): "--enforce-eager"}[tuple(command)]
    for name in (flag, "--help"):
        row = next(line for line in r.stdout.splitlines() if f"{name} " in line)
        assert re.search(rf"{name}\s+[^<\s]", row), row        # the help text, no type, follows the switch
    if command == ["quantize"]:       # options that take a value still show its type
        assert re.search(r"--workers\s+<int>", r.stdout) and re.search(r"--dry-run\s+print the plan", r.stdout)


def test_device_cuda_without_a_gpu_driver_is_refused_before_torch_loads(dense_fp8, tmp_path):
    """Where the OS shows no GPU device (Linux without /dev/nvidiactl, ...), --device cuda needs no torch
    import (seconds) to be refused."""
    from fp8vl.options import gpu_driver_present

    if gpu_driver_present():
        pytest.skip("a GPU driver is present: PyTorch is asked")
    done = run_in_process(["eval", dense_fp8.src, dense_fp8.out, "--device", "cuda"], tmp_path)
    assert done["rc"] == 2 and done["heavy"] == [], done
    assert done["stderr"].startswith("error: --device cuda: no GPU driver here"), done
