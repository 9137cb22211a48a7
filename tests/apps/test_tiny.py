"""The tiny real-architecture models: building one prints nothing of its own (the demo's output stays clean)."""

from __future__ import annotations

import subprocess
import sys

from helpers import cli_env


def test_building_the_tiny_model_prints_nothing(tmp_path):
    code = f"from fp8vl.apps.tiny import build_tiny_qwen3_vl; build_tiny_qwen3_vl({str(tmp_path / 'm')!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""                     # the tokenizer trainer's progress bars printed blank lines
    assert (tmp_path / "m" / "config.json").is_file()
