"""Per-tensor quantization error, measured while converting and kept in the output.

Once the source is gone (``quantize ORG/NAME --stream`` deletes it as it goes), ``verify --source``
has nothing to compare with; so every FP8 tensor's error is computed from the very chunk being
quantized and written to ``fp8vl-errors.json`` beside the card. Per tensor:

- ``sqnr_db``: 10 log10(sum W^2 / sum (W - W')^2), W' = codes x block scale (null: exact);
- ``rel_error``: sqrt(sum (W - W')^2 / sum W^2), the same error as a ratio;
- ``max_rel_error``: max |W - W'| / max |W|, the worst single weight against the tensor's range.
"""

from __future__ import annotations

import json
import math
import threading
from functools import cache
from pathlib import Path

import torch

from ..version import __version__
from ..kernels.numerics import BLOCK, cdiv

FILE = "fp8vl-errors.json"
Part = tuple[float, float, float, float]     # (sum err^2, sum W^2, max |err|, max |W|) of one chunk


@cache
def _e4m3_values() -> torch.Tensor:
    """The float32 value of each of the 256 e4m3fn codes (NaN codes included)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _absmax(x: torch.Tensor) -> float:
    lo, hi = torch.aminmax(x)          # no |x| temporary
    return max(-float(lo), float(hi))


SLAB = 1 << 18   # elements per temporary (1 MiB of float32): stays in the cache and the allocator's heap


def chunk_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> Part:
    """Error of one quantized chunk: w [N, K] source, q [N, K] e4m3 codes, scale [cdiv(N,b), cdiv(K,b)].

    Runs next to the quantizer on every chunk, so it is written for speed: the codes become floats
    through a 256-entry table (torch converts float8 element by element on CPUs, 5x slower), and
    the work goes in slabs of rows of SLAB elements: full-size float32 temporaries were fresh
    mappings that page-faulted in, which cost as much as the arithmetic. A chunk whose largest
    weight is so small (or large) that its float32 squares would underflow (overflow) is rescaled.
    """
    n, k = w.shape
    kb = cdiv(k, block)
    amax = _absmax(w)
    exact = amax == 0 or not math.isfinite(amax)          # nothing to measure (or nothing finite)
    f = 1.0 if exact or 1e-15 < amax < 1e15 else 1.0 / amax
    lut = _e4m3_values().to(q.device)
    codes = q.reshape(n, k).view(torch.uint8)
    s_rows = scale.float().repeat_interleave(block, 0)[:n]                     # [N, kb]
    err2: list[float] = []
    sig2: list[float] = []
    maxima: list[float] = []
    step = max(1, SLAB // (kb * block))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        c = lut.index_select(0, codes[r0:r1].reshape(-1).int())
        if k % block:    # partial last column tile: pad the codes to whole tiles
            c = torch.nn.functional.pad(c.view(r1 - r0, k), (0, kb * block - k))
        e = c.view(r1 - r0, kb, block).mul_(s_rows[r0:r1, :, None]).view(r1 - r0, kb * block)[:, :k]
        ws = w[r0:r1]
        e = e.sub_(ws) if not k % block else e - ws                          # W' - W, [rows, K]
        maxima.append(_absmax(e))
        if not exact:
            if f != 1.0:
                e, ws = e * f, ws.float() * f
            err2 += _row_squares(e, block)
            sig2 += _row_squares(ws, block)
    max_err = float("nan") if any(math.isnan(m) for m in maxima) else max(maxima, default=0.0)
    if exact:
        return 0.0, 0.0, max_err, amax
    return math.fsum(err2) / f / f, math.fsum(sig2) / f / f, max_err, amax


def _row_squares(x: torch.Tensor, block: int) -> list[float]:
    """Each 128-element row's sum of squares (whole rows when K is not a multiple of 128), the same
    bits whatever torch's thread count: float32 norms, one thread per row, squared in float64. The
    caller sums them exactly (math.fsum): a whole-tensor reduction splits its work by thread count,
    so ``--workers`` would change the last digits of the error file."""
    rows = x.reshape(-1, block) if x.shape[-1] % block == 0 else x
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).double().square().tolist()


def _short(x: float) -> float:
    return float(f"{x:.6g}")


def summarize_parts(parts: list[Part]) -> dict[str, float | None]:
    """One tensor's figures from its chunks' parts, summed in the order given (row order: the same
    numbers whatever order the worker threads finished in)."""
    err2 = sig2 = max_err = amax = 0.0
    for e2, s2, me, am in parts:
        err2, sig2, max_err, amax = err2 + e2, sig2 + s2, max(max_err, me), max(amax, am)
    return {"sqnr_db": round(10 * math.log10(sig2 / err2), 3) if err2 and sig2 else None,
            "rel_error": _short(math.sqrt(err2 / sig2)) if sig2 else 0.0,
            "max_rel_error": _short(max_err / amax) if amax else 0.0}


class Drift:
    """Collects chunk errors (from any thread); ``finish(name)`` turns one tensor's into figures."""

    def __init__(self, known: dict[str, dict] | None = None) -> None:
        self._parts: dict[str, dict[int, Part]] = {}
        self._done: dict[str, dict] = dict(known or {})
        self._lock = threading.Lock()

    def add(self, name: str, r0: int, part: Part) -> None:
        with self._lock:
            self._parts.setdefault(name, {})[r0] = part

    def finish(self, name: str) -> dict:
        with self._lock:
            if name not in self._done:
                parts = self._parts.pop(name, {})
                self._done[name] = summarize_parts([parts[r] for r in sorted(parts)])
            return self._done[name]

    def result(self, names: list[str]) -> dict[str, dict]:
        return {n: self.finish(n) for n in names}


def write_errors(folder: Path, tensors: dict[str, dict]) -> None:
    doc = {"fp8vl": __version__, "measured": "while converting, against the source weights", "tensors": tensors}
    (folder / FILE).write_text(json.dumps(doc, indent=1) + "\n")


def read_errors(folder: Path) -> dict[str, dict] | None:
    """The per-tensor figures kept in ``folder``, or None when it has none (or they cannot be read)."""
    try:
        doc = json.loads((folder / FILE).read_text())
        tensors = doc["tensors"]
        return tensors if isinstance(tensors, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summary(tensors: dict[str, dict]) -> tuple[float, tuple[str, float], tuple[str, float]] | None:
    """(mean SQNR dB, (tensor, worst SQNR), (tensor, worst max relative error)); exact tensors count
    as 200 dB in the mean."""
    if not tensors:
        return None
    sq = {n: (t["sqnr_db"] if t.get("sqnr_db") is not None else 200.0) for n, t in tensors.items()}
    worst = min(sq, key=sq.__getitem__)
    worst_max = max(tensors, key=lambda n: tensors[n].get("max_rel_error") or 0.0)
    return (sum(sq.values()) / len(sq), (worst, sq[worst]), (worst_max, tensors[worst_max]["max_rel_error"]))
