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

from .version import __version__
from .kernel import BLOCK, cdiv

FILE = "fp8vl-errors.json"
Part = tuple[float, float, float, float]     # (sum err^2, sum W^2, max |err|, max |W|) of one chunk


@cache
def _e4m3_values() -> torch.Tensor:
    """The float32 value of each of the 256 e4m3fn codes (NaN codes included)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _absmax(x: torch.Tensor) -> float:
    lo, hi = torch.aminmax(x)          # no |x| temporary
    return max(-float(lo), float(hi))


def chunk_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> Part:
    """Error of one quantized chunk: w [N, K] source, q [N, K] e4m3 codes, scale [cdiv(N,b), cdiv(K,b)].

    Runs next to the quantizer on every chunk, so it is written for speed: the codes become floats
    through a 256-entry table (torch converts float8 element by element on CPUs, 5x slower), in
    place. A chunk whose largest weight is so small (or large) that its float32 squares would
    underflow (overflow) is rescaled first.
    """
    n, k = w.shape
    kb = cdiv(k, block)
    codes = _e4m3_values().to(q.device).index_select(0, q.reshape(-1).view(torch.uint8).int())
    s_rows = scale.float().repeat_interleave(block, 0)[:n]                     # [N, kb]
    if k % block:        # partial last column tile: pad the codes to whole tiles
        codes = torch.nn.functional.pad(codes.view(n, k), (0, kb * block - k))
    e = codes.view(n, kb, block).mul_(s_rows[:, :, None]).view(n, kb * block)[:, :k]
    wf = w.float()
    e = e.sub_(wf) if not k % block else e - wf                               # W' - W, [N, K]
    amax, max_err = _absmax(wf), _absmax(e)
    if amax == 0 or not math.isfinite(amax):
        return 0.0, 0.0, max_err, amax
    f = 1.0 if 1e-15 < amax < 1e15 else 1.0 / amax
    if f != 1.0:
        e, wf = e * f, wf * f
    return _sum_squares(e, block) / f / f, _sum_squares(wf, block) / f / f, max_err, amax


def _sum_squares(x: torch.Tensor, block: int) -> float:
    """sum(x^2), the same bits whatever torch's thread count: float32 sums of 128-element rows (one
    thread each), then an exact sum of those (math.fsum). A whole-tensor reduction splits its work
    by thread count, so ``--workers`` would change the last digits of the error file."""
    rows = x.reshape(-1, block) if x.numel() % block == 0 else x.reshape(x.shape[0], -1)
    return math.fsum((rows * rows).sum(dim=1).tolist())


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
