"""Writing a checkpoint's shards: shard assignment, parallel chunk jobs, the index and config, and
the check after writing. Shared by quantize, dequantize and the hub path; OUTPUT's folder itself
(checks, staging, lock, rename, the non-weight files) is staging.py's.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..errors import FP8VLError, InternalError
from ..kernels.numerics import all_finite, non_finite_count
from ..checkpoint.shards import Scratch, ShardWriter, Slot, TensorInfo, layout, read_bytes
from ..checkpoint.source import INDEX

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
                 slot_done: SlotDone | None = None, order: list[str] | None = None) -> dict[str, str]:
    """Write every shard: run each slot's jobs (``jobs_for(slot)``) and write their chunks into the
    slot's shard file; once all of a slot's chunks are written, ``slot_done(slot, shard file, notes)``
    runs on the thread that wrote the last one. Returns the weight map. Slots in ``kept`` (see
    ``kept_slots``) are already in their shard file and are not written again.

    Shard after shard, each closed before the next opens; with ``order`` (every slot's name once),
    all shard files open first and the slots are written in that order (the bytes do not change:
    every tensor has its fixed place in its file).

    ``workers`` 1: a plain loop on the calling thread. More: a thread pool, at most 2 x workers jobs in
    flight (this bounds memory), torch one thread per job (the parallelism is across jobs). Either way
    results, failures and ``progress`` are handled on the calling thread, so an exception there
    (Ctrl-C included) stops the run: jobs not started are cancelled and the error re-raised.
    """
    names = shard_names(len(shards))
    where = {s.name: (i, s) for i, shard in enumerate(shards) for s in shard}
    if order is not None and sorted(order) != sorted(where):
        raise InternalError("write_shards: the order does not list every slot exactly once")
    # passes: (shard indices opened for it, the slots it writes in turn)
    passes = [([i], shard) for i, shard in enumerate(shards)] if order is None else \
        [(list(range(len(shards))), [where[n][1] for n in order])]
    with (_Loop(progress, total) if workers == 1 else _Pool(workers, progress, total)) as run:
        writers: dict[int, ShardWriter] = {}
        try:
            for opened, slots in passes:
                for i in opened:
                    writers[i] = ShardWriter(tmp / names[i], shards[i], SHARD_METADATA,
                                             {s.name for s in shards[i]} & kept)
                for slot in slots:
                    if slot.name in kept:
                        continue
                    writer = writers[where[slot.name][0]]
                    jobs = jobs_for(slot)
                    tally = _Tally(slot, writer.path, len(jobs), slot_done)
                    for i, job in enumerate(jobs):
                        run.submit(job, writer, tally, i)
                run.drain()
                for i in opened:
                    writers.pop(i).close()
        except BaseException:
            run.cancel()
            for writer in writers.values():
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
