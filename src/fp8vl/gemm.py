"""FP8 block-scaled GEMM on the GPU: y = x @ (q * scale)^T with x quantized per token and 128 channels.

Two paths, both W8A8 with the same math as ``kernel.quantize_activations`` + ``kernel.dequantize_weight``:
- prefill (M >= 8): activations quantized by a Triton kernel (one read of x), then PyTorch's
  ``scaled_mm`` with 1x128 activation and 128x128 weight block scales (cuBLAS);
- decode (M < 8, where cuBLAS refuses the block mode or runs at low efficiency): a Triton kernel
  that streams the FP8 weight once and applies both scales per 128-wide K block, split over K
  so that enough thread blocks keep the memory system busy.
GPU only (Triton, CUDA); the CPU and older GPUs use the simulation in runtime.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel import BLOCK, FP8, FP8_MAX

DECODE_MAX_M = 8


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, s_stride_m, s_stride_k, GROUP: tl.constexpr):
    """One program per (token, 128-group): amax, scale = amax/448 (0 -> 1), q = clamp(x/scale)."""
    m = tl.program_id(0)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    x = tl.load(x_ptr + m * stride_xm + offs).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = amax / 448.0
    scale = tl.where(scale == 0.0, 1.0, scale)
    q = tl.clamp(x / scale, -448.0, 448.0)
    tl.store(q_ptr + m * K + offs, q.to(tl.float8e4nv))
    tl.store(s_ptr + m * s_stride_m + g * s_stride_k, scale)


def quantize_activations_gpu(x: torch.Tensor, column_major_scales: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 128 == 0) -> (q [M, K] e4m3, scale [M, K/128] float32).

    Scales are laid out column-major (stride (1, M)), as cuBLAS' 1x128 block mode reads them.
    """
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty((k // BLOCK, m), dtype=torch.float32, device=x.device).t() if column_major_scales else \
        torch.empty((m, k // BLOCK), dtype=torch.float32, device=x.device)
    _act_quant_kernel[(m, k // BLOCK)](x, q, s, m, k, x.stride(0), s.stride(0), s.stride(1), GROUP=BLOCK)
    return q, s


@triton.jit
def _decode_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, KB, xs_stride_m, xs_stride_k,
                   ws_stride_n, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[:, n0:n0+BLOCK_N] (+)= sum over this program's K blocks of (xq . wq) * xs * ws, fp32 accumulate."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M_PAD)
    offs_k = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k, KB, SPLIT_K):
        k0 = kb * 128
        w = tl.load(w_ptr + offs_n[:, None] * K + k0 + offs_k[None, :], mask=mask_n[:, None], other=0.0)
        x = tl.load(xq_ptr + offs_m[:, None] * K + k0 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        part = tl.dot(x, tl.trans(w))                                   # [M_PAD, BLOCK_N] fp32
        xs = tl.load(xs_ptr + offs_m * xs_stride_m + kb * xs_stride_k, mask=mask_m, other=0.0)
        ws = tl.load(ws_ptr + (offs_n // 128) * ws_stride_n + kb, mask=mask_n, other=0.0)
        acc += part * xs[:, None] * ws[None, :]
    ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


def _decode(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    m, k = xq.shape
    n = w.shape[0]
    block_n = 32
    n_blocks = triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(w.device).multi_processor_count
    split_k = max(1, min(k // BLOCK, (2 * sms) // n_blocks))   # ~2 programs per SM
    y = torch.zeros((m, n), dtype=torch.float32, device=w.device)
    _decode_kernel[(n_blocks, split_k)](xq, xs, w, ws, y, m, n, k, k // BLOCK, xs.stride(0), xs.stride(1),
                                        ws.stride(0), M_PAD=16, BLOCK_N=block_n, SPLIT_K=split_k)
    return y


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ dequant(w [N, K] e4m3, w_scale [N/128, K/128] f32)^T + bias, W8A8."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m < DECODE_MAX_M:
        xq, xs = quantize_activations_gpu(x2, column_major_scales=False)
        y = _decode(xq, xs, w, w_scale).to(x.dtype)
    else:
        xq, xs = quantize_activations_gpu(x2)
        y = torch.nn.functional.scaled_mm(xq, w.t(), xs, torch.nn.functional.ScalingType.BlockWise1x128,
                                          w_scale.t(), torch.nn.functional.ScalingType.BlockWise128x128,
                                          output_dtype=x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w.shape[0])
