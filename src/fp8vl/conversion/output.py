"""The FP8 output of a conversion: plan its tensors, then write them as small chunk jobs.

Shape of the job (after llm-compressor's model-free path): check every source shard's header
first; plan; then write each output shard as a set of small independent chunk jobs (read rows
-> quantize -> return codes and scales, which the writer puts at precomputed offsets) run on a
thread pool with a bounded number in flight (one worker: a plain loop), so memory stays a few
chunks whatever the shard or tensor size. The index is written
once, at the end; everything goes to a temporary folder that is renamed into place last. Each
chunk's quantization error is measured as it is written (drift.py) where asked (``record_error``) and
when streaming from the hub (the source is gone afterwards). convert.py runs this for a local
folder, hub.py shard by shard as the download goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import torch

from .card import write_card
from ..checkpoint.compat import with_fields
from .drift import Drift, chunk_error, write_errors
from ..errors import FP8VLError
from ..checkpoint.formats import quantization_config, scale_suffix, text_config
from ..kernels.numerics import BLOCK, all_finite, fp8_nan_count, non_finite_count, quantize_weight
from ..options import QuantizeOptions
from ..checkpoint.plan import Entry, Plan, make_plan, scale_shape
from ..checkpoint.shards import NAMES, Scratch, Slot, TensorInfo, read_matrix, read_rows
from ..checkpoint.source import Checkpoint, check_dtypes
from ..checkpoint.tp import tp_report
from .writer import (Chunk, Job, Piece, assign_shards, check_output, copy_jobs, write_config, write_index,
                     write_shards)

Units = list[list[Slot]]   # per plan entry: its output slots (a weight, or an FP8 weight and its scale)

CHUNK_BYTES = 4 << 20     # source bytes per quantize job: fits in L2/L3 next to its float32 copy


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
    hub: str | None = None                                 # source repo id, when downloaded from the hub
    commit: str | None = None                              # the commit its revision resolved to
    errors: dict[str, dict] = field(default_factory=dict)  # FP8 tensor -> error measured while converting
    downloaded: int = 0                                    # source bytes downloaded by this run


def out_slots(e: Entry, src: TensorInfo, fmt: str, scale_dtype: torch.dtype) -> list[Slot]:
    """The output tensors of one plan entry: the kept tensor as it is, or the FP8 weight and its scale."""
    if not e.quantize:
        return [Slot(e.name, src.dtype, src.shape, src.nbytes)]
    sr, sc = scale_shape(e)
    item = scale_dtype.itemsize
    return [Slot(e.name, "F8_E4M3", e.shape, e.shape[0] * e.shape[1]),
            Slot(f"{e.module}.{scale_suffix(fmt)}", NAMES[scale_dtype], (sr, sc), sr * sc * item)]


def _quantize_job(w: torch.Tensor, scale_dtype: torch.dtype, device: str, measure: bool):
    """(codes, scales, error part or None): the error is measured where the quantizer ran."""
    wd = w.to(device, non_blocking=False)
    q, s = quantize_weight(wd, scale_dtype)
    return q.cpu(), s.cpu(), chunk_error(wd, q, s) if measure else None


def _quantize_chunk(e: Entry, t: TensorInfo, scale_name: str, scale_dtype: torch.dtype, device: str,
                    measure: bool, r0: int, r1: int, scratch: Scratch) -> Chunk:
    """Rows r0:r1 of entry ``e``'s [out, in] weight (an expert's: all of them) -> its FP8 codes, written
    at row r0, and their [cdiv(r1 - r0, 128), cdiv(in, 128)] scales at block row r0 / 128; the note is
    (r0, the chunk's error or None)."""
    w = read_rows(t, r0, r1, scratch) if e.expert is None else read_matrix(t, e.expert, e.rows, e.transpose, scratch)
    q, s, err = _quantize_job(w, scale_dtype, device, measure)
    if fp8_nan_count(q) or not all_finite(s) or (s.float() <= 0).any():
        # Either the source holds NaN/Inf, or finite weights too large for the scale dtype: say which.
        if not all_finite(w):
            raise FP8VLError(f"{t.file}: tensor {e.source} holds {non_finite_count(w)} NaN/Inf value(s); "
                             f"fix the source")
        amax = float(w.abs().max())
        raise FP8VLError(f"tensor {e.source}: its largest value {amax:.3g} needs a scale of {amax / 448:.3g}, "
                         f"which overflows a {scale_dtype_name(scale_dtype)} scale; use --scale-dtype float32 "
                         f"or bfloat16")
    s_row = scale_shape(e)[1] * scale_dtype.itemsize
    return Chunk((Piece(e.name, r0 * e.shape[1], q), Piece(scale_name, (r0 // BLOCK) * s_row, s)), (r0, err))


def _jobs(e: Entry, t: TensorInfo, fmt: str, scale_dtype: torch.dtype, device: str, measure: bool) -> list[Job]:
    """Jobs that together make entry ``e`` (and its scale); ``measure``: each chunk's error as its note."""
    if not e.quantize:
        return copy_jobs(e.name, t, finite=True)
    n_out, k = e.shape
    job = partial(_quantize_chunk, e, t, f"{e.module}.{scale_suffix(fmt)}", scale_dtype, device, measure)
    if e.expert is not None:
        return [Job(n_out * k * t.itemsize, partial(job, 0, n_out))]
    rows = max(BLOCK, (CHUNK_BYTES // max(1, k * t.itemsize)) // BLOCK * BLOCK)
    spans = [(r0, min(r0 + rows, n_out)) for r0 in range(0, n_out, rows)]
    return [Job((r1 - r0) * k * t.itemsize, partial(job, r0, r1)) for r0, r1 in spans]


class Feed(Protocol):
    """Where the writer gets source tensors: a local checkpoint, or a hub download in progress."""

    def tensor(self, name: str) -> TensorInfo:
        """The source tensor ``name``, on disk (a hub feed waits until its shard is)."""

    def entry_done(self, e: Entry, shard: Path) -> None:
        """Every byte of ``e`` is written into output shard ``shard`` (called on the thread that wrote
        the last of them: a pool thread, or the caller's with one worker)."""


def plan_conversion(ckpt: Checkpoint, out: Path | None, opts: QuantizeOptions) -> tuple[Result, Units, torch.dtype]:
    """The plan, the output slots of each entry and the scale dtype; only headers are read."""
    plan = make_plan(ckpt.config, {n: t.shape for n, t in ckpt.tensors.items()}, opts)
    check_dtypes(ckpt, [e.source for e in plan.entries if e.quantize])
    dtype_name = opts.scale_dtype or ("float32" if opts.format == "fp8" else _model_dtype(ckpt))
    scale_dtype = getattr(torch, dtype_name)
    units = [out_slots(e, ckpt.tensors[e.source], opts.format, scale_dtype) for e in plan.entries]
    res = Result(ckpt.path, out, plan, dtype_name,
                 bytes_in=sum(t.nbytes for t in ckpt.tensors.values()),
                 bytes_out=sum(s.nbytes for u in units for s in u),
                 before={e.name: _source_bytes(e, ckpt.tensors[e.source]) for e in plan.entries},
                 after={e.name: sum(s.nbytes for s in u) for e, u in zip(plan.entries, units)},
                 tp=tp_report(ckpt.config, {e.module: e.shape for e in plan.entries if e.quantize}, fmt=opts.format))
    return res, units, scale_dtype


def write_output(tmp: Path, ckpt: Checkpoint, res: Result, units: Units, scale_dtype: torch.dtype,
                 opts: QuantizeOptions, progress: Callable[[int, int], None] | None, t0: float,
                 feed: Feed | None = None, kept: set[str] = frozenset(), drift: Drift | None = None,
                 order: list[str] | None = None) -> None:
    """Shards, index, config, the check after writing, the error file and the card, into ``tmp``.
    ``kept``: slots already written by an interrupted run (see writer.kept_slots); ``order``: the
    order to write the slots in (writer.write_shards; the hub's download order)."""
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise FP8VLError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    plan = res.plan
    by_name = {e.name: e for e in plan.entries}
    # Measuring the error costs ~3x the quantization on a CPU core (measured: 0.78 -> 0.24 GB/s a core),
    # so it runs where the source will be gone (hub streaming passes its Drift) or when asked.
    drift = drift or (Drift() if opts.record_error else None)

    def jobs_for(slot: Slot) -> list[Job]:
        e = by_name.get(slot.name)   # None for a scale: its weight's jobs write it
        if e is None:
            return []
        t = ckpt.tensors[e.source] if feed is None else feed.tensor(e.source)
        return _jobs(e, t, opts.format, scale_dtype, opts.device, drift is not None)

    def slot_done(slot: Slot, shard: Path, notes: list) -> None:
        e = by_name.get(slot.name)
        if e is None:
            return
        if drift is not None and e.quantize:
            for r0, err in notes:
                drift.add(e.name, r0, err)
        if feed is not None:
            feed.entry_done(e, shard)

    shards = assign_shards(units, opts.max_shard_size)
    weight_map = write_shards(tmp, shards, jobs_for, opts.workers, progress, res.bytes_in, kept, slot_done, order)
    res.shards = sorted(set(weight_map.values()))
    write_index(tmp, weight_map, res.bytes_out)
    write_config(tmp, with_fields({**ckpt.config, "quantization_config":
                                   quantization_config(opts.format, list(plan.not_converted))}, plan.config_fields))
    check_output(tmp, {s.name: s for u in units for s in u}, scale_suffix(opts.format))
    if drift is not None:
        res.errors = drift.result([e.name for e in plan.entries if e.quantize])
        write_errors(tmp, res.errors)
    res.seconds = time.perf_counter() - t0
    write_card(tmp, res, opts)


def scale_dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _source_bytes(e: Entry, t: TensorInfo) -> int:
    return e.shape[0] * e.shape[1] * t.itemsize if e.expert is not None else t.nbytes


def _model_dtype(ckpt: Checkpoint) -> str:
    d = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or \
        text_config(ckpt.config).get("dtype") or "bfloat16"
    return d if d in ("bfloat16", "float32", "float16") else "bfloat16"


