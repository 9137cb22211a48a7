"""FP8 block-scaled GEMM on the GPU: y = x @ (q * scale)^T with x quantized per token and 128 channels.

Two paths, both W8A8 with the same math as ``kernel.quantize_activations`` + ``kernel.dequantize_weight``:
- prefill (M > DECODE_MAX_M): activations quantized by a Triton kernel (one read of x), then
  PyTorch's ``scaled_mm`` with 1x128 activation and 128x128 weight block scales (cuBLAS);
- decode (M <= DECODE_MAX_M, memory-bound): one Triton kernel that quantizes the few activation rows
  per 128-wide K block in registers, streams the FP8 weight once, applies both scales per block and
  writes the output in its final dtype (no extra launches: at batch 1 launches cost as much as bytes).
GPU only (Triton, CUDA); the CPU and older GPUs use the simulation in runtime.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .kernel import BLOCK, FP8, dequantize_weight, fake_quantize_activations

DECODE_MAX_M = 16


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, s_stride_m, s_stride_k,
                      BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """A [BLOCK_M, 128] tile per program: per-row amax, scale = amax/448 (0 -> 1), q = clamp(x/scale)."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = rows < M
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    # div_rn: IEEE division, as kernel.quantize_activations does (a plain "/" may round differently)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 448.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=mask[:, None])
    tl.store(s_ptr + rows * s_stride_m + g * s_stride_k, scale, mask=mask)


def quantize_activations_gpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 128 == 0) -> (q [M, K] e4m3, scale [M, K/128] float32, column-major as cuBLAS reads it)."""
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty((k // BLOCK, m), dtype=torch.float32, device=x.device).t()
    grid = (triton.cdiv(m, 32), k // BLOCK)
    _act_quant_kernel[grid](x, q, s, m, k, x.stride(0), s.stride(0), s.stride(1), BLOCK_M=32, GROUP=BLOCK)
    return q, s


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "UNROLL": u}, num_warps=4, num_stages=st)
             for bn in (16, 32, 64) for u in (1, 2) for st in (3, 5)],
    key=["N", "K"],
)
@triton.jit
def _decode_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, xs_stride_m, xs_stride_k, ws_stride_n,
                   M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """y[:, n0:n0+BLOCK_N] = sum over 128-wide K blocks of (xq . wq) * x_scale * w_scale (fp32 accumulate).

    UNROLL K blocks per iteration put more weight bytes in flight per program."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M_PAD)
    offs_k = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kbs = K // 128
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, kbs, UNROLL):
        for u in tl.static_range(UNROLL):
            kb = kb0 + u
            live = kb < kbs
            k0 = kb * 128
            x = tl.load(xq_ptr + offs_m[:, None] * K + k0 + offs_k[None, :], mask=mask_m[:, None] & live, other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * K + k0 + offs_k[None, :], mask=mask_n[:, None] & live, other=0.0)
            xs = tl.load(xs_ptr + offs_m * xs_stride_m + kb * xs_stride_k, mask=mask_m & live, other=0.0)
            ws = tl.load(ws_ptr + (offs_n // 128) * ws_stride_n + kb, mask=mask_n & live, other=0.0)
            acc += tl.dot(x, tl.trans(w)) * xs[:, None] * ws[None, :]
    ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def decode_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M <= 16, K] bf16/fp16 -> [M, N] in x's dtype: quantize x (one small launch), stream W once."""
    m, k = x.shape
    n = w.shape[0]
    xq, xs = quantize_activations_gpu(x)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _decode_kernel[grid](xq, xs, w, w_scale, y, m, n, k, xs.stride(0), xs.stride(1), w_scale.stride(0), M_PAD=16)
    return y


def prefill_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> [M, N] through cuBLAS' block-scaled FP8 GEMM.

    cuBLAS wants the token count of the activation scales a multiple of 4 and the weight's
    K blocks a multiple of 4: pad both (zero rows quantize to 0; padded blocks meet no data).
    """
    m, k = x.shape
    pad_m = -m % 4
    if pad_m:
        x = F.pad(x, (0, 0, 0, pad_m))
    xq, xs = quantize_activations_gpu(x)
    ws = w_scale
    if ws.shape[1] % 4:
        ws = F.pad(ws, (0, -ws.shape[1] % 4), value=1.0)
    y = F.scaled_mm(xq, w.t(), xs, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
                    output_dtype=x.dtype)
    return y[:m] if pad_m else y


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ dequant(w [N, K] e4m3, w_scale [N/128, K/128] f32)^T + bias, W8A8."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    # Measured on an H100 (BENCHMARKS.md): the Triton kernel wins for M <= 16 except on long K
    # (down_proj, K = 12288) beyond M = 1, where too few programs stream the weight.
    if m <= DECODE_MAX_M and (m == 1 or k <= 8192):
        y = decode_linear(x2, w, w_scale)
    elif w.shape[0] % BLOCK == 0:
        y = prefill_linear(x2, w, w_scale)
    else:  # cuBLAS' block mode wants whole 128-row blocks; rare partial shapes take the exact slow path
        y = (fake_quantize_activations(x2.float()) @ dequantize_weight(w, w_scale, torch.float32).t()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w.shape[0])
