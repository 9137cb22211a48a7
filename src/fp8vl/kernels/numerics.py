"""FP8 E4M3 block numerics: pure tensor-in/tensor-out functions, nothing else.

Weights: one scale per 128x128 tile, ``W ~= q * scale`` (the format calls the stored scale
``weight_scale_inv`` although it is the multiplier). Activations: one scale per token and
per group of 128 input channels, computed at run time (W8A8 "dynamic").
"""

from __future__ import annotations

import torch

from ..checkpoint.formats import BLOCK, cdiv  # noqa: F401  (re-exported: the tile size is a format fact)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> [cdiv(N,b)*b, cdiv(K,b)*b], the missing part as zeros (partial tiles)."""
    n, k = w.shape
    pn, pk = cdiv(n, block) * block - n, cdiv(k, block) * block - k
    if pn or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return w


def block_amax(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """max|W| per tile: [N, K] -> [cdiv(N,b), cdiv(K,b)] float32.

    Taken in the source dtype: |x| and max are exact in any float format, so this equals the
    float32 amax without a float32 copy of the whole tile.
    """
    wp = _pad_to_blocks(w, block)
    n, k = wp.shape
    return wp.view(n // block, block, k // block, block).abs().amax(dim=(1, 3)).float()


def scales_from_amax(amax: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale = amax / 448, rounded to the dtype it is stored in.

    A tile whose scale is 0 (all-zero tile, or an amax so small the scale underflows) gets
    scale 1: its values all quantize to 0 either way, and 0/0 would make the tile NaN.
    """
    # A tensor divisor, not a Python scalar: CUDA divides by a scalar as a multiplication by its
    # reciprocal, which rounds differently; this keeps CPU and GPU bit-identical (true division).
    scale = (amax / torch.full_like(amax, FP8_MAX)).to(scale_dtype)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_with_scales(w: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """q = clamp(W / scale, +-448) cast to e4m3fn (round half to even); W [N, K], scale per tile.

    The cast does not saturate (|x| >= 465 becomes NaN), hence the clamp. The division is
    done in float32 with the *stored* scale, so ``q * stored_scale`` is what a loader computes.
    """
    n, k = w.shape
    wp = _pad_to_blocks(w, block).to(torch.float32, copy=True)  # a copy: divided in place below
    pn, pk = wp.shape
    s = scale.float()[:, None, :, None]
    q = wp.view(pn // block, block, pk // block, block).div_(s).clamp_(-FP8_MAX, FP8_MAX)
    return q.view(pn, pk)[:n, :k].to(FP8)


def quantize_weight(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.float32, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (q [N, K] e4m3fn, scale [cdiv(N,b), cdiv(K,b)] scale_dtype)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    scale = scales_from_amax(block_amax(w, block), scale_dtype)
    return quantize_with_scales(w, scale, block), scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: int = BLOCK
) -> torch.Tensor:
    """(q [N, K] fp8, scale [cdiv(N,b), cdiv(K,b)]) -> q * scale per tile, as ``dtype``."""
    n, k = q.shape
    s = scale.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return (q.float() * s).to(dtype)


def quantize_activations(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-128-channel quantization: x [..., K] -> (q [..., K], scale [..., K/group]).

    What servers do to a linear's input at run time (float32 scales, no zero-tile rounding to a
    narrower dtype). K must be a multiple of ``group``, as the run-time kernels require.
    """
    *lead, k = x.shape
    if k % group:
        raise ValueError(f"activation width {k} is not a multiple of {group}")
    xg = x.float().reshape(*lead, k // group, group)
    amax = xg.abs().amax(dim=-1)
    scale = amax / torch.full_like(amax, FP8_MAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(*lead, k), scale


def fake_quantize_activations(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """x -> dequant(quant(x)) in x's dtype: the activation error a W8A8 server adds."""
    *lead, k = x.shape
    q, scale = quantize_activations(x, group)
    xq = q.float().reshape(*lead, k // group, group) * scale[..., None]
    return xq.reshape(*lead, k).to(x.dtype)


def w8a8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """What a W8A8 block kernel computes, on any device: x [..., K] -> [..., N] float32, with x
    quantized per token and per 128 channels and w = (q [N, K] e4m3, scale per 128x128 tile).

    Each row's result depends on that row alone, whatever else shares the call (batch-invariant):
    a float32 GEMM rounds a row differently when it shares the call with other rows (its blocking
    depends on M), and the next layer's activation quantization can turn that last bit into another
    FP8 code. Here, per 128-wide K group, the FP8 codes' products are summed in float64, where the
    sum is exact in any order (e4m3 values are multiples of 2^-9 below 2^9: each product a multiple
    of 2^-18 below 2^18, 128 of them below 2^25, so 43 bits of float64's 53), then scaled by both
    scales and added to the float32 accumulator group by group, in K order, as the GPU kernels do.
    """
    *lead, k = x.shape
    n = q.shape[0]
    xq, xs = quantize_activations(x.reshape(-1, k), group)                 # [M, K] e4m3, [M, K/g]
    ws = scale.float().repeat_interleave(group, 0)[:n]                    # [N, K/g]: per output row
    out = torch.zeros((xq.shape[0], n), dtype=torch.float32, device=x.device)
    for g in range(k // group):
        cols = slice(g * group, (g + 1) * group)
        exact = xq[:, cols].double() @ q[:, cols].double().T               # [M, N], exact
        out += exact.float() * (xs[:, g, None] * ws[None, :, g])
    return out.reshape(*lead, n)


def fp8_nan_count(q: torch.Tensor) -> int:
    """Number of NaN codes in an e4m3fn tensor (0x7F and 0xFF; e4m3fn has no infinities)."""
    return int(((q.view(torch.uint8) & 0x7F) == 0x7F).sum())


def all_finite(x: torch.Tensor) -> bool:
    """No NaN and no Inf in ``x``. One min/max pass (NaN propagates through both, +-Inf shows in one):
    measured 2-3.5 ms per 16 MB on one core, 4-20x faster than ``isfinite(x).all()``."""
    if x.numel() == 0 or not x.is_floating_point():
        return True
    if x.dtype == FP8:
        return fp8_nan_count(x) == 0
    if x.dtype == torch.float8_e5m2:
        x = x.to(torch.float16)
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def non_finite_count(x: torch.Tensor) -> int:
    """Number of NaN and Inf values in ``x`` (for messages; slower than ``all_finite``)."""
    if not x.is_floating_point():
        return 0
    if x.dtype == FP8:
        return fp8_nan_count(x)
    if x.dtype == torch.float8_e5m2:
        x = x.to(torch.float16)
    return int((~torch.isfinite(x)).sum())
