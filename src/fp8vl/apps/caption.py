"""``fp8vl caption``: caption a folder of images for LoRA training, through a server or in-process.

Server backend (``endpoint`` set): any OpenAI-compatible server, see caption_server.py. Local backend
(no endpoint): the model folder is loaded once with fp8vl's runtime and images are captioned by
fp8vl's engine, greedily. The options, the per-image result and the caption cleaning both backends
share are in caption_options.py.

Outputs, written by the main thread as each caption arrives, so a killed run loses no finished one:
a sidecar ``IMAGE.txt`` (written to a temporary file, then renamed), one JSON line per image appended
to ``jsonl`` ({file, caption, tokens, seconds}; a log: on --overwrite the last line of a file wins),
and ``csv``, a Hugging Face ImageFolder ``metadata.csv`` (file_name,text): rows are appended as they
come and the file is rewritten at the end with every known caption exactly once. A rerun skips the
images already captioned (sidecar present; with txt off, listed in the jsonl or csv) unless
``overwrite``. An unreadable image, or one that a backend fails on, is reported and the batch goes
on. Ctrl-C stops at once: the captions already written stay, in-flight requests are dropped, a rerun
does the rest.
"""

from __future__ import annotations

import csv as csvlib
import io
import json
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .caption_options import CaptionOptions, CaptionSummary, _Result, clean_caption
from .caption_server import _base_url, _serve
from ..errors import FP8VLError, out_of_memory
from ..inputs.images import load_image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CSV_HEADER = ["file_name", "text"]

# the API of ``fp8vl caption`` (the options, summary and caption cleaning are defined in caption_options)
__all__ = ["CaptionOptions", "CaptionSummary", "caption", "clean_caption", "find_images", "progress_bar", "sidecar"]


# ---------------------------------------------------------------- images

def find_images(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files (jpg, jpeg, png, webp, any case) among ``paths``: files as given, folders walked
    recursively in sorted order; each image once."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in EXTENSIONS and f.is_file())
        elif p.is_file():
            if p.suffix.lower() not in EXTENSIONS:
                raise FP8VLError(f"{p}: not an image ({', '.join(EXTENSIONS)}); pass image files or folders")
            found = [p]
        else:
            raise FP8VLError(f"{p}: no such file or folder")
        out.update(dict.fromkeys(found))
    if not out:
        raise FP8VLError(f"no images ({', '.join(EXTENSIONS)}) in {', '.join(map(str, paths)) or 'no paths'}")
    return list(out)


def sidecar(image: Path) -> Path:
    return image.with_suffix(".txt")


# ---------------------------------------------------------------- outputs

def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _rel(image: Path, out_file: Path) -> str:
    base, img = _key(out_file).parent, _key(image)
    return img.relative_to(base).as_posix() if img.is_relative_to(base) else str(img)


def _read_jsonl(path: Path) -> dict[Path, str]:
    out = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:  # a line cut by a killed run is not a caption
                d = json.loads(line)
                out[_key(path.parent / d["file"])] = d["caption"]
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _read_csv(path: Path) -> dict[Path, str]:
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csvlib.reader(f))
    if rows[0] != CSV_HEADER:
        raise FP8VLError(f"{path}: header {rows[0]} is not {','.join(CSV_HEADER)}; pass another --csv file")
    return {_key(path.parent / r[0]): r[1] for r in rows[1:] if len(r) == 2}


def _append(path: Path, text: str, header: str = "") -> None:
    """Append and flush, starting on a new line even after a line cut short by a killed run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        if f.tell() == 0:
            text = header + text
        else:
            f.seek(-1, os.SEEK_END)
            text = ("" if f.read(1) == b"\n" else "\n") + text
        f.write(text.encode())
        f.flush()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_line(row: list[str]) -> str:
    buf = io.StringIO()
    csvlib.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue()


def _has_txt(image: Path) -> bool:
    s = sidecar(image)
    return s.is_file() and bool(s.read_text(encoding="utf-8", errors="replace").strip())


def _save(r: _Result, opts: CaptionOptions) -> None:
    if opts.txt:
        _write_atomic(sidecar(r.path), r.caption)
    if opts.jsonl:
        rec = {"file": _rel(r.path, opts.jsonl), "caption": r.caption, "tokens": r.tokens,
               "seconds": round(r.seconds, 3)}
        _append(opts.jsonl, json.dumps(rec, ensure_ascii=False) + "\n")
    if opts.csv:
        _append(opts.csv, _csv_line([_rel(r.path, opts.csv), r.caption]), _csv_line(CSV_HEADER))


def _final_csv(images: list[Path], opts: CaptionOptions) -> None:
    """Rewrite the csv with every known caption once: its rows (this run's appended last), gaps filled
    from the jsonl, sidecars over both (they are what a trainer reads and what a user edits)."""
    known, base = _read_csv(opts.csv), _key(opts.csv).parent
    if opts.jsonl:  # fills the gaps only: an edited csv row stays
        for k, v in _read_jsonl(opts.jsonl).items():
            if k.is_relative_to(base):
                known.setdefault(k, v)
    if opts.txt:
        known.update({_key(p): sidecar(p).read_text(encoding="utf-8").strip() for p in images if _has_txt(p)})
    rows = sorted((_rel(p, opts.csv), " ".join(t.split())) for p, t in known.items())
    _write_atomic(opts.csv, "".join(_csv_line(r) for r in [CSV_HEADER, *rows]))


def _check(images: list[Path], opts: CaptionOptions) -> None:
    if not (opts.txt or opts.jsonl or opts.csv):
        raise FP8VLError("nothing to write: keep the .txt sidecars or pass --jsonl or --csv")
    for name in ("max_side", "concurrency", "max_tokens"):
        if getattr(opts, name) < 1:
            raise FP8VLError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(opts, name)})")
    if opts.retries < 0 or opts.backoff < 0 or opts.timeout <= 0:
        raise FP8VLError("--retries and --backoff must be >= 0 and --timeout > 0")
    if opts.endpoint is not None:
        _base_url(opts.endpoint)
    elif not opts.model:
        raise FP8VLError("no model: pass --endpoint URL of a running server, or --model DIR to caption in-process")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise FP8VLError(f"--batch-size must be at least 1 (got {opts.batch_size})")
    if opts.txt:
        seen: dict[Path, Path] = {}
        for p in images:
            if (other := seen.setdefault(sidecar(p), p)) != p:
                raise FP8VLError(f"{other} and {p} would share the caption file {sidecar(p)}; rename one")
    if opts.csv:
        base = _key(opts.csv).parent
        for p in images:
            if not _key(p).is_relative_to(base):
                raise FP8VLError(f"{opts.csv}: {p} is outside {base}; ImageFolder reads file_name relative "
                                 f"to metadata.csv, so put the csv in the images' folder or a parent")


# ---------------------------------------------------------------- in-process backend

def _local(todo: list[Path], opts: CaptionOptions, info: dict) -> Iterator[_Result]:
    """In-process: fp8vl's engine, continuous batching; images are read and encoded by two threads
    ahead of the GPU (the processor's CPU work overlaps the model's)."""
    from ..runtime.engine import Engine, EngineOptions, Request, limit_gpu_memory, round_up
    from ..runtime.loader import encode, eos_ids, load_any

    limit_gpu_memory(opts.device, opts.gpu_memory)
    fix = ("use a smaller --batch-size, a lower --max-tokens or --max-side, or --gpu-memory below what other "
           "programs leave free; the captions written so far are kept")
    with out_of_memory(opts.device, fix):
        t0 = time.perf_counter()
        loaded = load_any(opts.model, opts.device, opts.mode)
        info["model"] = f"{opts.model} ({loaded.label})"
        tok = getattr(loaded.processor, "tokenizer", loaded.processor)
        # the longest prompt: a square image at max_side (resizing never upscales, so none is longer)
        from PIL import Image

        longest = encode(loaded, opts.prompt, Image.new("RGB", (opts.max_side, opts.max_side)))
        eopts = EngineOptions(max_len=round_up(longest["input_ids"].shape[1] + opts.max_tokens + 1),
                              max_batch=opts.batch_size, max_new_tokens=opts.max_tokens,
                              temperature=opts.temperature, batch_invariant=opts.batch_invariant)
        engine = Engine(loaded.model, eos_ids(loaded), eopts)
        info["load_seconds"] = time.perf_counter() - t0
        failed: list[_Result] = []

        def prepare(path: Path) -> tuple[Path, float, dict | None]:
            t0 = time.perf_counter()
            try:
                return path, t0, encode(loaded, opts.prompt, load_image(path, opts.max_side), device="cpu")
            except FP8VLError as e:
                failed.append(_Result(path, error=str(e)))
                return path, t0, None

        def requests() -> Iterator[Request]:
            # bounded read-ahead (Executor.map would encode every image up front: ~6 MB each at 512 px)
            ahead = 2 * engine.batch + 2
            with ThreadPoolExecutor(2, thread_name_prefix="fp8vl-encode") as pool:
                waiting = deque(pool.submit(prepare, p) for p in todo[:ahead])
                rest = iter(todo[ahead:])
                while waiting:
                    path, t0, inputs = waiting.popleft().result()
                    nxt = next(rest, None)
                    if nxt is not None:
                        waiting.append(pool.submit(prepare, nxt))
                    if inputs is not None:
                        yield Request(inputs, (path, t0))

        for req, ids in engine.generate(requests()):
            while failed:
                yield failed.pop(0)
            path, t0 = req.tag
            text = clean_caption(tok.decode(ids, skip_special_tokens=True), opts.trigger)
            yield _Result(path, text or None, len(ids), time.perf_counter() - t0,
                          None if text else "the model returned an empty caption")
        yield from failed


# ---------------------------------------------------------------- the run

def caption(paths: str | Path | Iterable[str | Path], opts: CaptionOptions = CaptionOptions(),
            progress: Callable[[int, int], None] | None = None) -> CaptionSummary:
    """Caption the images under ``paths``; ``progress(processed, total)`` is called on the calling
    thread after each image that was to be captioned (written or failed)."""
    opts = replace(opts, jsonl=Path(opts.jsonl) if opts.jsonl else None, csv=Path(opts.csv) if opts.csv else None)
    images = find_images(paths)
    _check(images, opts)
    if opts.overwrite:
        done = set()
    elif opts.txt:
        done = {p for p in images if _has_txt(p)}
    else:
        known = {**(_read_jsonl(opts.jsonl) if opts.jsonl else {}), **(_read_csv(opts.csv) if opts.csv else {})}
        done = {p for p in images if _key(p) in known}
    if opts.csv:
        _read_csv(opts.csv)  # a csv of another layout fails before any work
    todo = [p for p in images if p not in done]
    s = CaptionSummary(skipped=len(images) - len(todo))
    t0, info = time.perf_counter(), {"model": opts.model or ""}
    if todo:
        backend = _serve if opts.endpoint else _local
        with closing(backend(todo, opts, info)) as results:
            for n, r in enumerate(results, 1):
                if r.caption:
                    try:
                        _save(r, opts)
                    except OSError as e:
                        raise FP8VLError(f"{r.path}: cannot write its caption ({e}); check the folder's "
                                         f"permissions and free space") from e
                    s.done, s.tokens = s.done + 1, s.tokens + r.tokens
                else:
                    s.failed.append((r.path, r.error or "unknown error"))
                if progress:
                    progress(n, len(todo))
    if opts.csv:
        _final_csv(images, opts)
    s.seconds, s.model, s.load_seconds = time.perf_counter() - t0, info["model"], info.get("load_seconds", 0.0)
    return s


@contextmanager
def progress_bar(console=None, transient: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich bar with images/s; yields the ``progress`` callback for :func:`caption`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=console, transient=transient) as bar:
        task = bar.add_task("captioning", total=None, rate="")
        t0 = time.perf_counter()

        def update(n: int, total: int) -> None:
            bar.update(task, completed=n, total=total, rate=f"{n / max(time.perf_counter() - t0, 1e-9):.2f} img/s")
        yield update
