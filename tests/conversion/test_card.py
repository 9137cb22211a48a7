"""fp8vl.conversion.card: the output's model card links only hub ids, names the output as it is, leaks no local path."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

from fp8vl import QuantizeOptions, quantize
from helpers import run_cli

HUB_LINK = re.compile(r"https://huggingface\.co/([^)\s]+)")


def front(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def test_local_source_card_links_nothing_serves_the_output_and_leaks_no_path(dense_src, tmp_path):
    out = tmp_path / "deep" / "My-Model-FP8"
    quantize(dense_src, out, QuantizeOptions(scale_dtype="bfloat16", ignore=("*.mlp.down_proj",)))
    text = (out / "README.md").read_text()
    assert HUB_LINK.findall(text) == []                         # a local folder is not a hub repo
    assert "vllm serve My-Model-FP8 " in text
    assert "fp8vl quantize tiny-dense My-Model-FP8 --scale-dtype bfloat16 --ignore '*.mlp.down_proj'" in text
    for local in (str(tmp_path), str(dense_src), str(Path.home()), os.getcwd()):
        assert local not in text


def test_hub_snapshot_source_links_the_repo_and_the_command_names_it(dense_src, tmp_path):
    snap = tmp_path / "hub" / "models--acme--Tiny-VL" / "snapshots" / "0123abcd"
    shutil.copytree(dense_src, snap)
    out = tmp_path / "Tiny-VL-FP8"
    quantize(snap, out, QuantizeOptions())
    text = (out / "README.md").read_text()
    assert front(text)["base_model"] == "acme/Tiny-VL"
    assert set(HUB_LINK.findall(text)) == {"acme/Tiny-VL"}
    assert "fp8vl quantize acme/Tiny-VL Tiny-VL-FP8" in text and "vllm serve Tiny-VL-FP8 " in text
    assert str(tmp_path) not in text


def test_cli_card_has_no_absolute_path_from_the_command_line(dense_src, tmp_path):
    out = tmp_path / "cli-out"
    r = run_cli("quantize", dense_src.resolve(), out.resolve(), "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (out / "README.md").read_text()
    assert "fp8vl quantize tiny-dense cli-out" in text
    assert str(tmp_path) not in text and str(dense_src) not in text
