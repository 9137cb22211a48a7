"""``fp8vl quantize``: stream a BF16 checkpoint into an FP8 block-128 one.

Shape of the job (after llm-compressor's model-free path): check every source shard's header
first; plan; then write each output shard as a set of small independent chunk jobs (read rows
-> quantize -> write at a precomputed offset) run on a thread pool with a bounded number in
flight, so memory stays a few chunks whatever the shard or tensor size. The index is written
once, at the end; everything goes to a temporary folder that is renamed into place last.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .errors import FP8VLError
from .formats import quantization_config, scale_suffix
from .kernel import BLOCK, FP8, fp8_nan_count, quantize_weight
from .options import QuantizeOptions
from .plan import Entry, Plan, make_plan, scale_shape
from .shards import NAMES, ShardWriter, Slot, TensorInfo, read_bytes, read_rows
from .tp import tp_report
from .source import INDEX, OTHER_WEIGHTS, Checkpoint, check_dtypes, open_checkpoint, resolve

CHUNK_BYTES = 4 << 20     # source bytes per quantize job: fits in L2/L3 next to its float32 copy
COPY_BYTES = 64 << 20     # bytes per job when copying a kept tensor unchanged
SKIP_DIRS = {".git", ".cache", ".huggingface"}


@dataclass
class Result:
    source: Path
    output: Path | None
    plan: Plan
    scale_dtype: str
    bytes_in: int = 0           # source weight bytes
    bytes_out: int = 0          # output weight bytes
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)
    before: dict[str, int] = field(default_factory=dict)   # output entry -> its source bytes
    after: dict[str, int] = field(default_factory=dict)    # output entry -> bytes written (scale too)
    tp: dict = field(default_factory=dict)                 # tensor-parallel report (tp.tp_report)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _out_slots(e: Entry, src: TensorInfo, fmt: str, scale_dtype: torch.dtype) -> list[Slot]:
    if not e.quantize:
        return [Slot(e.name, src.dtype, src.shape, src.nbytes)]
    sr, sc = scale_shape(e)
    item = torch.empty((), dtype=scale_dtype).element_size()
    return [Slot(e.name, "F8_E4M3", e.shape, e.shape[0] * e.shape[1]),
            Slot(f"{e.module}.{scale_suffix(fmt)}", NAMES[scale_dtype], (sr, sc), sr * sc * item)]


def _assign_shards(units: list[list[Slot]], max_bytes: int) -> list[list[Slot]]:
    """Fill output shards in order; a weight and its scale always share a shard."""
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


def source_matrix(t: TensorInfo, e: Entry) -> torch.Tensor:
    """The [out, in] source weight of a quantized entry, reading only the bytes it needs
    (for a split expert: rows r0:r1 of expert e of a fused 3-D tensor)."""
    if e.expert is None:
        return read_rows(t, 0, t.shape[0])
    _, a, b = t.shape
    r0, r1 = e.rows
    if not e.transpose:  # rows r0:r1 of expert e are contiguous on disk
        item = t.itemsize
        start = t.offset + (e.expert * a + r0) * b * item
        return read_bytes(t.file, start, (r1 - r0) * b * item).view(t.torch_dtype).view(r1 - r0, b)
    sl = read_rows(t, e.expert, e.expert + 1)[0]           # [in, out]
    return sl.t()[r0:r1].contiguous()


def _quantize_job(w: torch.Tensor, scale_dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_weight(w.to(device, non_blocking=False), scale_dtype)
    return q.cpu(), s.cpu()


def _jobs(e: Entry, t: TensorInfo, fmt: str, scale_dtype: torch.dtype, device: str,
          writer: ShardWriter) -> list[tuple[int, Callable[[], None]]]:
    """(source bytes, job) pairs that together write entry ``e`` into ``writer``."""
    if not e.quantize:
        def copy(at: int, n: int) -> Callable[[], None]:
            return lambda: writer.write(e.name, at, read_bytes(t.file, t.offset + at, n))
        return [(min(COPY_BYTES, t.nbytes - at), copy(at, min(COPY_BYTES, t.nbytes - at)))
                for at in range(0, t.nbytes, COPY_BYTES)] or [(0, copy(0, 0))]

    scale_name = f"{e.module}.{scale_suffix(fmt)}"
    n_out, k = e.shape
    s_item = torch.empty((), dtype=scale_dtype).element_size()
    s_cols = scale_shape(e)[1]

    def put(r0: int, q: torch.Tensor, s: torch.Tensor) -> None:
        if fp8_nan_count(q):
            raise FP8VLError(f"tensor {e.source}: quantization produced NaN (source has NaN/Inf?)")
        if not torch.isfinite(s.float()).all() or (s.float() <= 0).any():
            raise FP8VLError(f"tensor {e.source}: non-finite weights give an invalid scale; fix the source")
        writer.write(e.name, r0 * k, q)
        writer.write(scale_name, (r0 // BLOCK) * s_cols * s_item, s)

    if e.expert is not None:
        def expert_job() -> None:
            put(0, *_quantize_job(source_matrix(t, e), scale_dtype, device))
        return [(n_out * k * t.itemsize, expert_job)]

    rows = max(BLOCK, (CHUNK_BYTES // max(1, k * t.itemsize)) // BLOCK * BLOCK)

    def rows_job(r0: int, r1: int) -> Callable[[], None]:
        return lambda: put(r0, *_quantize_job(read_rows(t, r0, r1), scale_dtype, device))
    return [((min(r0 + rows, n_out) - r0) * k * t.itemsize, rows_job(r0, min(r0 + rows, n_out)))
            for r0 in range(0, n_out, rows)]


def _copy_other_files(src: Path, dst: Path, weight_files: tuple[Path, ...]) -> tuple[list[str], list[str]]:
    """Copy every non-weight file byte for byte (config.json and README.md are written anew)."""
    copied, skipped = [], []
    weights = {p.resolve() for p in weight_files}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            p = Path(root) / f
            rel = p.relative_to(src)
            if p.resolve() in weights or str(rel) in ("config.json", "README.md"):
                continue
            if p.suffix in OTHER_WEIGHTS or p.suffix == ".safetensors":
                skipped.append(str(rel))
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / rel)
            copied.append(str(rel))
    return copied, skipped


def _check_paths(source: Path, output: Path, overwrite: bool) -> None:
    if output == source or source in output.parents:
        raise FP8VLError(f"{output}: OUTPUT must not be SOURCE or inside it; choose a folder outside {source}")
    if output in source.parents:
        raise FP8VLError(f"{output}: OUTPUT contains SOURCE; choose another folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FP8VLError(f"{output}: exists and is not empty; pass --overwrite to replace it")


def check_output(out: Path, slots: dict[str, Slot], fmt: str) -> None:
    """Reopen what was written with the safetensors library and check it against the plan."""
    from safetensors import safe_open

    seen = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                seen[name] = (sl.get_dtype(), tuple(sl.get_shape()))
                if name.endswith(scale_suffix(fmt)):
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


def quantize(source: str | Path, output: str | Path | None, opts: QuantizeOptions = QuantizeOptions(),
             progress: Callable[[int, int], None] | None = None, command: str | None = None) -> Result:
    """Convert ``source`` (folder or hub id) to FP8 in ``output``; with ``opts.dry_run``, only plan.

    ``progress(done_bytes, total_bytes)`` is called from worker threads as jobs finish.
    """
    t0 = time.perf_counter()
    src = resolve(source, opts.revision)
    out = Path(output).expanduser().resolve() if output is not None else None
    if out is not None:
        _check_paths(src, out, opts.overwrite)
    ckpt = open_checkpoint(src)
    plan = make_plan(ckpt.config, {n: t.shape for n, t in ckpt.tensors.items()}, opts)
    check_dtypes(ckpt, [e.source for e in plan.entries if e.quantize])
    dtype_name = opts.scale_dtype or ("float32" if opts.format == "fp8" else _model_dtype(ckpt))
    scale_dtype = getattr(torch, dtype_name)
    units = [_out_slots(e, ckpt.tensors[e.source], opts.format, scale_dtype) for e in plan.entries]
    res = Result(src, out, plan, dtype_name,
                 bytes_in=sum(t.nbytes for t in ckpt.tensors.values()),
                 bytes_out=sum(s.nbytes for u in units for s in u),
                 before={e.name: _source_bytes(e, ckpt.tensors[e.source]) for e in plan.entries},
                 after={e.name: sum(s.nbytes for s in u) for e, u in zip(plan.entries, units)},
                 tp=tp_report(ckpt.config, {e.module: e.shape for e in plan.entries if e.quantize}))
    if opts.dry_run or out is None:
        return res
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise FP8VLError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")

    tmp = out.parent / f".{out.name}.fp8vl-partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        res.copied, res.skipped = _copy_other_files(src, tmp, ckpt.weight_files)
        shards = _assign_shards(units, opts.max_shard_size)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        res.shards = names
        owner = {s.name: names[i] for i, shard in enumerate(shards) for s in shard}
        _write_shards(ckpt, plan, shards, names, tmp, opts, scale_dtype, progress, res.bytes_in)
        weight_map = dict(sorted(owner.items()))
        index = {"metadata": {"total_size": res.bytes_out}, "weight_map": weight_map}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = dict(ckpt.config)
        config["quantization_config"] = quantization_config(opts.format, list(plan.not_converted))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        check_output(tmp, {s.name: s for u in units for s in u}, opts.format)
        res.seconds = time.perf_counter() - t0
        from .card import write_card

        write_card(tmp, res, opts, command)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res.seconds = time.perf_counter() - t0
    return res


def _source_bytes(e: Entry, t: TensorInfo) -> int:
    return e.shape[0] * e.shape[1] * t.itemsize if e.expert is not None else t.nbytes


def _model_dtype(ckpt: Checkpoint) -> str:
    d = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or \
        ckpt.config.get("text_config", {}).get("dtype") or "bfloat16"
    return d if d in ("bfloat16", "float32") else "bfloat16"


def _write_shards(ckpt: Checkpoint, plan: Plan, shards: list[list[Slot]], names: list[str], tmp: Path,
                  opts: QuantizeOptions, scale_dtype: torch.dtype,
                  progress: Callable[[int, int], None] | None, total: int) -> None:
    by_name = {e.name: e for e in plan.entries}
    window = threading.BoundedSemaphore(2 * opts.workers)  # jobs in flight: bounds memory
    done = [0]
    lock = threading.Lock()
    failed = threading.Event()
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if opts.workers > 1 else threads)  # parallel over jobs, not inside ops
    try:
        with ThreadPoolExecutor(opts.workers, thread_name_prefix="fp8vl") as pool:
            for shard, name in zip(shards, names):
                writer = ShardWriter(tmp / name, shard, {"format": "pt"})
                futures: list[Future] = []
                for slot in shard:
                    e = by_name.get(slot.name)
                    if e is None:      # a scale: written by its weight's jobs
                        continue
                    for nbytes, job in _jobs(e, ckpt.tensors[e.source], opts.format, scale_dtype,
                                             opts.device, writer):
                        window.acquire()
                        if failed.is_set():   # stop feeding the pool after the first failure
                            window.release()
                            break
                        fut = pool.submit(job)
                        fut.add_done_callback(lambda f, n=nbytes: _finish(f, n, window, done, lock,
                                                                          failed, progress, total))
                        futures.append(fut)
                for f in futures:
                    f.result()        # re-raises the first failure
                writer.close()
    finally:
        torch.set_num_threads(threads)


def _finish(fut: Future, nbytes: int, window: threading.BoundedSemaphore, done: list[int],
            lock: threading.Lock, failed: threading.Event,
            progress: Callable[[int, int], None] | None, total: int) -> None:
    window.release()
    if fut.exception() is not None:
        failed.set()
    elif progress is not None:
        with lock:
            done[0] += nbytes
            progress(done[0], total)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to OUTPUT; an old OUTPUT (with --overwrite) goes only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.fp8vl-old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
