"""fp8vl.conversion.staging: what OUTPUT may be replaced, free space checked up front, a disk that fills anyway.

Disk-full cases run on a real small tmpfs (mounted here; skipped where mounting is not allowed);
the up-front check also runs on the real filesystem, with a sparse source whose plan is larger
than its free space.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fp8vl import FP8VLError, QuantizeOptions, quantize
from fp8vl.conversion.dequantize import dequantize
from fp8vl.options import DequantizeOptions
from helpers import ROOT, cli_env, file_hashes


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- --overwrite

def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(dense_src, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    (thesis / "figures").mkdir()
    before = file_hashes(thesis)
    with pytest.raises(FP8VLError) as ei:
        quantize(dense_src, thesis, QuantizeOptions(overwrite=True))
    msg = str(ei.value)
    assert str(thesis) in msg and "config.json" in msg and "chapter1.tex" in msg, msg
    assert file_hashes(thesis) == before and listing(tmp_path) == ["thesis"]


def test_overwrite_refuses_a_file_and_leaves_nothing_beside_it(dense_src, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("not a checkpoint")
    with pytest.raises(FP8VLError, match="is a file"):
        quantize(dense_src, target, QuantizeOptions(overwrite=True))
    assert target.read_text() == "not a checkpoint" and listing(tmp_path) == ["notes.txt"]


def test_overwrite_replaces_an_earlier_output_and_leaves_nothing_beside_it(dense_fp8, tmp_path):
    out = tmp_path / "out"
    quantize(dense_fp8.src, out, QuantizeOptions(scale_dtype="bfloat16"))
    quantize(dense_fp8.src, out, QuantizeOptions(overwrite=True))
    got, first = file_hashes(out), file_hashes(dense_fp8.out)
    got.pop("README.md"), first.pop("README.md")
    assert got == first and listing(tmp_path) == ["out"]


# ---------------------------------------------------------------- free space, up front

def sparse_checkpoint(folder: Path, tensors: dict[str, tuple[str, list[int], int]], config: dict) -> Path:
    """A checkpoint whose data section is a hole: {name: (dtype, shape, itemsize)}; costs no disk."""
    folder.mkdir(parents=True)
    header, pos = {}, 0
    for name, (dtype, shape, item) in tensors.items():
        n = item
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        f.truncate(8 + len(js) + pos)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def needs(msg: str) -> float:
    """Bytes from "needs 12.3 GB" / "needs 4.5 MB" in an error message."""
    m = re.search(r"needs ([0-9.]+) (GB|MB)", msg)
    assert m, msg
    return float(m.group(1)) * (1e9 if m.group(2) == "GB" else 1e6)


def rows_for(nbytes: int, k: int) -> int:
    return -(-nbytes // k // 128) * 128


def never(done, total):
    raise AssertionError("writing started although the output cannot fit")


def test_quantize_refuses_up_front_when_the_output_cannot_fit(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    k = 8192
    n = rows_for(2 * free, k)               # FP8 output: one byte per weight, twice the free space
    src = sparse_checkpoint(tmp_path / "src", {"model.layers.0.mlp.down_proj.weight": ("BF16", [n, k], 2)},
                            {"model_type": "qwen3"})
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(FP8VLError) as ei:
        quantize(src, parent / "out", QuantizeOptions(workers=1), progress=never)
    msg = str(ei.value)
    assert str(parent / "out") in msg and n * k - 5e7 <= needs(msg) <= 1.01 * n * k and "free" in msg, msg
    assert listing(parent) == []


def test_dequantize_refuses_up_front_when_the_output_cannot_fit(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    k = 8192
    n = rows_for(free, k)                   # BF16 output: two bytes per FP8 weight, twice the free space
    src = sparse_checkpoint(tmp_path / "src", {
        "model.layers.0.mlp.down_proj.weight": ("F8_E4M3", [n, k], 1),
        "model.layers.0.mlp.down_proj.weight_scale_inv": ("F32", [n // 128, k // 128], 4)},
        {"model_type": "qwen3", "quantization_config": {"quant_method": "fp8"}})
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(FP8VLError) as ei:
        dequantize(src, parent / "out", progress=never)
    msg = str(ei.value)
    assert 2 * n * k - 5e7 <= needs(msg) <= 1.01 * 2 * n * k and "free" in msg, msg
    assert listing(parent) == []


# ---------------------------------------------------------------- a small real filesystem

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def linear_source(folder: Path, mb: int) -> Path:
    """A text-model source of ``mb`` MB of BF16 linears in 4 MB tensors."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.mlp.down_proj.weight": torch.randn(1024, 2048, generator=g).bfloat16()
               for i in range(mb // 4)}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return folder


def fill(disk: Path) -> None:
    """Write until the filesystem is full."""
    with open(disk / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_quantize_onto_a_too_small_disk_is_refused_up_front(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 64)          # 32 MB of FP8 for a 24 MB disk
    with pytest.raises(FP8VLError, match="free") as ei:
        quantize(src, small_disk / "out", QuantizeOptions(workers=1), progress=never)
    assert 32 << 20 <= needs(str(ei.value)) <= 40 << 20, ei.value
    assert listing(small_disk) == []


def filling_progress(disk: Path):
    calls = []

    def progress(done, total):
        if not calls:
            fill(disk)
        calls.append(done)
    return progress


def test_quantize_when_the_disk_fills_anyway_gives_one_line_and_leaves_nothing(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 16)          # 8 MB of FP8: fits, until something else fills the disk
    with pytest.raises(FP8VLError) as ei:
        quantize(src, small_disk / "out", QuantizeOptions(workers=1, max_shard_size=2_000_000),
                 progress=filling_progress(small_disk))
    msg = str(ei.value)
    assert "no space left" in msg.lower() and str(small_disk / "out") in msg and "\n" not in msg, msg
    assert [n for n in listing(small_disk) if not n.startswith("filler-")] == []


def test_dequantize_when_the_disk_fills_anyway_gives_one_line_and_leaves_nothing(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 16)
    fp8 = tmp_path / "fp8"
    quantize(src, fp8, QuantizeOptions())
    with pytest.raises(FP8VLError) as ei:
        dequantize(fp8, small_disk / "out", DequantizeOptions(workers=1, max_shard_size=2_000_000),
                   progress=filling_progress(small_disk))
    assert "no space left" in str(ei.value).lower()
    assert [n for n in listing(small_disk) if not n.startswith("filler-")] == []


# The CLI, as a user runs it, while another program fills the disk mid-run.
FILL_MID_RUN = r"""
import sys, threading, time, uuid, pathlib
disk = pathlib.Path(sys.argv[1])
def filler():
    while not any(disk.glob(".out.fp8vl-partial/**/*.safetensors")):
        time.sleep(0.001)
    with open(disk / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16)); f.flush()
        except OSError:
            pass
threading.Thread(target=filler, daemon=True).start()
sys.argv = ["fp8vl", "quantize", sys.argv[2], str(disk / "out"), "--workers", "1", "--max-shard-size", "2MB"]
from fp8vl.cli import main
main()
"""


def test_cli_disk_full_mid_run_is_one_line_exit_2(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 32)
    r = subprocess.run([sys.executable, "-c", FILL_MID_RUN, str(small_disk), str(src)], capture_output=True,
                       text=True, env=cli_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left" in lines[0].lower(), r.stderr
    assert [n for n in listing(small_disk) if not n.startswith("filler-")] == []
