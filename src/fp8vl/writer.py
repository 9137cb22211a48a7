"""Writing a checkpoint folder: staging and atomic rename, shard assignment, parallel chunk jobs,
the index, the non-weight files, and the check after writing. Shared by quantize and dequantize.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import FP8VLError
from .shards import Scratch, ShardWriter, Slot, TensorInfo, read_bytes
from .source import INDEX, OTHER_WEIGHTS

SKIP_DIRS = {".git", ".cache", ".huggingface"}
COPY_BYTES = 16 << 20     # bytes per job when copying a tensor unchanged (x 2 x workers in flight)
Job = tuple[int, Callable[[Scratch], None]]   # (source bytes it covers, the work given a read buffer)


def copy_jobs(name: str, t: TensorInfo, writer: ShardWriter) -> list[Job]:
    """Copy tensor ``t`` byte for byte into ``writer`` as ``name``, 64 MB at a time."""
    def job(at: int, n: int) -> Callable[[Scratch], None]:
        return lambda scratch: writer.write(name, at, read_bytes(t.file, t.offset + at, n, scratch))
    spans = [(at, min(COPY_BYTES, t.nbytes - at)) for at in range(0, t.nbytes, COPY_BYTES)] or [(0, 0)]
    return [(n, job(at, n)) for at, n in spans]


def check_paths(source: Path, output: Path, overwrite: bool) -> None:
    if output == source or source in output.parents:
        raise FP8VLError(f"{output}: OUTPUT must not be SOURCE or inside it; choose a folder outside {source}")
    if output in source.parents:
        raise FP8VLError(f"{output}: OUTPUT contains SOURCE; choose another folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FP8VLError(f"{output}: exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out``, renamed to ``out`` only if the block completes.

    An old ``out`` (with --overwrite) is moved aside first and deleted last; on any failure or
    interrupt the staging folder is removed, so nothing half-written looks complete.
    """
    tmp = out.parent / f".{out.name}.fp8vl-partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.fp8vl-old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_other_files(src: Path, dst: Path, weight_files: tuple[Path, ...],
                     rewritten: tuple[str, ...] = ("config.json", "README.md")) -> tuple[list[str], list[str]]:
    """Copy every non-weight file byte for byte; returns (copied, skipped weights in other formats)."""
    copied, skipped = [], []
    weights = {p.resolve() for p in weight_files}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            p = Path(root) / f
            rel = p.relative_to(src)
            if p.resolve() in weights or str(rel) in rewritten:
                continue
            if p.suffix in OTHER_WEIGHTS or p.suffix == ".safetensors":
                skipped.append(str(rel))
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / rel)
            copied.append(str(rel))
    return copied, skipped


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


def write_shards(tmp: Path, shards: list[list[Slot]], jobs_for: Callable[[Slot, ShardWriter], list[Job]],
                 workers: int, progress: Callable[[int, int], None] | None, total: int) -> dict[str, str]:
    """Write every shard with ``jobs_for(slot, writer)``'s jobs on a thread pool; returns the weight map.

    At most 2 x workers jobs are in flight (this bounds memory). Results, failures and ``progress``
    are handled on the calling thread, so an exception there (Ctrl-C included) stops the run: jobs
    not started are cancelled and the error re-raised. Torch runs one thread per job: the
    parallelism is across jobs.
    """
    names = shard_names(len(shards))
    done = 0
    pending: dict[Future, int] = {}

    def settle(block: bool) -> None:
        nonlocal done
        finished, _ = wait(pending, return_when=FIRST_COMPLETED) if block else ([f for f in pending if f.done()], 0)
        for f in finished:
            n = pending.pop(f)
            f.result()                      # re-raises a job's failure here
            done += n
            if progress is not None:
                progress(done, total)

    local = threading.local()   # one Scratch read buffer per worker thread

    def run(job: Callable[[Scratch], None]) -> None:
        if not hasattr(local, "scratch"):
            local.scratch = Scratch()
        job(local.scratch)

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if workers > 1 else threads)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="fp8vl") as pool:
            writer = None
            try:
                for shard, name in zip(shards, names):
                    writer = ShardWriter(tmp / name, shard, {"format": "pt"})
                    for slot in shard:
                        for nbytes, job in jobs_for(slot, writer):
                            while len(pending) >= 2 * workers:
                                settle(block=True)
                            pending[pool.submit(run, job)] = nbytes
                            settle(block=False)
                    while pending:
                        settle(block=True)
                    writer.close()
            except BaseException:
                for f in pending:
                    f.cancel()
                wait(pending)
                if writer is not None:
                    writer.abort()
                raise
    finally:
        torch.set_num_threads(threads)
    return {s.name: names[i] for i, shard in enumerate(shards) for s in shard}


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
                        raise FP8VLError(f"{shard}: scale {name} has zero, negative or non-finite values")
    for name, slot in slots.items():
        if name not in seen:
            raise FP8VLError(f"{out}: tensor {name} missing after writing")
        if seen[name] != (slot.dtype, slot.shape):
            raise FP8VLError(f"{out}: tensor {name} is {seen[name]}, expected {(slot.dtype, slot.shape)}")
    if len(seen) != len(slots):
        raise FP8VLError(f"{out}: unexpected tensors {sorted(set(seen) - set(slots))[:5]}")
