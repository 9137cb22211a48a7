"""Terminal rendering of a quantization plan and its result (rich tables).

Every text that comes from data (paths, messages, fixes, commands) goes through ``escape``: rich reads
``[word]`` as markup and drops it, and a fix such as ``pip install 'fp8vl[serve]'`` must print as is.
"""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .checkpoint.compat import config_lines
from .checkpoint.plan import REASONS
from .checkpoint.tp import summarize


def gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def plan_rows(res) -> list[dict]:
    """Per group: tensors, bytes before (source) and after (output, scales included)."""
    rows: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "before": 0, "after": 0, "quantize": False})
    for e in res.plan.entries:
        r = rows[e.group]
        r["tensors"] += 1
        r["quantize"] = e.quantize
        r["before"] += res.before[e.name]
        r["after"] += res.after[e.name]
    return [{"group": g, **r, "reason": REASONS[g]} for g, r in rows.items()]


def print_plan(res, console: Console) -> None:
    t = Table(title=f"Plan for {escape(str(res.source))} ({escape(str(res.plan.model_type))})", show_lines=False)
    for col in ("group", "action", "tensors", "before", "after", "why"):
        t.add_column(col, overflow="fold")
    for r in plan_rows(res):
        t.add_row(escape(r["group"]), "FP8" if r["quantize"] else "keep", str(r["tensors"]), gb(r["before"]),
                  gb(r["after"]), escape(r["reason"]))
    t.add_row("total", "", str(len(res.plan.entries)), gb(res.bytes_in), gb(res.bytes_out),
              f"{res.bytes_out / max(res.bytes_in, 1):.2f}x of the source", style="bold")
    console.print(t)
    console.print(escape(summarize(res.tp)))
    _config_and_warnings(res.plan, console)


def _config_and_warnings(plan, console: Console) -> None:
    for line in config_lines(plan):
        console.print(escape(line))
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


def print_summary(res, console: Console) -> None:
    n_q = sum(e.quantize for e in res.plan.entries)
    rate = res.bytes_in / res.seconds / 1e9 if res.seconds else 0.0
    console.print(
        f"[bold green]wrote[/] {escape(str(res.output))}: {len(res.shards)} shard(s), {n_q} FP8 tensors, "
        f"{len(res.plan.entries) - n_q} kept; {gb(res.bytes_in)} -> {gb(res.bytes_out)} "
        f"({res.bytes_out / max(res.bytes_in, 1):.2f}x) in {res.seconds:.1f} s ({rate:.2f} GB/s of source); "
        f"{len(res.copied)} other files copied unchanged")
    if res.skipped:
        console.print(f"[yellow]not copied[/] (weights in another format): {escape(', '.join(res.skipped))}")
    _config_and_warnings(res.plan, console)


STYLE = {"ok": "green", "warning": "yellow", "error": "bold red"}


def print_verify(r, console: Console) -> None:
    t = Table(title=f"fp8vl verify {escape(r.path)} (format {escape(r.format)})")
    for col in ("check", "result", "detail"):
        t.add_column(col, overflow="fold")
    for c in r.checks:
        t.add_row(escape(c.name), f"[{STYLE[c.level]}]{c.level}[/]", escape(c.message))
    console.print(t)
    console.print("bytes by dtype: " + ", ".join(f"{k} {gb(v)}" for k, v in sorted(r.bytes_by_dtype.items())))
    if r.tp:
        console.print(escape(summarize(r.tp)))
    if r.tensors:
        w = Table(title="worst FP8 tensors vs source")
        for col in ("tensor", "relative error", "SQNR (dB)"):
            w.add_column(col)
        for x in sorted(r.tensors, key=lambda x: x.sqnr_db)[:8]:
            w.add_row(escape(x.name), f"{x.rel_error:.4f}", f"{x.sqnr_db:.2f}")
        console.print(w)
    verdict = "[bold green]PASSED[/]" if r.ok else "[bold red]FAILED[/]"
    if r.skipped:   # never a bare PASSED when a requested check did not run
        rows = "its row" if len(r.skipped) == 1 else "their rows"
        verdict = (f"{'PASSED what ran' if r.ok else verdict}; [bold yellow]SKIPPED[/]: {escape(', '.join(r.skipped))} "
                   f"(not installed here or in any --engine-python: see {rows})")
    console.print(verdict)


def print_doctor(findings, console: Console) -> None:
    t = Table(title="fp8vl doctor")
    for col in ("check", "result", "detail", "fix"):
        t.add_column(col, overflow="fold")
    for f in findings:
        t.add_row(escape(f.what), f"[{STYLE[f.level]}]{f.level}[/]", escape(f.detail), escape(f.fix))
    console.print(t)


def print_vram(p, console: Console) -> None:
    from .serving.gpus import GIB

    t = Table(title=f"vLLM memory plan: {escape(str(p.model))} on {escape(p.gpu.name)} (per GPU, TP {p.tp})")
    for col in ("item", "how", "GiB"):
        t.add_column(col, overflow="fold")
    for item, how, n in p.rows:
        gib = f"{n / GIB:+.2f}" if item not in ("budget", "KV cache") else f"{n / GIB:.2f}"
        t.add_row(escape(item), escape(how), gib, style="bold" if item == "KV cache" else None)
    console.print(t)
    console.print(f"KV cache per token: {p.kv_bytes_per_token} B (layers x KV heads x head dim x 2 x "
                  f"{'1 (fp8)' if p.kv_cache_dtype == 'fp8' else '2 (bf16)'}) -> {p.kv_tokens} tokens fit")
    console.print(f"[bold]--max-model-len {p.max_model_len}[/] (model limit {p.context_limit}), "
                  f"--max-num-seqs {p.max_num_seqs} (requests of ~1k tokens at once)"
                  + (f"; one image of {p.max_pixels} px = {p.vision_tokens} tokens" if p.vision_tokens else ""))
    console.print(f"GPU: {escape(p.verdict[1])}")
    if p.tp_line:
        console.print(escape(p.tp_line))


def print_caption_summary(s, console: Console, device: str | None = None) -> None:
    """One line for a caption run (a CaptionSummary), then one per failed image; ``device``: where an
    in-process run ran."""
    console.print(f"[bold green]captioned[/] {s.done}, skipped {s.skipped} (already captioned), "
                  f"[{'bold red' if s.failed else 'green'}]failed {len(s.failed)}[/] in {s.seconds:.1f} s: "
                  f"{s.images_per_s:.2f} images/s, {s.tokens_per_s:.1f} tokens/s ({escape(s.model)})"
                  + (f" on {device}" if device else "")
                  + (f"; model loaded in {s.load_seconds:.1f} s, then {s.captioning_images_per_s:.2f} images/s"
                     if s.load_seconds else "; nothing to caption, so no model was loaded" if device and not s.done
                     else ""))
    for path, reason in s.failed:
        console.print(f"  [red]failed[/] {escape(str(path))}: {escape(reason)}", highlight=False)


class Phases:
    """Progress of a long run's phases, for people and for logs: on a terminal, a rich bar per phase;
    otherwise (a pipe, ``nohup``, CI) a plain line when a phase starts, every ``every`` seconds while it
    runs and when it ends, so no phase is silent for long. ``quiet``: nothing at all.

    ``update = phases.start("loading model", total, unit)`` then ``update(done, total=None, **extra)``
    (``unit`` "B" shows bytes as GB; ``extra`` fields, e.g. tokens, are shown as rates per second)."""

    def __init__(self, console: Console, quiet: bool = False, every: float = 5.0):
        import time

        self.console, self.quiet, self.every, self.clock = console, quiet, every, time.perf_counter
        self.bar = None
        if not quiet and console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[text]}"),
                                TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self) -> "Phases":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _text(self, done: float, total: float | None, unit: str, t0: float, extra: dict) -> str:
        show = (lambda n: f"{n / 1e9:.2f}") if unit == "B" else (lambda n: f"{n:.0f}")
        unit = "GB" if unit == "B" else unit
        text = f"{show(done)}/{show(total)} {unit}" if total else f"{show(done)} {unit}"
        secs = max(self.clock() - t0, 1e-9)
        rates = [f"{done / secs:.2f} {unit}/s"] + [f"{v / secs:.1f} {k}/s" for k, v in extra.items()]
        return f"{text}, {', '.join(rates)}"

    def start(self, name: str, total: float | None = None, unit: str = ""):
        """Begin phase ``name``; returns its ``update(done, total=None, **extra)``."""
        t0, last, state = self.clock(), [0.0], {"total": total}
        task = self.bar.add_task(name, total=total, text="") if self.bar is not None else None
        if self.bar is None and not self.quiet:
            self.console.print(f"{name} ...", highlight=False, markup=False)

        def update(done: float, total: float | None = None, **extra) -> None:
            state["total"] = total if total is not None else state["total"]
            text = self._text(done, state["total"], unit, t0, extra)
            if task is not None:
                self.bar.update(task, completed=done, total=state["total"], text=text)
            elif not self.quiet and (self.clock() - last[0] >= self.every or done == state["total"]):
                last[0] = self.clock()
                self.console.print(f"{name}: {text}", highlight=False, markup=False)
        return update
