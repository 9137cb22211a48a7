"""Tiny outputs of every supported architecture in both formats, for the real-engine tests
(check/test_vllm_check.py, check/test_sglang_check.py), and the interpreter that has the engine.

The engines live in their own venvs: ``make test-vllm`` / ``make test-sglang`` set them up and
name them in FP8VL_VLLM_PYTHON / FP8VL_SGLANG_PYTHON. Where neither that nor the running
interpreter has the engine, the tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fp8vl import QuantizeOptions, quantize
from fp8vl.check.engines import find_python
from fp8vl.apps.tiny import ARCHS, build_tiny

FORMATS = ("fp8", "compressed-tensors")


def engine_python(engine: str) -> tuple[str, str] | None:
    given = os.environ.get(f"FP8VL_{engine.upper()}_PYTHON")
    return find_python(engine, (given,) if given else ())


def build_outputs(root: Path) -> dict[tuple[str, str], Path]:
    """{(arch, format): FP8 output folder} for every tiny architecture."""
    out = {}
    for arch in ARCHS:
        src = build_tiny(root / "src" / arch, arch)
        for fmt in FORMATS:
            out[arch, fmt] = root / f"{arch}-{fmt}"
            quantize(src, out[arch, fmt], QuantizeOptions(format=fmt, workers=2))
    return out


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` whose config.json is passed through ``edit(config) -> None``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def checks(report, prefix: str) -> dict[str, list]:
    """{level: [check]} of the report's checks whose name starts with ``prefix``."""
    out: dict[str, list] = {"ok": [], "warning": [], "error": []}
    for c in report.checks:
        if c.name.startswith(prefix):
            out[c.level].append(c)
    return out
