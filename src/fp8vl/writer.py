"""Writing a checkpoint folder: staging and atomic rename, shard assignment, parallel chunk jobs,
the index, the non-weight files, and the check after writing. Shared by quantize and dequantize.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock, Timeout

from .errors import FP8VLError, InternalError
from .kernel import all_finite, non_finite_count
from .shards import Scratch, ShardWriter, Slot, TensorInfo, layout, read_bytes
from .source import INDEX, OTHER_WEIGHTS, SKIP_DIRS

log = logging.getLogger("fp8vl")
COPY_BYTES = 16 << 20     # bytes per job when copying a tensor unchanged (x 2 x workers in flight)
SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Piece:
    """``data``'s bytes belong in output tensor ``name`` from its byte ``at`` (any dtype: written as raw
    bytes). ``data`` may be a view of the job's read buffer: it is written before that buffer is reused."""

    name: str
    at: int
    data: torch.Tensor


@dataclass(frozen=True)
class Chunk:
    """What one job made: the pieces to write, and a note handed on to ``slot_done`` with the other notes
    of its slot (quantize: the chunk's first row and its error, for drift.py)."""

    pieces: tuple[Piece, ...]
    note: object = None


@dataclass(frozen=True)
class Job:
    """``run(scratch)`` reads ``nbytes`` source bytes (into ``scratch``, its thread's read buffer) and
    returns the Chunk to write. It writes nothing itself: ``write_shards`` does."""

    nbytes: int
    run: Callable[[Scratch], Chunk]


def _copy_chunk(t: TensorInfo, name: str, at: int, n: int, finite: bool, scratch: Scratch) -> Chunk:
    data = read_bytes(t.file, t.offset + at, n, scratch)
    if finite and not all_finite(data.view(t.torch_dtype)):
        bad = non_finite_count(data.view(t.torch_dtype))
        raise FP8VLError(f"{t.file}: tensor {t.name} holds {bad} NaN/Inf value(s) (it is kept as "
                         f"{t.dtype}, not quantized); fix the source")
    return Chunk((Piece(name, at, data),))


def copy_jobs(name: str, t: TensorInfo, finite: bool = False) -> list[Job]:
    """Copy tensor ``t`` byte for byte as ``name``, 16 MB a job; with ``finite``, a floating-point
    tensor holding NaN or Inf is refused (one min/max pass per chunk)."""
    check = finite and t.dtype in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
    spans = [(at, min(COPY_BYTES, t.nbytes - at)) for at in range(0, t.nbytes, COPY_BYTES)] or [(0, 0)]
    return [Job(n, partial(_copy_chunk, t, name, at, n, check)) for at, n in spans]


def check_paths(source: Path, output: Path, overwrite: bool) -> None:
    """OUTPUT outside SOURCE; absent or empty, or (with ``overwrite``) a checkpoint folder."""
    if output == source or source in output.parents:
        raise FP8VLError(f"{output}: OUTPUT must not be SOURCE or inside it; choose a folder outside {source}")
    if output in source.parents:
        raise FP8VLError(f"{output}: OUTPUT contains SOURCE; choose another folder")
    if not output.exists():
        return
    if not output.is_dir():
        raise FP8VLError(f"{output}: is a file, not a folder (--overwrite replaces only checkpoint folders); "
                         f"move it away or choose another OUTPUT")
    entries = sorted(p.name for p in output.iterdir())
    if entries and not overwrite:
        raise FP8VLError(f"{output}: exists and is not empty; pass --overwrite to replace it")
    if entries and not ("config.json" in entries or any(e.endswith(".safetensors") for e in entries)):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FP8VLError(f"{output}: --overwrite replaces only a checkpoint folder (with config.json or "
                         f".safetensors files), and this one holds {shown}; choose another OUTPUT")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Resumable(FP8VLError):
    """A failure that running the same command again gets past (a download that broke off): a
    resumable Staging keeps its folder for it, as for Ctrl-C, SIGTERM or a full disk."""


def _du(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks: the output shards are sparse until written)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


class Staging:
    """One writer per OUTPUT, and nothing half-written that looks complete.

    ``with Staging(source, out, overwrite) as st`` takes the lock ``.NAME.fp8vl-lock`` beside OUTPUT
    (an flock: the kernel releases it when the process ends, SIGKILL included; a second run is
    refused), checks OUTPUT under the lock, and removes a staging folder left by a run that no
    longer holds the lock (saying so). ``st.begin(need)`` checks the free space and returns the
    folder to write into, ``.NAME.fp8vl-partial/output``; ``st.commit()`` renames it to OUTPUT.
    Leaving the block removes the staging folder (after commit it holds only the replaced OUTPUT)
    and the lock file; a full disk becomes one FP8VLError line.

    The staging folder is named after OUTPUT, not after a process, and records its owner in
    ``owner.json``: whoever holds the lock owns it, so a later run can tell a dead run's folder
    from a live one's.

    Resumable runs (a hub download) pass ``resume``, a JSON-able dict naming what the run makes
    (source repo, resolved commit, output-shaping options, fp8vl version). It is written to
    ``resume.json`` in the staging folder; a later run whose ``resume`` is equal keeps the folder
    (``st.resumed``) instead of removing it, and a run that ends without committing, for any reason
    but bad input (an FP8VLError that is not ``Resumable``), leaves it for the next run.
    """

    def __init__(self, source: Path, out: Path, overwrite: bool, resume: dict | None = None):
        self.source, self.out, self.overwrite = source, out, overwrite
        self.dir = self.folder_for(out)
        self.lock_file = out.parent / f".{out.name}.fp8vl-lock"
        self.lock = FileLock(self.lock_file, timeout=0)
        self.resume = json.loads(json.dumps(resume)) if resume is not None else None   # as read back
        self.resumed = False
        self._owned = False
        self._committed = False

    @staticmethod
    def folder_for(out: Path) -> Path:
        return out.parent / f".{out.name}.fp8vl-partial"

    def __enter__(self) -> "Staging":
        made_parent = not self.out.parent.exists()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            held = self.lock_file.exists()
            if not held:                  # we locked a file the previous owner had just unlinked
                self.lock.release()
        except Timeout:                   # (an OSError too: caught first)
            held = False
        except OSError as e:
            raise FP8VLError(f"{self.out.parent}: cannot write there ({e.strerror}); choose another OUTPUT") from e
        if not held:
            if made_parent:
                try:
                    self.out.parent.rmdir()
                except OSError:
                    pass
            raise FP8VLError(f"{self.out}: another fp8vl run is writing it (it holds {self.lock_file}); "
                             f"wait for it to finish or choose another OUTPUT")
        try:
            check_paths(self.source, self.out, self.overwrite)   # again, now that no other run can change it
            self._remove_stale()
        except BaseException:
            self._release()
            raise
        return self

    def _remove_stale(self) -> None:
        """We hold the lock, so a staging folder here belongs to a run that ended without cleaning up
        (killed, or the machine went down); earlier versions named theirs after their PID. A resumable
        run keeps one whose manifest is its own."""
        if self.dir.exists() or self.dir.is_symlink():
            try:
                o = json.loads((self.dir / "owner.json").read_text())
                owner = f"pid {o['pid']} on {o['host']}, started {o['started']}"
            except (OSError, ValueError, KeyError, TypeError):
                owner = "owner unknown"
            try:
                manifest = json.loads((self.dir / "resume.json").read_text())
            except (OSError, ValueError):
                manifest = None
            if self.resume is not None and manifest == self.resume and self.dir.is_dir() and \
                    not self.dir.is_symlink():
                self.resumed = True
                log.warning(f"resuming from {self.dir} ({_size(_du(self.dir))} kept): left by an fp8vl run of "
                            f"the same source, commit and options that did not finish ({owner})")
            else:
                why = " (another source, commit or options)" if manifest is not None else ""
                _remove(self.dir)
                log.warning(f"removed {self.dir}: left by an fp8vl run that did not finish ({owner}){why}")
        for p in self.out.parent.glob(f".{glob.escape(self.out.name)}.fp8vl-*-*"):
            m = re.fullmatch(r"\.(.+)\.fp8vl-(?:partial|old)-(\d+)", p.name)
            if m and m.group(1) == self.out.name and not _alive(int(m.group(2))):
                _remove(p)
                log.warning(f"removed {p}: left by an fp8vl run that did not finish (pid {m.group(2)})")

    def folder(self, name: str) -> Path:
        """``name`` inside the staging folder, created (with owner.json and resume.json) on first use."""
        if not self._owned:
            self.dir.mkdir(exist_ok=self.resumed)
            owner = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "output": self.out.name}
            (self.dir / "owner.json").write_text(json.dumps(owner) + "\n")
            if self.resume is not None:
                (self.dir / "resume.json").write_text(json.dumps(self.resume, indent=1) + "\n")
            self._owned = True
        (self.dir / name).mkdir(exist_ok=True)
        return self.dir / name

    def begin(self, need: int) -> Path:
        """Check that ``need`` bytes fit beside OUTPUT (less what a resumed staging folder already holds);
        create the staging folder; return where to write."""
        free = shutil.disk_usage(self.out.parent).free
        have = _du(self.dir) if self.dir.is_dir() else 0
        if need - have > free:
            raise FP8VLError(f"{self.out}: needs {_size(need - have)} but {self.out.parent} has {_size(free)} free; "
                             f"free some space or choose an OUTPUT on another disk")
        return self.folder("output")

    def commit(self) -> None:
        """Rename the finished output into place; a replaced OUTPUT moves into the staging folder first
        and is deleted with it."""
        if self.out.exists():
            self.out.rename(self.dir / "replaced")
        (self.dir / "output").rename(self.out)
        self._committed = True

    def _release(self) -> None:
        # Unlinked while still held: a run that opened the old file sees it gone and is refused,
        # so two runs never hold two different lock files for one OUTPUT.
        self.lock_file.unlink(missing_ok=True)
        self.lock.release()

    def __exit__(self, kind, exc, tb) -> None:
        keep = (self.resume is not None and not self._committed and exc is not None and self.dir.is_dir()
                and (not isinstance(exc, FP8VLError) or isinstance(exc, Resumable)))
        try:
            if keep:
                log.warning(f"kept {self.dir} ({_size(_du(self.dir))}: complete downloads and finished output "
                            f"parts): run the same command again to resume, or delete it")
            else:
                _remove(self.dir)
        finally:
            self._release()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "kept what was finished, to resume" if keep else "the partial output was removed"
            raise FP8VLError(f"{self.out}: no space left on the disk of {self.out.parent} while writing; "
                             f"{what}; free some space and run again") from exc


def other_files(src: Path, weight_files: tuple[Path, ...],
                rewritten: tuple[str, ...] = ("config.json", "README.md", "fp8vl-errors.json")
                ) -> tuple[list[str], list[str]]:
    """The non-weight files to copy byte for byte, and the weights in other formats left out
    (``rewritten``: written by fp8vl itself; an FP8 checkpoint's error file does not describe its copy)."""
    copied, skipped = [], []
    weights = {p.resolve() for p in weight_files}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            p = Path(root) / f
            rel = p.relative_to(src)
            if p.resolve() in weights or str(rel) in rewritten:
                continue
            (skipped if p.suffix in OTHER_WEIGHTS or p.suffix == ".safetensors" else copied).append(str(rel))
    return copied, skipped


def copy_files(src: Path, dst: Path, files: list[str]) -> None:
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)


def bytes_to_write(src: Path, files: list[str], tensor_bytes: int, n_tensors: int) -> int:
    """What the output takes on disk: tensors, copied files, and headers, index, config and card
    (generously: 512 bytes per tensor and 1 MiB)."""
    return tensor_bytes + sum((src / f).stat().st_size for f in files) + 512 * n_tensors + (1 << 20)


def assign_shards(units: list[list[Slot]], max_bytes: int) -> list[list[Slot]]:
    """Fill output shards in order; the slots of one unit (a weight and its scale) share a shard."""
    shards: list[list[Slot]] = [[]]
    size = 0
    for slots in units:
        n = sum(s.nbytes for s in slots)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(slots)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def kept_slots(tmp: Path, shards: list[list[Slot]], done: set[str]) -> set[str]:
    """Of the slots an earlier run wrote (``done``, from its journal), those whose shard file in ``tmp``
    has exactly this plan's header and size, so that their bytes are where this run puts them."""
    kept: set[str] = set()
    for shard, name in zip(shards, shard_names(len(shards))):
        names = {s.name for s in shard} & done
        if not names:
            continue
        head, placed = layout(shard, SHARD_METADATA)
        try:
            with open(tmp / name, "rb") as f:
                ok = os.fstat(f.fileno()).st_size == len(head) + sum(s.nbytes for s in placed) and \
                    f.read(len(head)) == head
        except OSError:
            ok = False
        if ok:
            kept |= names
    return kept


SlotDone = Callable[[Slot, Path, list], None]   # (slot, its shard file, its jobs' notes in job order)


def write_shards(tmp: Path, shards: list[list[Slot]], jobs_for: Callable[[Slot], list[Job]], workers: int,
                 progress: Callable[[int, int], None] | None, total: int, kept: set[str] = frozenset(),
                 slot_done: SlotDone | None = None) -> dict[str, str]:
    """Write every shard: run each slot's jobs (``jobs_for(slot)``) and write their chunks into the
    slot's shard file; once all of a slot's chunks are written, ``slot_done(slot, shard file, notes)``
    runs on the thread that wrote the last one. Returns the weight map. Slots in ``kept`` (see
    ``kept_slots``) are already in their shard file and are not written again.

    ``workers`` 1: a plain loop on the calling thread. More: a thread pool, at most 2 x workers jobs in
    flight (this bounds memory), torch one thread per job (the parallelism is across jobs). Either way
    results, failures and ``progress`` are handled on the calling thread, so an exception there
    (Ctrl-C included) stops the run: jobs not started are cancelled and the error re-raised.
    """
    names = shard_names(len(shards))
    with (_Loop(progress, total) if workers == 1 else _Pool(workers, progress, total)) as run:
        writer = None
        try:
            for shard, name in zip(shards, names):
                writer = ShardWriter(tmp / name, shard, SHARD_METADATA, {s.name for s in shard} & kept)
                for slot in shard:
                    if slot.name in kept:
                        continue
                    jobs = jobs_for(slot)
                    tally = _Tally(slot, writer.path, len(jobs), slot_done)
                    for i, job in enumerate(jobs):
                        run.submit(job, writer, tally, i)
                run.drain()
                writer.close()
        except BaseException:
            run.cancel()
            if writer is not None:
                writer.abort()
            raise
    return {s.name: names[i] for i, shard in enumerate(shards) for s in shard}


def _write(writer: ShardWriter, chunk: Chunk) -> object:
    for p in chunk.pieces:
        writer.write(p.name, p.at, p.data)
    return chunk.note


class _Tally:
    """One slot's jobs: calls ``slot_done`` once the last of them is written (at once if there are none)."""

    def __init__(self, slot: Slot, path: Path, n: int, slot_done: SlotDone | None):
        self.slot, self.path, self.slot_done = slot, path, slot_done
        self.notes: list = [None] * n
        self.left = n
        self.lock = threading.Lock()
        if n == 0 and slot_done is not None:
            slot_done(slot, path, [])

    def written(self, i: int, note: object) -> None:
        with self.lock:
            self.notes[i] = note
            self.left -= 1
            last = self.left == 0
        if last and self.slot_done is not None:
            self.slot_done(self.slot, self.path, self.notes)


class _Loop:
    """``--workers 1``: each job runs on the calling thread when it is submitted. No pool, and torch's
    thread count is left as the caller set it."""

    def __init__(self, progress: Callable[[int, int], None] | None, total: int):
        self.progress, self.total, self.done = progress, total, 0
        self.scratch = Scratch()

    def __enter__(self) -> "_Loop":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, job: Job, writer: ShardWriter, tally: _Tally, i: int) -> None:
        tally.written(i, _write(writer, job.run(self.scratch)))
        self.done += job.nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)

    def drain(self) -> None:
        pass

    def cancel(self) -> None:
        pass


class _Pool:
    """``--workers N``: jobs on N threads, at most 2N in flight; results settled on the calling thread.

    Each pool thread sets torch's intra-op thread count to 1 as it starts: N jobs at once, each with
    torch's own N threads, would run N x N threads on N cores. torch has no per-thread setting (see
    docs/decisions.md for what the call does to other threads); the process default is put back after."""

    def __init__(self, workers: int, progress: Callable[[int, int], None] | None, total: int):
        self.workers, self.progress, self.total, self.done = workers, progress, total, 0
        self.pending: dict[Future, int] = {}
        self.local = threading.local()

    def _start_thread(self) -> None:
        torch.set_num_threads(1)
        self.local.scratch = Scratch()       # one read buffer per pool thread

    def __enter__(self) -> "_Pool":
        self.threads = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fp8vl", initializer=self._start_thread)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.pool.shutdown(wait=True)
        finally:
            torch.set_num_threads(self.threads)

    def _run(self, job: Job, writer: ShardWriter, tally: _Tally, i: int) -> None:
        tally.written(i, _write(writer, job.run(self.local.scratch)))

    def submit(self, job: Job, writer: ShardWriter, tally: _Tally, i: int) -> None:
        while len(self.pending) >= 2 * self.workers:
            self._settle(block=True)
        self.pending[self.pool.submit(self._run, job, writer, tally, i)] = job.nbytes
        self._settle(block=False)

    def drain(self) -> None:
        while self.pending:
            self._settle(block=True)

    def cancel(self) -> None:
        for f in self.pending:
            f.cancel()
        wait(self.pending)

    def _settle(self, block: bool) -> None:
        finished = wait(self.pending, return_when=FIRST_COMPLETED)[0] if block else \
            [f for f in self.pending if f.done()]
        for f in finished:
            n = self.pending.pop(f)
            f.result()                      # re-raises a job's failure here
            self.done += n
            if self.progress is not None:
                self.progress(self.done, self.total)


def write_index(tmp: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_config(tmp: Path, config: dict) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_output(out: Path, slots: dict[str, Slot], scale_suffix: str | None) -> None:
    """Reopen what was written with the safetensors library and check it against the plan:
    every tensor present with its dtype and shape, nothing else, every scale finite and > 0."""
    from safetensors import safe_open

    seen = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                seen[name] = (sl.get_dtype(), tuple(sl.get_shape()))
                if scale_suffix and name.endswith(scale_suffix):
                    s = f.get_tensor(name).float()
                    if not torch.isfinite(s).all() or (s <= 0).any():
                        raise InternalError(f"{shard}: scale {name} has zero, negative or non-finite values after writing")
    for name, slot in slots.items():
        if name not in seen:
            raise InternalError(f"{out}: tensor {name} missing after writing")
        if seen[name] != (slot.dtype, slot.shape):
            raise InternalError(f"{out}: tensor {name} is {seen[name]}, expected {(slot.dtype, slot.shape)}")
    if len(seen) != len(slots):
        raise InternalError(f"{out}: unexpected tensors {sorted(set(seen) - set(slots))[:5]}")
