"""``fp8vl dequantize``: an FP8 block checkpoint (fp8vl, Qwen/DeepSeek or compressed-tensors) back to
BF16, streaming, with ``quantization_config`` removed. Split MoE experts stay split (2-D per expert).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..errors import FP8VLError
from ..options import DequantizeOptions
from ..checkpoint.formats import SCALE_SUFFIXES
from ..kernels.numerics import BLOCK, cdiv, dequantize_weight
from ..checkpoint.shards import NAMES, Scratch, Slot, TensorInfo, read_rows
from ..checkpoint.source import local_folder, open_checkpoint
from .staging import Staging, bytes_to_write, check_paths, copy_files, other_files
from .writer import (Chunk, Job, Piece, assign_shards, check_output, copy_jobs, write_config, write_index,
                     write_shards)

SCALES = SCALE_SUFFIXES
CHUNK_BYTES = 8 << 20     # FP8 bytes per job


def _scale_of(name: str, tensors: dict[str, TensorInfo]) -> TensorInfo | None:
    module = name.rsplit(".", 1)[0]
    return next((tensors[f"{module}.{s}"] for s in SCALES if f"{module}.{s}" in tensors), None)


def _dequantize_chunk(name: str, t: TensorInfo, scale: TensorInfo, dtype: torch.dtype, r0: int, r1: int,
                      scratch: Scratch) -> Chunk:
    """Rows r0:r1 of FP8 weight ``t`` [n, k] as ``dtype`` (codes x block scale), written at row r0."""
    s = read_rows(scale, r0 // BLOCK, cdiv(r1, BLOCK))
    q = read_rows(t, r0, r1, scratch)
    return Chunk((Piece(name, r0 * t.shape[1] * dtype.itemsize, dequantize_weight(q, s, dtype)),))


def dequantize(source: str | Path, output: str | Path, opts: DequantizeOptions = DequantizeOptions(),
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Every FP8 weight of ``source`` as ``opts.dtype`` (q * scale per tile), everything else as is."""
    src, out = local_folder(source), Path(output).expanduser().resolve()
    out_dtype = getattr(torch, opts.dtype)
    check_paths(src, out, opts.overwrite)
    ckpt = open_checkpoint(src, allow_quantized=True)
    if not ckpt.config.get("quantization_config"):
        raise FP8VLError(f"{src / 'config.json'}: no quantization_config; this checkpoint is not quantized")
    units, plan = [], {}
    item = out_dtype.itemsize
    for name, t in ckpt.tensors.items():
        if name.endswith(SCALES):
            continue
        scale = _scale_of(name, ckpt.tensors) if t.dtype == "F8_E4M3" else None
        if t.dtype.startswith("F8") and scale is None:
            raise FP8VLError(f"{t.file}: FP8 tensor {name} has no weight scale; cannot dequantize it")
        plan[name] = (t, scale)
        n = t.nbytes * item if scale is not None else t.nbytes
        units.append([Slot(name, NAMES[out_dtype] if scale is not None else t.dtype, t.shape, n)])

    def jobs_for(slot: Slot) -> list[Job]:
        t, scale = plan[slot.name]
        if scale is None:
            return copy_jobs(slot.name, t)
        n, k = t.shape
        rows = max(BLOCK, (CHUNK_BYTES // max(1, k)) // BLOCK * BLOCK)
        spans = [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]
        return [Job((r1 - r0) * k, partial(_dequantize_chunk, slot.name, t, scale, out_dtype, r0, r1))
                for r0, r1 in spans]

    total = sum(t.nbytes for t, _ in plan.values())   # what the jobs report: scales are read, not counted
    out_bytes = sum(s.nbytes for u in units for s in u)
    copied, _ = other_files(src, ckpt.weight_files)
    with Staging(src, out, opts.overwrite) as stage:
        tmp = stage.begin(bytes_to_write(src, copied, out_bytes, len(units)))
        copy_files(src, tmp, copied)
        weight_map = write_shards(tmp, assign_shards(units, opts.max_shard_size), jobs_for, opts.workers,
                                 progress, total)
        write_index(tmp, weight_map, out_bytes)
        config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
        write_config(tmp, config)
        check_output(tmp, {s.name: s for u in units for s in u}, None)
        from .card import write_dequantized_card

        write_dequantized_card(tmp, src, out, opts.dtype)
        stage.commit()
    return out
