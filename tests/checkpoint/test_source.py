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


# ---------------------------------------------------------------- a path or a hub id

@pytest.mark.parametrize("arg", ["./nope", "../nope", "/nope-fp8vl", "~/nope-fp8vl", "./org/name", ".", "nope",
                                 "org/name/extra", "org/-name", "org/name.", "org/a--b", "org/a..b", "org/né"])
def test_only_a_well_formed_org_name_that_is_no_local_path_is_a_hub_id(arg, tmp_path, monkeypatch):
    from fp8vl.checkpoint.source import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert not is_hub_id(arg)
    (tmp_path / "org" / "name").mkdir(parents=True)   # an existing folder wins over the hub
    assert not is_hub_id("org/name") and not is_hub_id(Path("elsewhere/name"))


@pytest.mark.parametrize("arg", ["Qwen/Qwen3-VL-8B-Instruct", "prithivMLmods/Qwen3-VL-8B-Instruct-abliterated",
                                 "a/b", "org_x/model.v2_final"])
def test_a_well_formed_org_name_is_a_hub_id_and_one_the_hub_takes(arg, tmp_path, monkeypatch):
    from huggingface_hub.utils import validate_repo_id

    from fp8vl.checkpoint.source import is_hub_id, locate

    monkeypatch.chdir(tmp_path)
    validate_repo_id(arg)
    assert is_hub_id(arg) and locate(arg) == arg


@pytest.mark.parametrize("arg", ["./nope", "../nope", "nope"])
def test_a_missing_local_source_is_no_such_folder_through_every_api(arg, dense_fp8, tmp_path, monkeypatch):
    """quantize, dequantize, verify (both arguments), eval (both) and the loader name the folder as given."""
    from fp8vl.check.evaluate import evaluate
    from fp8vl.runtime.loader import load_any

    monkeypatch.chdir(tmp_path)
    calls = [lambda: quantize(arg, "out"), lambda: dequantize(arg, "out"), lambda: verify(arg),
             lambda: verify(dense_fp8.out, arg), lambda: evaluate(arg, dense_fp8.out, []),
             lambda: evaluate(dense_fp8.src, arg, []), lambda: load_any(arg)]
    for call in calls:
        with pytest.raises(FP8VLError, match=r"^no such folder: (\./|\.\./)?nope") as e:
            call()
        assert "\n" not in str(e.value) and "hf download" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
