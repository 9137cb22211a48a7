"""The decode step's attention block on the GPU in three launches: pure tensor-in/tensor-out.

One new token per row r of a static cache k_cache, v_cache [B, KV, L, D] (rows 0..b-1 decode):
- ``qk_norm_rope_cache``: qkv split, per-head q/k RMSNorm (Qwen3), rotary, the cache writes at
  position lens[r]; one launch, replacing ~15 small torch kernels per layer;
- ``decode_attention``: grouped-query attention over positions 0..lens[r], flash-decoding (the
  sequence split over programs when b * KV alone cannot fill the GPU, then a combine), optionally
  with the o projection's activation quantization fused; one or two launches;
- ``add_rmsnorm_quant``: the residual add fused into ``gemm.rmsnorm_quant``.

Numerics. ``qk_norm_rope_cache`` is Transformers' bf16 math, one rounding per op, bit for bit,
except where the RMSNorm's float32 sum of squares (another summation order than torch's) or its
rsqrt (the GPU's approximate rsqrt on both sides, ``1/sqrt`` under the interpreter) round
differently: rare one-ulp flips of the bf16 output (gemm.rmsnorm_quant has the same bound).
``decode_attention``: float32 scores and softmax state; the softmax weights are rounded to bf16
for the p @ v product (as FlashAttention does) and normalized by their own sum, so each output is a
convex combination of v's rows whose weights are off by at most 2^-9 relative: |out - exact| <=
2^-9 * max|v| + one bf16 rounding of the output. The quantized output is
``numerics.quantize_activations`` of that bf16 output, bit for bit.

Every launch is CUDA-graph capturable: no host syncs, shapes from the arguments only; lens is
read on the device (the loop over positions stops at lens[r]). Positions lens[r] >= L are not
written (the reference's index_put would fault there).
"""

from __future__ import annotations

import math

import torch
import triton

from . import attention_kernels as ak
from .gemm import col_major_scales, output_parts
from .numerics import BLOCK, FP8

BLOCK_N = 64        # cache positions per step of the attention loop
MAX_SPLITS = 32
INVARIANT_CHUNK = 64  # positions per split of the batch-invariant decode (the default's at b = 1, ~350 tokens)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, b: int, what: str) -> tuple[int, int, int]:
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] < b:
        raise ValueError(f"{what}: need k_cache, v_cache [B, KV, L, D] alike with B >= {b} rows; got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _, kv, L, d = k_cache.shape
    if d not in (64, 128, 256) or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError(f"{what}: head_dim {d} must be 64, 128 or 256 and contiguous in the caches")
    if k_cache.dtype != torch.bfloat16 or v_cache.dtype != torch.bfloat16:
        raise ValueError(f"{what}: the caches must be bf16; got {k_cache.dtype}, {v_cache.dtype}")
    return kv, L, d


def qk_norm_rope_cache(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       lens: torch.Tensor) -> torch.Tensor:
    """qkv [b, (H + 2KV) * D] bf16 (or its GEMV's split-K partials [S, b, (H + 2KV) * D], summed
    here: gemm.output_parts) -> roped q [b, H, D] bf16; writes roped k and plain v of row r into
    k_cache / v_cache [B, KV, L, D] at [r, :, lens[r], :] (lens [b] int64).

    Per head: RMSNorm with q_norm / k_norm [D] when given (Qwen3; None for Llama and Qwen2.5),
    then x * cos + rotate_half(x) * sin with cos, sin [b, D] bf16 (this step's rotary tables).
    """
    qkv, splits, stride_s = output_parts(qkv, "qk_norm_rope_cache")
    b = qkv.shape[0]
    kv, L, d = _check_cache(k_cache, v_cache, b, "qk_norm_rope_cache")
    width = qkv.shape[1]
    if width % d or width // d <= 2 * kv or qkv.dtype != (torch.float32 if splits else torch.bfloat16):
        raise ValueError(f"qk_norm_rope_cache: qkv must be bf16 [b, (H + 2*{kv}) * {d}] or its split-K partials; "
                         f"got {tuple(qkv.shape)} {qkv.dtype}")
    h = width // d - 2 * kv
    if cos.shape != (b, d) or sin.shape != (b, d) or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"qk_norm_rope_cache: cos, sin must be [{b}, {d}] (last dim contiguous); got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if (q_norm is None) != (k_norm is None) or (q_norm is not None and (q_norm.shape != (d,) or k_norm.shape != (d,))):
        raise ValueError(f"qk_norm_rope_cache: give both q_norm and k_norm [{d}] (Qwen3) or neither")
    if lens.shape != (b,):
        raise ValueError(f"qk_norm_rope_cache: lens must be [{b}]; got {tuple(lens.shape)}")
    q = torch.empty((b, h, d), dtype=torch.bfloat16, device=qkv.device)
    norm = q_norm is not None
    qn = q_norm.contiguous() if norm else cos      # unread when NORM is off
    kn = k_norm.contiguous() if norm else cos
    ak.qk_norm_rope_cache_kernel[(b, h + kv)](
        qkv, qn, kn, cos, sin, k_cache, v_cache, lens, q, eps, L, qkv.stride(0), cos.stride(0), sin.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3], stride_s, H=h, KV=kv, D=d, NORM=norm, SPLITS=splits,
        num_warps=1 if d <= 64 else 2)
    return q


def _sm_count(device: torch.device) -> int:
    # the interpreter has no SMs; 8 keeps its programs few and still splits
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def attention_splits(b: int, kv: int, L: int, sms: int) -> int:
    """Sequence splits so that b * KV * splits programs make about two waves of the GPU, each
    split at least one BLOCK_N block of a full cache; 1 when b * KV alone fills it."""
    return max(1, min(triton.cdiv(2 * sms, b * kv), triton.cdiv(L, BLOCK_N), MAX_SPLITS))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                     scale: float, quantize: bool = False, *, splits: int | None = None,
                     chunk: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention of one token per row: q [b, H, D] bf16 over cache positions
    0..lens[r] of k_cache, v_cache [B, KV, L, D] (query head h reads KV head h // (H / KV)).

    Returns out [b, H*D] bf16, or with ``quantize`` (out_q [b, H*D] e4m3, out_s [b, H*D/128]
    float32 column-major), equal to ``numerics.quantize_activations(out)`` (D = 64 groups two heads).
    ``splits`` overrides the sequence split (tests); by default ``attention_splits``, which depends
    on the batch. ``chunk`` (a multiple of BLOCK_N): split s holds positions [s * chunk, (s + 1) *
    chunk) and the splits are merged one after the other, so each row's result depends on its own
    length only, not on the batch or the cache length (batch-invariant; ``INVARIANT_CHUNK``).
    """
    if q.ndim != 3 or q.dtype != torch.bfloat16:
        raise ValueError(f"decode_attention: q must be bf16 [b, H, D]; got {tuple(q.shape)} {q.dtype}")
    b, h, d = q.shape
    kv, L, dc = _check_cache(k_cache, v_cache, b, "decode_attention")
    if dc != d or h % kv:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not match the caches {tuple(k_cache.shape)} "
                         f"(head_dim equal, H a multiple of KV)")
    if lens.shape != (b,):
        raise ValueError(f"decode_attention: lens must be [{b}]; got {tuple(lens.shape)}")
    if quantize and (d > BLOCK or (h * d) % BLOCK):
        raise ValueError(f"decode_attention: quantize needs head_dim 64 or 128 and H*D a multiple of {BLOCK}; "
                         f"got H={h}, D={d}")
    q = q.contiguous()
    dev = q.device
    group = h // kv
    if chunk:
        if chunk % BLOCK_N:
            raise ValueError(f"decode_attention: chunk must be a multiple of {BLOCK_N}; got {chunk}")
        s, final = triton.cdiv(L, chunk), False
    else:
        s = splits or attention_splits(b, kv, L, _sm_count(dev))
        s = max(1, min(s, triton.cdiv(L, BLOCK_N)))
        final = s == 1 and (not quantize or d == BLOCK)
    if quantize:
        out = torch.empty((b, h * d), dtype=FP8, device=dev)
        out_s = col_major_scales(b, h * d // BLOCK, dev)
    else:
        out = torch.empty((b, h * d), dtype=torch.bfloat16, device=dev)
        out_s = torch.empty((0, 0), dtype=torch.float32, device=dev)
    if final:
        m = l_ = acc = out_s                       # unused by the FINAL kernel
    else:
        m = torch.empty((b, h, s), dtype=torch.float32, device=dev)
        l_ = torch.empty((b, h, s), dtype=torch.float32, device=dev)
        acc = torch.empty((b, h, s, d), dtype=torch.float32, device=dev)
    ak.decode_attention_kernel[(b, kv, s)](
        q, k_cache, v_cache, lens, out, out_s, m, l_, acc, scale * math.log2(math.e), s,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *(out_s.stride() if quantize else (0, 0)),
        H=h, D=d, G=group, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        FINAL=final, QUANT=quantize, ON_CPU=dev.type == "cpu", CHUNK=chunk or 0, num_warps=4, num_stages=2)
    if not final:
        hpg = BLOCK // d if quantize else 1
        ak.combine_kernel[(b, h // hpg)](
            m, l_, acc, out, out_s, s, *(out_s.stride() if quantize else (0, 0)), H=h, D=d, HPG=hpg,
            S_PAD=triton.next_power_of_2(s), QUANT=quantize, IN_ORDER=bool(chunk),
            num_warps=1 if d * hpg <= 128 else 2)
    return (out, out_s) if quantize else out


def _norm_warps(k: int, splits: int) -> int:
    """Warps of add_rmsnorm_quant's one program per row: from K = 4096 on, 16 (32 when it sums split-K
    partials, 2-8 float32 rows for each bf16 one): 0.2 us (bf16 delta) and 0.8-0.9 us (2-4
    partials) faster than 8 at M = 1 and 8 on an H200 (BENCHMARKS.md): one SM reads the row."""
    return (32 if splits else 16) if k >= 4096 else 4


def add_rmsnorm_quant(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add fused into ``gemm.rmsnorm_quant``: x, delta [M, K] bf16 (delta may be its
    GEMV's split-K partials [S, M, K], summed here: gemm.output_parts), weight [K] -> (x + delta
    [M, K] bf16, q [M, K] e4m3, scale [M, K/128] float32 column-major), q and scale as
    ``gemm.rmsnorm_quant(x + delta, weight, eps)`` (same numerics, same rare one-ulp flips)."""
    m, k = x.shape
    delta, splits, stride_s = output_parts(delta, "add_rmsnorm_quant")
    if k % BLOCK or delta.shape != x.shape or weight.shape != (k,) or x.dtype != torch.bfloat16:
        raise ValueError(f"add_rmsnorm_quant: need x, delta [M, K] bf16 with K % 128 == 0 and weight [K]; got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(delta.shape)}, {tuple(weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((m, k), dtype=x.dtype, device=x.device)
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = col_major_scales(m, k // BLOCK, x.device)
    inv_k = float(torch.tensor(1.0, dtype=torch.float32) / k)   # float32(1/K), as torch's CUDA mean
    ak.add_rmsnorm_quant_kernel[(m,)](x, delta, y, weight.contiguous(), q, s, k, x.stride(0), delta.stride(0),
                                      s.stride(0), s.stride(1), stride_s, inv_k, eps,
                                      GROUPS=triton.next_power_of_2(k // BLOCK), ON_CPU=x.device.type == "cpu",
                                      SPLITS=splits, num_warps=_norm_warps(k, splits))
    return y, q, s
