"""The ``fp8vl`` command: one plain function per subcommand, flags mirroring the Python API.

Errors: an FP8VLError prints one line and exits 2; a traceback is shown only with ``--debug``
or FP8VL_DEBUG=1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import FP8VLError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FP8 copies of vision-language models: quantize, verify, evaluate, run.")


def _flags_as_switches() -> None:
    """typer 0.2x's rich help gives every option a type, flags too (`--debug <bool>`, `--help <bool>`),
    as if they took a value; click's own help shows a flag as a plain switch, and so does fp8vl's.
    Older typer releases (no ``display_type_rich``) already did."""
    try:
        from typer.core import TyperOption

        typed = TyperOption.display_type_rich
    except (ImportError, AttributeError):
        return
    if getattr(typed, "fp8vl", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else typed(self, ctx)

    display_type_rich.fp8vl = True
    TyperOption.display_type_rich = display_type_rich


_flags_as_switches()
# Piped output (logs, CI) gets 120 columns instead of rich's 80, so the tables stay readable.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def _print_version(value: bool) -> None:
    if value:
        from .version import __version__

        print(f"fp8vl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print fp8vl's version and exit.")) -> None:
    """(--debug is read by main() before the command runs: see wants_debug.)"""


def wants_debug(argv: list[str]) -> bool:
    """--debug given before the command (``fp8vl --debug quantize ...``), or FP8VL_DEBUG=1."""
    lead = []
    for a in argv:
        if not a.startswith("-"):
            break
        lead.append(a)
    return "--debug" in lead or os.environ.get("FP8VL_DEBUG") == "1"


@app.command("quantize")
def quantize_cmd(
    source: str = typer.Argument(..., help="BF16 checkpoint: local folder or hub repo id"),
    output: Optional[Path] = typer.Argument(None, help="output folder (not needed with --dry-run)"),
    format: str = typer.Option("fp8", "--format", help="fp8 (Qwen/DeepSeek layout) or compressed-tensors"),
    scale_dtype: Optional[str] = typer.Option(None, "--scale-dtype", help="float32 (fp8 default), bfloat16 or float16"),
    ignore: list[str] = typer.Option([], "--ignore", help="keep modules matching this glob or re:REGEX"),
    quantize_vision: bool = typer.Option(False, "--quantize-vision", help="also quantize vision linears"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    workers: int = typer.Option(os.cpu_count() or 1, "--workers", help="parallel jobs"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="e.g. 5GB, 2GiB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUTPUT"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, write nothing"),
    revision: Optional[str] = typer.Option(None, "--revision", help="hub revision (branch, tag or commit)"),
    stream: Optional[bool] = typer.Option(
        None, "--stream/--keep-source",
        help="hub ids: download into OUTPUT's staging folder and delete each source shard once written "
             "(default unless the repo is already in the local cache) / keep the source in the hub cache"),
    in_flight: int = typer.Option(2, "--in-flight", help="hub ids: source shards on disk or downloading at once"),
    record_error: bool = typer.Option(False, "--record-error", help="keep each FP8 tensor's error in "
                                      "fp8vl-errors.json (always for hub ids, whose source is not kept)"),
) -> None:
    """Quantize SOURCE to FP8 E4M3 with 128x128 block scales into OUTPUT.

    SOURCE may be a hub id (ORG/NAME): its shards are converted as they download, and a run that
    stops resumes where it was when run again."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from .conversion.convert import quantize
    from .options import QuantizeOptions, parse_size
    from .report import print_plan, print_summary

    opts = QuantizeOptions(format=format, scale_dtype=scale_dtype, ignore=tuple(ignore),
                           quantize_vision=quantize_vision, device=device, workers=workers,
                           max_shard_size=parse_size(max_shard_size), overwrite=overwrite,
                           dry_run=dry_run or output is None, revision=revision, stream=stream,
                           in_flight=in_flight, record_error=record_error)
    if output is None and not dry_run:
        raise FP8VLError("OUTPUT is missing (or pass --dry-run to only print the plan)")
    from .checkpoint.source import locate
    from .conversion.staging import check_paths

    found = locate(source)   # quantize() checks these too; here they also come before any progress bar
    if not opts.dry_run:
        check_paths(found if isinstance(found, Path) else None, output.expanduser().resolve(), overwrite)
    if opts.dry_run:
        quantize(source, None, opts, on_plan=lambda plan: print_plan(plan, console))
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("quantizing", total=None)
        res = quantize(source, output, opts, on_plan=lambda plan: print_plan(plan, console),
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    print_summary(res, console)


@app.command("dequantize")
def dequantize_cmd(
    source: Path = typer.Argument(..., help="FP8 checkpoint (fp8vl, Qwen/DeepSeek or compressed-tensors)"),
    output: Path = typer.Argument(..., help="output folder"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32"),
    workers: int = typer.Option(os.cpu_count() or 1, "--workers", help="parallel jobs"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="e.g. 5GB, 2GiB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUTPUT"),
) -> None:
    """Turn an FP8 block checkpoint back into BF16 (streaming; quantization_config removed)."""
    from .checkpoint.source import local_folder
    from .conversion.staging import check_paths
    from .options import DequantizeOptions, parse_size

    opts = DequantizeOptions(dtype, overwrite, workers, parse_size(max_shard_size))
    check_paths(local_folder(source), output.expanduser().resolve(), overwrite)   # refusals before torch loads
    from .conversion.dequantize import dequantize

    out = dequantize(source, output, opts)
    console.print(f"[bold green]wrote[/] {escape(str(out))} ({dtype})")


@app.command("verify")
def verify_cmd(
    output: Path = typer.Argument(..., help="FP8 checkpoint folder"),
    source: Optional[str] = typer.Option(None, "--source", help="its BF16 source: compare tensor by tensor"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here ('-': stdout)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="per-tensor SQNR chart (PNG; needs --source)"),
    update_card: bool = typer.Option(False, "--update-card", help="add the results to OUTPUT/README.md"),
    vllm: bool = typer.Option(False, "--vllm", help="also run vLLM's own loader on it (CPU)"),
    sglang: bool = typer.Option(False, "--sglang", help="also run SGLang's own loader on it (CPU)"),
    engine_python: list[str] = typer.Option([], "--engine-python", help="python of a venv with vLLM or "
                                            "SGLang (repeatable); default: this interpreter"),
    engine_tp: str = typer.Option("1,2,4,8", "--engine-tp", help="TP sizes vLLM builds and loads ('' for none)"),
) -> None:
    """Check an FP8 checkpoint's structure (and, with --source, its error); exit 1 on any failure, 3 when
    the checks passed but a requested engine check (--vllm, --sglang) could not run."""
    from .checkpoint.source import local_folder, locate

    # the arguments before the checks (which take a while on a large model) and before torch loads
    local_folder(output)
    if source is not None:
        locate(source)
    if plot is not None and source is None:
        raise FP8VLError("--plot needs --source (the chart shows the error against the source)")
    try:
        tp_sizes = tuple(int(t) for t in engine_tp.split(",") if t.strip())
    except ValueError:
        raise FP8VLError(f"--engine-tp {engine_tp!r}: give TP sizes like 1,2,4,8") from None
    from .conversion.card import update_card as write_section
    from .check.eval_report import layer_sqnr_plot, verify_section
    from .report import print_verify
    from .check.verify import verify

    engines = tuple(e for e, on in (("vllm", vllm), ("sglang", sglang)) if on)
    r = verify(output, source, engines, tuple(engine_python), tp_sizes)
    if json_out is not None and str(json_out) == "-":
        print(r.to_json())
    else:
        print_verify(r, console)
        if json_out is not None:
            json_out.write_text(r.to_json())
    if plot is not None:
        if not r.tensors:
            raise FP8VLError("--plot needs --source (the chart shows the error against the source)")
        err.print(f"chart: {escape(str(layer_sqnr_plot(r, plot)))}")  # stderr: stdout may be the JSON
    if update_card:
        write_section(output, verify_section(r))
    if not r.ok:
        raise typer.Exit(1)
    if r.skipped:
        raise typer.Exit(3)


@app.command("eval")
def eval_cmd(
    source: str = typer.Argument(..., help="the source model (folder or hub id)"),
    quantized: Path = typer.Argument(..., help="its FP8 copy (or any model to compare with)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSONL: {\"text\", \"image\"?, \"id\"?} a line"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N built-in prompts of each kind"),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="GPU memory the run may use, e.g. 15.5GiB"),
    device: str = typer.Option("auto", "--device", help="auto (a usable CUDA GPU, else the CPU), cpu or cuda"),
    mode: str = typer.Option("auto", "--mode", help="FP8 runtime: auto, scaled_mm, triton, w8a8 (simulated) or dequant"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="greedy answer length"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write all results as JSON here"),
    report: Optional[Path] = typer.Option(None, "--report", help="write report.md with plots to this folder"),
    update_card: bool = typer.Option(False, "--update-card", help="add the figures to QUANTIZED/README.md"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress (the results only)"),
) -> None:
    """Run SOURCE and QUANTIZED on the same prompts: KL, top-1, perplexity, greedy agreement."""
    from .checkpoint.source import local_folder, locate
    from .inputs import prompts as P
    from .options import parse_size, resolve_device
    from .report import Phases

    # the arguments before torch and Transformers load (seconds): a refusal comes at once
    locate(source)
    local_folder(quantized)
    items = P.load_jsonl(prompts) if prompts else P.builtin(limit)
    cap = parse_size(gpu_memory) if gpu_memory else None
    device = resolve_device(device)   # imports torch; "cuda" without a usable GPU: one line, before any work
    from .check.eval_report import card_section, print_eval, write_report
    from .check.evaluate import evaluate
    from .conversion.card import update_card as write_section

    _quiet_transformers()
    with Phases(console, quiet) as phases:
        r = evaluate(source, quantized, items, device, mode, max_new_tokens, gpu_memory=cap, phases=phases)
    print_eval(r, console, per_prompt=prompts is not None)
    if json_out is not None:
        json_out.write_text(r.to_json())
    if report is not None:
        sqnr = _sqnr_chart(source, quantized, report)
        console.print(f"report: {escape(str(write_report(r, report, sqnr)))}")
    if update_card:
        write_section(quantized, card_section(r))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # fp8vl draws its own progress


def _sqnr_chart(source: str, quantized: Path, out_dir: Path) -> Optional[Path]:
    """Per-tensor SQNR chart for the report: from the error fp8vl recorded while converting
    (fp8vl-errors.json) where there is one, else by `verify --source` (every FP8 tensor read and
    compared with its source: said on the console, and so is a failure to draw it)."""
    from .conversion.drift import FILE
    from .check.eval_report import layer_sqnr_plot
    from .check.verify import verify

    recorded = (Path(quantized) / FILE).is_file()
    if not recorded:
        console.print("SQNR chart: comparing every FP8 tensor with its source (as verify --source does)")
    try:
        r = verify(quantized) if recorded else verify(quantized, source)
    except FP8VLError as e:
        console.print(f"no SQNR chart: {escape(str(e))}", highlight=False)
        return None
    if not r.tensors:
        console.print("no SQNR chart: no FP8 tensor to compare")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return layer_sqnr_plot(r, out_dir / "sqnr_per_tensor.png")


def _gpu(gpu: Optional[str], vram: Optional[str], cc: Optional[str]):
    from .serving.gpus import GPU, local_gpu, lookup
    from .options import parse_size

    if gpu and vram:
        raise FP8VLError("give --gpu or --vram, not both")
    if gpu:
        return lookup(gpu)
    if vram:
        cap = tuple(int(x) for x in cc.split(".")) if cc else None
        return GPU(f"{vram} GPU", parse_size(vram), cap)  # type: ignore[arg-type]
    found = local_gpu()
    if found is None:
        raise FP8VLError("no CUDA GPU found here: pass --gpu NAME (e.g. 'RTX 4080') or --vram SIZE (e.g. 16GiB)")
    return found


def _plan(model_dir, gpu, vram, cc, tp, utilization, max_pixels, images, batched, kv_cache_dtype, eager):
    from .serving.vram import plan_vram

    return plan_vram(model_dir, _gpu(gpu, vram, cc), tp, utilization, max_pixels, images, batched,
                     kv_cache_dtype, eager)


GPU_OPT = typer.Option(None, "--gpu", help="GPU name, e.g. 'RTX 4080' (default: the local GPU)")
VRAM_OPT = typer.Option(None, "--vram", help="GPU memory instead of a name, e.g. 16GiB")
CC_OPT = typer.Option(None, "--cc", help="compute capability with --vram, e.g. 8.9")
TP_OPT = typer.Option(1, "--tp", help="tensor-parallel size")
UTIL_OPT = typer.Option(0.9, "--gpu-memory-utilization", help="share of VRAM vLLM may use")
PIXELS_OPT = typer.Option(512 * 512, "--max-pixels", help="largest image, in pixels (512x512 for captioning)")
IMAGES_OPT = typer.Option(1, "--images-per-prompt", help="images per request")
BATCHED_OPT = typer.Option(4096, "--max-num-batched-tokens", help="tokens per prefill step")
KV_OPT = typer.Option("auto", "--kv-cache-dtype", help="auto (BF16) or fp8")
EAGER_OPT = typer.Option(False, "--enforce-eager", help="no CUDA graphs (less memory, slower decode)")


@app.command("plan")
def plan_cmd(
    model_dir: Path = typer.Argument(..., help="checkpoint folder (FP8 or not)"),
    gpu: Optional[str] = GPU_OPT, vram: Optional[str] = VRAM_OPT, cc: Optional[str] = CC_OPT,
    tp: int = TP_OPT, utilization: float = UTIL_OPT, max_pixels: int = PIXELS_OPT, images: int = IMAGES_OPT,
    batched: int = BATCHED_OPT, kv_cache_dtype: str = KV_OPT, eager: bool = EAGER_OPT,
) -> None:
    """VRAM plan for vLLM on a GPU: the arithmetic, the largest --max-model-len, the verdict."""
    from .report import print_vram
    from .serving.serve import serve_command

    p = _plan(model_dir, gpu, vram, cc, tp, utilization, max_pixels, images, batched, kv_cache_dtype, eager)
    print_vram(p, console)
    _print_command(serve_command(model_dir, "vllm", p, enforce_eager=eager))


def _print_command(cmd: list[str]) -> None:
    """A command as it pastes into a shell: quoted, and where it is longer than the console is wide,
    broken into lines that end in ` \\` (never wrapped by the console, whose breaks a shell would split)."""
    from .serving.serve import shell_lines

    for line in shell_lines(cmd, max(console.width, 40)):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_cmd(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="checkpoint folder; extra args after -- go to the server"),
    engine: str = typer.Option("vllm", "--engine", help="vllm or transformers"),
    host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the command only"),
    gpu: Optional[str] = GPU_OPT, vram: Optional[str] = VRAM_OPT, cc: Optional[str] = CC_OPT,
    tp: int = TP_OPT, utilization: float = UTIL_OPT, max_pixels: int = PIXELS_OPT, images: int = IMAGES_OPT,
    batched: int = BATCHED_OPT, kv_cache_dtype: str = KV_OPT, eager: bool = EAGER_OPT,
) -> None:
    """Start vLLM (or Transformers' server) on MODEL_DIR with flags from `fp8vl plan`."""
    from .serving.serve import run, serve_command

    p = _plan(model_dir, gpu, vram, cc, tp, utilization, max_pixels, images, batched, kv_cache_dtype, eager) \
        if engine == "vllm" else None
    cmd = serve_command(model_dir, engine, p, host, port, list(ctx.args), eager)
    _print_command(cmd)
    if not dry_run:
        raise typer.Exit(run(cmd))


@app.command("caption")
def caption_cmd(
    paths: list[Path] = typer.Argument(..., help="images and folders (walked); jpg, png, webp"),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="OpenAI-compatible server, e.g. "
                                           "http://127.0.0.1:8000/v1 (default: caption in-process)"),
    model: Optional[str] = typer.Option(None, "--model", help="server model name, or the model folder in-process"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="instruction (default: one detailed sentence)"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="read the instruction from a file"),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="prefix for every caption, e.g. 'ohwx'"),
    max_side: int = typer.Option(512, "--max-side", help="resize so the longer side is at most this"),
    concurrency: int = typer.Option(8, "--concurrency", help="requests in flight"),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy, the same caption every run"),
    txt: bool = typer.Option(True, "--txt/--no-txt", help="sidecar IMAGE.txt (what LoRA trainers read)"),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="append {file, caption, ...} lines here"),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Hugging Face ImageFolder metadata.csv"),
    overwrite: bool = typer.Option(False, "--overwrite", help="recaption images that have a caption"),
    retries: int = typer.Option(4, "--retries"), backoff: float = typer.Option(0.5, "--backoff"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds per request"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="default: $OPENAI_API_KEY or EMPTY"),
    device: str = typer.Option("auto", "--device", help="in-process: auto (a usable CUDA GPU, else the CPU), "
                               "cpu or cuda"),
    mode: str = typer.Option("auto", "--mode", help="in-process FP8 runtime: auto, scaled_mm, triton, w8a8, dequant"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="in-process: sequences decoded together "
                                             "(default: as many as fit)"),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="in-process: GPU memory the run may use, "
                                             "e.g. 15.5GiB for a 16 GB card (default: the card's)"),
    batch_invariant: bool = typer.Option(False, "--batch-invariant", help="in-process on a GPU: each caption "
                                         "independent of the batch it shares (slower; the CPU always is)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="in-process: image decode/processor worker "
                                          "processes (0: threads; default: half the cores up to 8)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="try again the images an earlier run "
                                      "found unreadable"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress (the summary only)"),
) -> None:
    """Caption images in batch through a server or in-process; resumable, never overwrites by default."""
    from .apps.caption import CaptionOptions, caption, progress_bar
    from .options import parse_size
    from .inputs.prompts import CAPTION, read_utf8
    from .report import print_caption_summary

    if prompt and prompt_file:
        raise FP8VLError("give --prompt or --prompt-file, not both")
    text = read_utf8(prompt_file, "prompt file").strip() if prompt_file else prompt or CAPTION
    if not text:
        raise FP8VLError(f"{prompt_file if prompt_file else '--prompt'}: the prompt is empty")
    if endpoint is None and model:
        from .checkpoint.source import local_folder

        local_folder(model)   # in-process: a model folder, checked before the model loads
    if endpoint is None:
        _quiet_transformers()
    opts = CaptionOptions(endpoint=endpoint, model=model, prompt=text, trigger=trigger, max_side=max_side,
                          concurrency=concurrency, max_tokens=max_tokens, temperature=temperature, txt=txt,
                          jsonl=jsonl, csv=csv, overwrite=overwrite, retries=retries, backoff=backoff,
                          timeout=timeout, api_key=api_key, device=device, mode=mode, batch_size=batch_size,
                          gpu_memory=parse_size(gpu_memory) if gpu_memory else None,
                          batch_invariant=batch_invariant, workers=workers, retry_failed=retry_failed)
    with progress_bar(console, quiet) as (progress, loading):
        summary = caption(paths, opts, progress=progress, loading=loading)
    print_caption_summary(summary, console, opts.device if endpoint is None else None)
    if summary.failed:
        raise typer.Exit(1)


@app.command("doctor")
def doctor_cmd(
    output_dir: Path = typer.Option(Path("."), "--output-dir", help="where the FP8 copy will be written"),
    model: Optional[Path] = typer.Option(None, "--model", help="the source model: checks the disk space for it"),
) -> None:
    """Check Python, torch/CUDA, GPU and FP8 support, Transformers, vLLM, disk and RAM; say how to fix."""
    from .apps.doctor import diagnose
    from .report import print_doctor

    need = 0
    if model is not None:
        from .checkpoint.source import local_folder

        need = sum(f.stat().st_size for f in local_folder(model).glob("*.safetensors")) * 2 // 3
    findings = diagnose(output_dir, need)
    print_doctor(findings, console)
    if any(f.level == "error" for f in findings):
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("demo-out"), "--workdir", help="where the tiny models are written"),
) -> None:
    """Build a tiny Qwen3-VL, quantize it, and compare BF16 and FP8 on an image prompt (offline)."""
    from .apps.demo import run_demo

    _quiet_transformers()
    run_demo(workdir, console)


class Terminated(BaseException):
    """SIGTERM (``timeout``, SLURM, ``docker stop``), raised in the main thread so that cleanup runs as
    for Ctrl-C: a BaseException, so no ``except Exception`` swallows it."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # once: a second SIGTERM must not cut the cleanup short
    raise Terminated()


class _Notes(logging.Handler):
    """fp8vl's log warnings (e.g. a stale staging folder removed) as ``note:`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]note:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def _usage_error(e: Exception) -> bool:
    """A command-line usage error: click's ClickException, or, in typer releases that vendor click,
    typer's own copy of it (a TyperException with click's ``show``/``exit_code``)."""
    return isinstance(e, _click_exceptions()) and hasattr(e, "show") and hasattr(e, "exit_code")


def _click_exceptions() -> tuple[type, ...]:
    import click

    return (click.ClickException, *([typer.TyperException] if hasattr(typer, "TyperException") else []))


def main() -> None:
    import click

    signal.signal(signal.SIGTERM, _on_sigterm)
    log = logging.getLogger("fp8vl")
    log.addHandler(_Notes())
    log.propagate = False
    try:
        rc = app(standalone_mode=False)   # exceptions come here, not to click's own handler
    except FP8VLError as e:
        if wants_debug(sys.argv[1:]):
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Terminated:
        err.print("terminated (SIGTERM); nothing half-written was left behind")
        sys.exit(143)
    except (KeyboardInterrupt, click.exceptions.Abort, typer.Abort):
        err.print("interrupted; nothing half-written was left behind")
        sys.exit(130)
    except Exception as e:
        if not _usage_error(e):
            raise
        e.show()           # an unknown option, a missing argument: click's usage message, exit 2
        sys.exit(e.exit_code)
    if rc == 130:  # typer turns Ctrl-C inside a command into exit code 130
        err.print("interrupted; nothing half-written was left behind")
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
