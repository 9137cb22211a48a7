"""``fp8vl demo``: the main job end to end on an embedded default (a tiny Qwen3-VL), offline."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .convert import quantize
from .options import QuantizeOptions
from .report import print_plan, print_summary
from .tiny import build_tiny_qwen3_vl


def run_demo(workdir: Path, console: Console) -> dict:
    """Build, quantize, load both with Transformers on CPU and compare next-token distributions."""
    from .evaluate import compare_models, load_hf_model
    from .prompts import open_image

    workdir = Path(workdir)
    src, out = workdir / "tiny-qwen3-vl-bf16", workdir / "tiny-qwen3-vl-fp8"
    shutil.rmtree(workdir, ignore_errors=True)
    console.rule("1. build a tiny Qwen3-VL (real architecture, random weights, offline tokenizer)")
    build_tiny_qwen3_vl(src)
    console.print(f"source: {src}")
    console.rule("2. quantize (same code path as a real model)")
    opts = QuantizeOptions()
    print_plan(quantize(src, None, QuantizeOptions(dry_run=True)), console)
    res = quantize(src, out, opts, command=f"fp8vl quantize {src} {out}")
    print_summary(res, console)
    console.rule("3. load both with Transformers on CPU and run the same prompts")
    ref, fp8 = load_hf_model(src), load_hf_model(out)
    prompts = [("image", "Describe this image concisely.", open_image("skimage:astronaut")),
               ("text", "The quick brown fox jumps over the lazy dog near the river bank.", None)]
    table = Table(title="BF16 source vs FP8 output (Transformers, CPU, FP8 dequantized on load)")
    for col in ("prompt", "tokens", "mean KL", "max KL", "top-1 agreement"):
        table.add_column(col)
    figures = {}
    for kind, text, image in prompts:
        m = compare_models(ref, fp8, text, image)
        figures[kind] = m
        table.add_row(kind, str(m["tokens"]), f"{m['kl_mean']:.4f}", f"{m['kl_max']:.4f}",
                      f"{m['top1']:.3f}")
    console.print(table)
    return figures
