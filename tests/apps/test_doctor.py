"""``fp8vl doctor``: what is installed, GPU, RAM and disk, with a fix for each problem."""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
import shutil

import pytest
import torch

from fp8vl.apps.doctor import diagnose
from fp8vl.serving.gpus import GIB
from helpers import ROOT, run_cli


def _has(package: str) -> bool:
    try:
        md.version(package)
        return True
    except md.PackageNotFoundError:
        return False


def by_name(findings) -> dict:
    out = {}
    for f in findings:
        assert f.what not in out, f"{f.what} reported twice"
        assert f.level in ("ok", "warning", "error")
        out[f.what] = f
    return out


def free_gb(detail: str) -> float:
    m = re.search(r"([0-9.]+) GB free", detail)
    assert m, detail
    return float(m.group(1))


def test_findings_cover_python_torch_transformers_gpu_ram_and_disk(tmp_path):
    f = by_name(diagnose(tmp_path))
    for what in ("python", "torch", "transformers", "vllm", "compressed-tensors", "torch CUDA build", "GPU",
                 "RAM", "disk"):
        assert what in f, what
    assert f["python"].level == "ok" and f["python"].detail == platform.python_version()
    assert f["torch"].level == "ok" and f["torch"].detail == md.version("torch")
    assert f["transformers"].level == "ok" and f["transformers"].detail == md.version("transformers")
    assert f["compressed-tensors"].level == "ok" and f["compressed-tensors"].detail == md.version("compressed-tensors")
    assert f["torch CUDA build"].detail == (torch.version.cuda or "CPU-only build")


def test_missing_optional_vllm_is_a_warning_with_the_install_command(tmp_path):
    f = by_name(diagnose(tmp_path))["vllm"]
    try:
        version = md.version("vllm")
    except md.PackageNotFoundError:
        version = None
    if version is None:
        assert f.level == "warning" and f.detail == "not installed"
        assert "pip install 'fp8vl[serve]'" in f.fix                     # what the README and `serve` say
        assert "pip install 'fp8vl[serve]'" in (ROOT / "README.md").read_text()
    else:
        assert f.detail == version


def test_gpu_finding_matches_what_torch_sees(tmp_path):
    f = by_name(diagnose(tmp_path))["GPU"]
    if not torch.cuda.is_available():
        assert f.level == "warning" and "no CUDA GPU" in f.detail and f.fix
    else:
        p = torch.cuda.get_device_properties(0)
        assert p.name in f.detail and f"{p.total_memory / GIB:.1f} GiB" in f.detail
        assert f.level == ("ok" if (p.major, p.minor) >= (8, 9) else "warning" if p.major >= 8 else "error")


def test_ram_finding_reports_total_memory(tmp_path):
    import psutil

    f = by_name(diagnose(tmp_path))["RAM"]
    total = psutil.virtual_memory().total
    assert f"{total / GIB:.1f} GiB total" in f.detail
    assert f.level == ("ok" if total >= 4 * GIB else "warning")


def test_disk_finding_reports_free_space_where_the_output_goes(tmp_path):
    f = by_name(diagnose(tmp_path, need_bytes=1000))["disk"]
    assert f.level == "ok" and str(tmp_path.resolve()) in f.detail
    assert abs(free_gb(f.detail) - shutil.disk_usage(tmp_path).free / 1e9) < 0.5


def test_output_folder_not_yet_created_is_probed_at_its_parent(tmp_path):
    f = by_name(diagnose(tmp_path / "not-yet"))["disk"]
    assert str(tmp_path.resolve()) in f.detail and f.level == "ok"


def test_needing_more_than_the_free_disk_is_an_error_with_a_fix(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    f = by_name(diagnose(tmp_path, need_bytes=free + 10**12))["disk"]
    assert f.level == "error" and f.fix
    assert f"{(free + 10**12) / 1e9:.1f} GB needed" in f.detail


def test_no_errors_on_this_machine(tmp_path):
    errors = [f for f in diagnose(tmp_path) if f.level == "error"]
    assert errors == []


def rows(stdout: str) -> dict[str, list[str]]:
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0]:
            out[cells[0]] = cells
    return out


def test_doctor_command_exits_0_and_prints_the_table(tmp_path):
    r = run_cli("doctor", "--output-dir", tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fp8vl doctor" in r.stdout
    table = rows(r.stdout)
    expected = by_name(diagnose(tmp_path))
    for what in ("python", "torch", "transformers", "GPU", "RAM", "disk"):
        assert table[what][1] == expected[what].level, (what, table.get(what))
    assert table["python"][2] == platform.python_version()
    assert "error" not in {cells[1] for cells in table.values()}


def test_doctor_command_with_a_model_bigger_than_the_disk_exits_1(tmp_path):
    """--model's shards (a sparse file: no disk used) need 2/3 of their size, more than is free."""
    model = tmp_path / "huge-model"
    model.mkdir()
    size = 2 * shutil.disk_usage(tmp_path).free
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(size)
    r = run_cli("doctor", "--output-dir", tmp_path, "--model", model, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    disk = rows(r.stdout)["disk"]
    assert disk[1] == "error" and disk[3]
    assert "Traceback" not in r.stderr


def test_an_installed_package_older_than_required_is_an_error_with_the_upgrade(tmp_path, monkeypatch):
    """transformers reported as 4.57.1 (fp8vl needs 5): an error naming both versions and the pip
    command that upgrades it; versions read from package metadata, here replaced."""
    real = md.version
    monkeypatch.setattr(md, "version", lambda pkg: "4.57.1" if pkg == "transformers" else real(pkg))
    f = by_name(diagnose(tmp_path))["transformers"]
    assert f.level == "error" and "4.57.1 is older than 5" in f.detail
    assert "pip install -U 'transformers>=5" in f.fix


@pytest.mark.skipif(shutil.which("vllm") is not None or _has("vllm"), reason="the vllm fix shows only without vLLM")
def test_doctor_prints_the_install_command_as_it_pastes(tmp_path):
    """The fix column is a command to paste: rich must not read `[serve]` as markup and drop it."""
    r = run_cli("doctor", "--output-dir", tmp_path, cwd=tmp_path)
    assert "pip install 'fp8vl[serve]'" in r.stdout, r.stdout
