"""Eval results as a terminal table, a Markdown report with plots, and a model-card section; the
per-tensor SQNR chart (``verify --plot``, and the report's second plot); verify's model-card section
(``verify --update-card``).

Rendering only: the results' types are imported for annotations, so drawing a chart loads no model code.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..checkpoint.tp import summarize

if TYPE_CHECKING:
    from .evaluate import EvalReport
    from .verify import Report

CARD_BEGIN, CARD_END = "<!-- fp8vl:eval -->", "<!-- /fp8vl:eval -->"
VERIFY_BEGIN, VERIFY_END = "<!-- fp8vl:verify -->", "<!-- /fp8vl:verify -->"
COLUMNS = ("prompts", "mean KL", "max KL", "top-1", "greedy exact", "first divergence", "PPL src", "PPL fp8")


def _row(s: dict) -> list[str]:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    return [str(s["prompts"]), f(s["kl_mean"], ".5f"), f(s["kl_max"], ".4f"), f(s["top1"], ".3f"),
            f(s["greedy_exact_match"], ".2f"), f(s["mean_first_divergence"], ".1f"), f(s["ppl_source"], ".2f"),
            f(s["ppl_fp8"], ".2f")]


def print_eval(r: EvalReport, console: Console, per_prompt: bool = False) -> None:
    t = Table(title=f"source vs FP8 ({r.runtime}, {r.device}, greedy {r.max_new_tokens} tokens)")
    t.add_column("kind")
    for c in COLUMNS:
        t.add_column(c, justify="right")
    for kind, s in r.summary().items():
        t.add_row(kind, *_row(s))
    console.print(t)
    if per_prompt:
        p = Table(title="per prompt")
        for c in ("id", "KL", "top-1", "same answer", "source answer", "FP8 answer"):
            p.add_column(c, overflow="fold")
        for x in r.prompts:
            p.add_row(escape(x.id), f"{x.kl_mean:.4f}", f"{x.top1:.2f}", "yes" if x.exact_match else
                      f"no (token {x.first_divergence})", escape(x.source_answer[:80]), escape(x.fp8_answer[:80]))
        console.print(p)


def markdown_table(r: EvalReport) -> list[str]:
    lines = ["| kind | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    return lines + [f"| {kind} | " + " | ".join(_row(s)) + " |" for kind, s in r.summary().items()]


def kl_plot(r: EvalReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    colors = ["tab:blue" if x.kind == "text" else "tab:orange" for x in r.prompts]
    ax.bar(range(len(r.prompts)), [x.kl_mean for x in r.prompts], color=colors)
    ax.set_xticks(range(len(r.prompts)), [x.id for x in r.prompts], rotation=90, fontsize=6)
    ax.set_ylabel("mean next-token KL (nats)")
    ax.set_title("KL(source || FP8) per prompt (blue: text, orange: image)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_sqnr_plot(r: Report, path: Path) -> Path:
    """Per-tensor SQNR of a verify report in checkpoint order, one series per projection kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, t in enumerate(r.tensors):
        kind = re.sub(r"^.*\.(\w+)\.weight$", r"\1", t.name)
        series[kind].append((i, t.sqnr_db))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for kind, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", label=kind)
    ax.set_xlabel("FP8 tensor (checkpoint order, layer by layer)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("FP8 weights vs source: signal-to-quantization-noise ratio")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(r: EvalReport, out_dir: Path, sqnr_png: Path | None = None) -> Path:
    """report.md, kl_per_prompt.png and results.json in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kl_plot(r, out_dir / "kl_per_prompt.png")
    (out_dir / "results.json").write_text(r.to_json())
    lines = [f"# fp8vl eval: {Path(r.quantized).name} vs {Path(r.source).name}", "",
             f"FP8 side: {r.runtime} on {r.device}; greedy answers of up to {r.max_new_tokens} tokens; "
             "KL and top-1 over the source's own answer tokens.", "", *markdown_table(r), "",
             "![KL per prompt](kl_per_prompt.png)", ""]
    if sqnr_png is not None:
        lines += ["![SQNR per tensor](" + sqnr_png.name + ")", ""]
    lines += ["| prompt | KL | top-1 | same greedy answer | source answer | FP8 answer |", "|---|---|---|---|---|---|"]
    for x in r.prompts:
        same = "yes" if x.exact_match else f"no (from token {x.first_divergence})"
        clean = lambda s: s.replace("|", "\\|").replace("\n", " ")[:100]  # noqa: E731
        lines.append(f"| {x.id} | {x.kl_mean:.4f} | {x.top1:.2f} | {same} | {clean(x.source_answer)} | "
                     f"{clean(x.fp8_answer)} |")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def card_section(r: EvalReport) -> str:
    return "\n".join([CARD_BEGIN, "## Drift from the source (fp8vl eval)", "",
                      f"FP8 side computed as a W8A8 server does ({r.runtime}, {r.device}); "
                      f"{len(r.prompts)} prompts, greedy answers of up to {r.max_new_tokens} tokens.", "",
                      *markdown_table(r), CARD_END, ""])


def verify_section(r: Report) -> str:
    """``fp8vl verify --update-card``'s section: every check, bytes by dtype, TP sizes, SQNR figures."""
    lines = [VERIFY_BEGIN, "## Verification (fp8vl verify)", "", "| check | result |", "|---|---|"]
    lines += [f"| {c.name} | {c.level}: {c.message} |" for c in r.checks]
    if r.skipped:
        lines += ["", f"Skipped (requested, not run): {', '.join(r.skipped)}."]
    lines += ["", "Bytes by dtype: " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in r.bytes_by_dtype.items()),
              "", summarize(r.tp) + "." if r.tp else ""]
    if r.tensors:
        mean = sum(t.sqnr_db for t in r.tensors) / len(r.tensors)
        how = "vs source" if r.kept_identical is not None else "vs source, measured while converting"
        lines += ["", f"Per-tensor SQNR {how}: mean {mean:.1f} dB, worst "
                      f"{min(t.sqnr_db for t in r.tensors):.1f} dB over {len(r.tensors)} FP8 tensors."]
    return "\n".join(lines + [VERIFY_END, ""])
