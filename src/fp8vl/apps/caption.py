"""``fp8vl caption``: caption a folder of images for LoRA training, through a server or in-process.

Server backend (``endpoint`` set): any OpenAI-compatible server, see caption_server.py. Local backend
(no endpoint): the model folder is loaded once with fp8vl's runtime and images are captioned by
fp8vl's engine, greedily, see caption_local.py. The options, the per-image result and the caption cleaning both backends
share are in caption_options.py.

Outputs, written by the main thread as each caption arrives, so a killed run loses no finished one:
a sidecar ``IMAGE.txt`` (written to a temporary file, then renamed), one JSON line per image appended
to ``jsonl`` ({file, caption, tokens, seconds}; a log: on --overwrite the last line of a file wins),
and ``csv``, a Hugging Face ImageFolder ``metadata.csv`` (file_name,text): rows are appended as they
come and the file is rewritten at the end with every known caption exactly once. A rerun skips the
images already captioned (sidecar present; with txt off, listed in the jsonl or csv) unless
``overwrite``. An unreadable image, or one that a backend fails on, is reported and the batch goes
on; an unreadable one is also recorded (a ``{file, error}`` line in ``jsonl``, else a hidden
``.IMAGE.fp8vl-failed`` beside it) and a rerun lists it instead of trying again, unless
``retry_failed``. In-process, the model is loaded only once an image to caption has been opened:
a run with nothing left loads nothing. One run at a time writes a given set of outputs: each
folder of images and each jsonl/csv file is locked (``.fp8vl-caption.lock`` in the folder,
``.NAME.fp8vl-lock`` beside the file) for the run's life; a second run is refused. Ctrl-C stops at once: the captions already written stay, in-flight requests are dropped, a rerun
does the rest.
"""

from __future__ import annotations

import csv as csvlib
import io
import json
import os
import tempfile
import time
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .caption_local import local_backend
from .caption_options import CaptionOptions, CaptionSummary, _Result, clean_caption
from .caption_server import _base_url, _serve
from ..errors import FP8VLError

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


def failure_mark(image: Path) -> Path:
    """Where a run without --jsonl records that ``image`` cannot be read (hidden, beside it)."""
    return image.with_name(f".{image.name}.fp8vl-failed")


# ---------------------------------------------------------------- outputs

def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _rel(image: Path, out_file: Path) -> str:
    base, img = _key(out_file).parent, _key(image)
    return img.relative_to(base).as_posix() if img.is_relative_to(base) else str(img)


def _read_jsonl(path: Path, field: str = "caption") -> dict[Path, str]:
    """file -> the ``field`` of its last record that has one: caption, or error (unreadable images)."""
    out = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:  # a line cut by a killed run is not a record
                d = json.loads(line)
                out[_key(path.parent / d["file"])] = d[field]
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
    failure_mark(r.path).unlink(missing_ok=True)
    if opts.txt:
        _write_atomic(sidecar(r.path), r.caption)
    if opts.jsonl:
        rec = {"file": _rel(r.path, opts.jsonl), "caption": r.caption, "tokens": r.tokens,
               "seconds": round(r.seconds, 3)}
        _append(opts.jsonl, json.dumps(rec, ensure_ascii=False) + "\n")
    if opts.csv:
        _append(opts.csv, _csv_line([_rel(r.path, opts.csv), r.caption]), _csv_line(CSV_HEADER))


def _record_failure(r: _Result, opts: CaptionOptions) -> None:
    """An unreadable image, for the next run to list rather than try again."""
    if opts.jsonl:
        _append(opts.jsonl, json.dumps({"file": _rel(r.path, opts.jsonl), "error": r.error}, ensure_ascii=False) + "\n")
    else:
        try:
            failure_mark(r.path).write_text(r.error or "", encoding="utf-8")
        except OSError:
            pass   # a read-only folder: the image is tried again next time, nothing else is lost


def _known_failures(images: list[Path], opts: CaptionOptions) -> dict[Path, str]:
    """Images an earlier run recorded as unreadable (and has not captioned since) -> the error."""
    if opts.jsonl:
        errors, captions = _read_jsonl(opts.jsonl, "error"), _read_jsonl(opts.jsonl)
        return {p: errors[_key(p)] for p in images if _key(p) in errors and _key(p) not in captions}
    return {p: failure_mark(p).read_text(encoding="utf-8", errors="replace").strip() for p in images
            if failure_mark(p).is_file()}


def _readable(todo: list[Path]) -> tuple[list[Path], list[_Result]]:
    """``todo`` from its first image that opens (header and, for PNG, chunk checksums: no decode),
    and a failure for each one before it: the model is loaded only if an image is left to caption."""
    from PIL import Image

    bad = []
    for i, p in enumerate(todo):
        try:
            with Image.open(p) as im:
                im.verify()
            return todo[i:], bad
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
            bad.append(_Result(p, error=f"{p}: cannot read image ({type(e).__name__}: {e}); replace or remove it",
                               broken=True))
    return [], bad


def _lock(path: Path) -> int:
    """An exclusive flock on ``path`` (created, holding our PID) -> its descriptor; one FP8VLError line
    naming the holder's PID when another process has it. The kernel releases it when the process ends,
    however it ends."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FP8VLError(f"another fp8vl caption run (PID {pid}) is writing these captions (it holds "
                             f"{path}); wait for it to finish or stop it") from None
        try:   # the file we locked is still the one at path (its last holder unlinks it on release)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


@contextmanager
def _outputs_locked(paths: Iterable[str | Path], opts: CaptionOptions) -> Iterator[None]:
    """Hold a lock on every output this run writes, for its whole life: each folder given (its
    sidecars: ``.fp8vl-caption.lock`` in it) and the jsonl/csv files (``.NAME.fp8vl-lock`` beside
    each); removed again at the end. Two runs on overlapping but different folders are not seen."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = []
    if opts.txt:
        files += [(Path(p) if Path(p).is_dir() else Path(p).parent) / ".fp8vl-caption.lock" for p in paths]
    files += [f.parent / f".{f.name}.fp8vl-lock" for f in (opts.jsonl, opts.csv) if f]
    held: list[tuple[Path, int]] = []
    try:
        for f in dict.fromkeys(_key(f) for f in files):
            held.append((f, _lock(f)))
        yield
    finally:
        for f, fd in held:
            f.unlink(missing_ok=True)   # while still held: a waiting run then locks a new file
            os.close(fd)


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
    if opts.workers is not None and opts.workers < 0:
        raise FP8VLError(f"--workers must be 0 (threads) or more (got {opts.workers})")
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


# ---------------------------------------------------------------- the run

def caption(paths: str | Path | Iterable[str | Path], opts: CaptionOptions = CaptionOptions(),
            progress: Callable[[int, int, int], None] | None = None,
            loading: Callable[[int, int], None] | None = None) -> CaptionSummary:
    """Caption the images under ``paths``; ``progress(processed, total, tokens)`` is called on the
    calling thread after each image that was to be captioned (written or failed), ``loading(bytes
    read, total)`` while the in-process backend loads the model."""
    opts = replace(opts, jsonl=Path(opts.jsonl) if opts.jsonl else None, csv=Path(opts.csv) if opts.csv else None)
    images = find_images(paths)
    _check(images, opts)
    with _outputs_locked(paths, opts):
        return _caption(images, opts, progress, loading)


def _caption(images: list[Path], opts: CaptionOptions, progress, loading) -> CaptionSummary:
    if opts.overwrite:
        done = set()
    elif opts.txt:
        done = {p for p in images if _has_txt(p)}
    else:
        known = {**(_read_jsonl(opts.jsonl) if opts.jsonl else {}), **(_read_csv(opts.csv) if opts.csv else {})}
        done = {p for p in images if _key(p) in known}
    if opts.csv:
        _read_csv(opts.csv)  # a csv of another layout fails before any work
    known = {} if opts.overwrite or opts.retry_failed else _known_failures(images, opts)
    todo = [p for p in images if p not in done and p not in known]
    s = CaptionSummary(skipped=len(images) - len(todo) - len(known))
    s.failed = [(p, f"{e} (recorded by an earlier run; --retry-failed tries it again)") for p, e in known.items()]
    t0, info = time.perf_counter(), {"model": opts.model or "", "loading": loading}
    bad: list[_Result] = []
    if todo and not opts.endpoint:
        todo, bad = _readable(todo)
    if todo or bad:
        backend = _serve if opts.endpoint else local_backend
        results = backend(todo, opts, info) if todo else iter(())
        with closing(_chain(bad, results)) as results:
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
                    if r.broken:
                        _record_failure(r, opts)
                if progress:
                    progress(n, len(todo) + len(bad), s.tokens)
    if opts.csv:
        _final_csv(images, opts)
    s.seconds, s.model, s.load_seconds = time.perf_counter() - t0, info["model"], info.get("load_seconds", 0.0)
    return s


def _chain(first: list[_Result], rest: Iterator[_Result]) -> Iterator[_Result]:
    """``first``, then ``rest``; closing it closes ``rest`` (the backend's pools and engine)."""
    try:
        yield from first
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close:
            close()


@contextmanager
def progress_bar(console=None, quiet: bool = False) -> Iterator[tuple[Callable, Callable]]:
    """Progress for :func:`caption`, as ``report.Phases`` shows it (a bar on a terminal, a line every
    few seconds in a log): yields its ``(progress, loading)`` callbacks."""
    from rich.console import Console

    from ..report import Phases

    with Phases(console or Console(), quiet) as phases:
        live: dict[str, Callable] = {}

        def progress(n: int, total: int, tokens: int = 0) -> None:
            if "images" not in live:
                live["images"] = phases.start("captioning", total, "images")
            live["images"](n, total, tokens=tokens)

        def loading(done: int, total: int) -> None:
            if "load" not in live:
                live["load"] = phases.start("loading the model", total, "B")
            live["load"](done, total)
        yield progress, loading
