"""fp8vl.checkpoint.source: what a SOURCE folder may hold: index paths, symlinks, config shapes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fp8vl import FP8VLError, QuantizeOptions, quantize
from fp8vl.conversion.dequantize import dequantize
from fp8vl.check.verify import verify
from helpers import INDEX, file_hashes, run_cli


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- index paths

@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_naming_a_shard_outside_source_is_refused_before_opening_it(dense_src, tmp_path, where):
    src = copy(dense_src, tmp_path / "src")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"\xff" * 64)          # were it opened and parsed, it would fail as a corrupt header
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    from fp8vl.checkpoint.shards import read_header
    infos, _ = read_header(src / "model-00001-of-00001.safetensors")
    wmap = {n: "model-00001-of-00001.safetensors" for n in infos}
    victim = sorted(infos)[0]
    wmap[victim] = "../outside.safetensors" if where == "parent" else str(outside)
    (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    with pytest.raises(FP8VLError) as ei:
        quantize(src, tmp_path / "out", QuantizeOptions())
    msg = str(ei.value)
    assert str(src / INDEX) in msg and wmap[victim] in msg and "outside" in msg, msg
    assert "corrupt" not in msg and "is not there" not in msg
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- symlinks

def test_a_source_made_of_symlinks_like_the_hub_cache_converts(dense_src, dense_fp8, tmp_path):
    """The hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in sorted(dense_src.iterdir()):
        if f.is_file():
            shutil.copyfile(f, blobs / f.name)
            os.symlink(os.path.relpath(blobs / f.name, snap), snap / f.name)
    quantize(snap, tmp_path / "out", QuantizeOptions())
    got, want = file_hashes(tmp_path / "out"), file_hashes(dense_fp8.out)
    got.pop("README.md"), want.pop("README.md")
    assert got == want


@pytest.mark.parametrize("link", ["extra.txt", "sub/extra.json"])
def test_a_dangling_symlink_in_source_is_named_in_one_line(dense_src, tmp_path, link):
    src = copy(dense_src, tmp_path / "src")
    (src / link).parent.mkdir(exist_ok=True)
    os.symlink(tmp_path / "gone", src / link)
    with pytest.raises(FP8VLError) as ei:
        quantize(src, tmp_path / "out", QuantizeOptions())
    msg = str(ei.value)
    assert str(src / link) in msg and "broken symlink" in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_a_dangling_symlink_through_the_cli_is_exit_2(dense_src, tmp_path):
    src = copy(dense_src, tmp_path / "src")
    os.symlink(tmp_path / "gone", src / "tokenizer.json.bak")
    r = run_cli("quantize", src, tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(src / "tokenizer.json.bak") in r.stderr


# ---------------------------------------------------------------- config shapes

CONFIGS = {
    "config is a list": lambda cfg: [cfg],
    "text_config null": lambda cfg: {**cfg, "text_config": None},
    "text_config a string": lambda cfg: {**cfg, "text_config": "qwen3"},
    "quantization_config a list": lambda cfg: {**cfg, "quantization_config": ["fp8"]},
}


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize("command", ["quantize", "dequantize", "verify"])
def test_config_of_the_wrong_shape_is_one_line_naming_config_json(dense_src, dense_fp8, tmp_path, case, command):
    src = copy(dense_src if command == "quantize" else dense_fp8.out, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(CONFIGS[case](cfg)))
    run = {"quantize": lambda: quantize(src, tmp_path / "out", QuantizeOptions()),
           "dequantize": lambda: dequantize(src, tmp_path / "out"),
           "verify": lambda: verify(src)}[command]
    with pytest.raises(FP8VLError) as ei:
        run()
    assert str(src / "config.json") in str(ei.value) and "\n" not in str(ei.value), ei.value
    assert not (tmp_path / "out").exists()
