"""``fp8vl demo``: the main job end to end on an embedded default (a tiny Qwen3-VL), offline."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..conversion.convert import quantize
from ..errors import FP8VLError
from ..options import QuantizeOptions
from ..report import print_plan, print_summary, print_verify
from .tiny import build_tiny_qwen3_vl


STAMP = ".fp8vl-demo"   # marks a work folder the demo made (and may replace)


def run_demo(workdir: Path, console: Console, limit: int = 6, max_new_tokens: int = 16) -> dict:
    """Build, quantize, verify, load both with Transformers, and evaluate drift; returns the figures."""
    from ..check.eval_report import layer_sqnr_plot, print_eval, write_report
    from ..check.evaluate import compare_models, evaluate
    from ..runtime.loader import load_hf_model
    from ..inputs.prompts import builtin, open_image
    from ..check.verify import verify

    workdir = Path(workdir)
    src, out = workdir / "tiny-qwen3-vl-bf16", workdir / "tiny-qwen3-vl-fp8"
    stamp = workdir / STAMP
    if workdir.exists() and any(workdir.iterdir()) and not stamp.exists():
        raise FP8VLError(f"{workdir}: not empty and not made by `fp8vl demo`; the demo replaces its work folder, "
                         f"so give it a new or empty one (--workdir DIR)")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    stamp.write_text("made by fp8vl demo; the next demo run replaces this folder\n")
    console.rule("1. build a tiny Qwen3-VL (real architecture, random weights, offline tokenizer)")
    build_tiny_qwen3_vl(src)
    console.print(f"source: {escape(str(src))}")
    console.rule("2. fp8vl quantize (the same code path as for a real model)")
    res = quantize(src, out, QuantizeOptions(), command=f"fp8vl quantize {src} {out}",
                   on_plan=lambda plan: print_plan(plan, console))
    print_summary(res, console)

    console.rule("3. fp8vl verify --source")
    ver = verify(out, src)
    print_verify(ver, console)

    console.rule("4. Transformers loads both folders on CPU (it dequantizes FP8 itself)")
    ref, fp8 = load_hf_model(src), load_hf_model(out)
    table = Table(title="next-token agreement over the prompt, Transformers BF16 vs Transformers FP8")
    for col in ("prompt", "tokens", "mean KL", "max KL", "top-1 agreement"):
        table.add_column(col)
    figures: dict = {"verify_ok": ver.ok}
    for kind, text, image in [("image", "Describe this image concisely.", open_image("skimage:astronaut")),
                              ("text", "The quick brown fox jumps over the lazy dog.", None)]:
        m = compare_models(ref, fp8, text, image)
        figures[kind] = m
        table.add_row(kind, str(m["tokens"]), f"{m['kl_mean']:.4f}", f"{m['kl_max']:.4f}", f"{m['top1']:.3f}")
    console.print(table)
    del ref, fp8

    console.rule(f"5. fp8vl eval: {limit} text + {limit} image prompts, FP8 computed as a W8A8 server does")
    ev = evaluate(src, out, builtin(limit), max_new_tokens=max_new_tokens)
    print_eval(ev, console)
    report = write_report(ev, workdir / "eval-report", layer_sqnr_plot(ver, workdir / "sqnr_per_tensor.png"))
    console.print(f"report with plots: {escape(str(report))}")
    figures["eval"] = ev.summary()
    return figures
