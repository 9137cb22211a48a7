"""FP8 block-scaled linears on the GPU, y = x @ (q * scale)^T: pure tensor-in/tensor-out.

Numerics, by entry point:
- W8A8 (``fp8_gemm``, ``fp8_linear``, ``triton_block_gemm``, ``fp8_grouped_gemm``): activations
  quantized per token and per 128 channels (``numerics.quantize_activations``, bit for bit), both
  block scales applied per 128-wide K block, float32 accumulate: what vLLM and SGLang compute, and
  what runtime/fp8_modules.py's ``w8a8`` simulation computes up to summation order and output rounding.
- W8A16 (``w8a16_linear``): x @ dequant(W)^T with the activations left in bf16, the weight tile
  converted in registers: weight-only error (runtime/fp8_modules.py's ``dequant`` simulation), not a server's.

Paths: M <= DECODE_MAX_M runs the Triton GEMV (gemm_kernels.gemv_kernel, split-K when the matrix
is too narrow to keep the GPU's memory busy) on every card, optionally with programmatic dependent
launch (``pdl``). Larger M runs cuBLAS' block-scaled ``scaled_mm`` on SM90 (the only arch PyTorch
allows it on) and the Triton block GEMM on every other FP8 card: its tiles fetched by the TMA on
10.x/12.x Blackwell, by pointer loads on 8.9 Ada; ``backend="triton"`` forces Triton anywhere.
The fused producers (``rmsnorm_quant``, ``silu_mul_quant``) emit the quantized input of the next
linear in one pass. CPU tensors run the same kernels under ``TRITON_INTERPRET=1`` (tests).

Launch configs: the GEMV's come from a small table keyed by SM count and shape
(``decode_config``, built from ``benchmarks/tune.py`` sweeps with weights streamed from HBM), the
TMA block GEMM's from ``tma_config``. The pointer-load block GEMM's come from Triton autotune
(keyed on N, K and an M bucket) on the first eager call per shape, and from ``prefill_config``'s
table where autotune cannot run: on CPU tensors and inside a CUDA-graph capture that meets a shape
not tuned yet (autotune must time kernels, which a capture forbids). Rule for callers that
capture: run every shape once eagerly first (the usual warm-up).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
import triton

try:  # host-side tensor-memory-accelerator descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer-load block GEMM everywhere
    TensorDescriptor = None

from . import gemm_kernels as gk
from .numerics import BLOCK, FP8

DECODE_MAX_M = 16
BACKENDS = ("auto", "cublas", "triton")


@dataclass(frozen=True)
class LaunchConfig:
    """Triton meta-parameters of one launch: ``kwargs`` plus warps and pipeline stages."""
    kwargs: dict
    num_warps: int = 4
    num_stages: int = 3


def _sm_count(device: torch.device) -> int:
    # the interpreter has no SMs; 8 keeps programs few (it runs them one by one) and still splits K
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _m_bucket(m: int) -> int:
    """The block GEMM autotune's M key: powers of two up to 4096 (1 and 16 for the decode sizes, which
    the GEMV takes: it pads to 16 rows anyway)."""
    return 1 if m == 1 else 16 if m <= DECODE_MAX_M else min(triton.next_power_of_2(m), 4096)


@cache   # asked on every producer and GEMV call
def pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` can launch with programmatic dependent launch (SM90 and newer,
    a Triton with griddepcontrol): a GEMV so launched starts streaming its weight while the kernel
    before it (its input's producer) still runs. The producers always let it (a no-op otherwise)."""
    return device.type == "cuda" and gk.HAS_PDL and torch.cuda.get_device_capability(device) >= (9, 0)


def decode_config(m: int, n: int, k: int, sm_count: int, pdl: bool = False) -> LaunchConfig:
    """The GEMV's launch config (M <= 16: the same at every M), from ``benchmarks/tune.py`` sweeps
    on an H200 (132 SMs; the Qwen3-VL 2B, 8B and 32B decoder shapes, M = 1 and 8, weights streamed
    from HBM): 64-row weight tiles (the tensor cores' A operand: gemm_kernels.gemv_kernel),
    128-row ones where N gives two of them per SM (the 32B gate_up: 3.3-3.7 us faster; not with
    PDL, whose 4 stages of them would not fit the 99 KiB of 8.9 and 12.0 cards); two K blocks per
    step over 3 pipeline stages; K split in 2..8 while there are < 1.5 programs per SM or > 64 K
    blocks per split, each split keeping >= 4 K blocks. That table came within 0.3 us of each
    shape's best of 40 configs. Weight loads unmasked in N where the tiles cover it (``EVEN_N``).
    Launched with programmatic dependent launch (``pdl``): the same tiles and splits, 4 K blocks of
    weight pulled into L2 before waiting for the producer (up to 0.7 us faster than none, 0.8-1.6
    than 16), and 4 stages where the grid then fits in one wave of two programs per SM (o and down
    of the 8B: 1.4-4 us faster there, 3-4 us slower where it does not).
    A table, not autotune: autotune times one eager launch per config, whose noise and launch cost
    (~5 us) outweigh the 1-2 us between configs of a 10 us kernel (it picked 10-20% slower ones)."""
    block_n = 128 if n // 128 >= 2 * sm_count and not pdl else 64   # 4 PDL stages of 128 rows: > 99 KiB
    tiles = triton.cdiv(n, block_n)
    kbs = k // BLOCK
    split = 1
    while split < 8 and kbs // (split * 2) >= 4 and (tiles * split < 1.5 * sm_count or kbs // split > 64):
        split *= 2
    return LaunchConfig({"BLOCK_N": block_n, "SPLIT_K": split, "UNROLL": 2, "PREFETCH": 4 if pdl else 0,
                         "EVEN_N": n % block_n == 0},
                        num_warps=4, num_stages=4 if pdl and tiles * split <= 2 * sm_count else 3)


def prefill_config(m: int, n: int, k: int, sm_count: int, a_fp8: bool = True) -> LaunchConfig:
    """Default block-GEMM config, from ``benchmarks/tune.py`` on an H200: 64x128 tiles with 4 warps
    won at every Qwen3-VL-8B shape for M = 512..2048 (each K step rescales the product, so the
    accumulator of a 128-row tile costs more than it gains); 3 stages of FP8 operands (24 KB each,
    2 with a bf16 activation tile) fit Ada's 100 KB of shared memory per SM; wider bands of rows
    share weight tiles in L2 at large M."""
    return LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 32 if m >= 2048 else 8}, num_warps=4,
                        num_stages=3 if a_fp8 else 2)


def _bench(fn, quantiles):
    # few reps: the autotune pass runs once per shape, on the eager first call
    return triton.testing.do_bench(fn, warmup=3, rep=15, quantiles=quantiles)


def _autotune(configs, key, **kw):
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        return triton.autotune(configs=configs, key=key, do_bench=_bench, **kw)
    return triton.autotune(configs=configs, key=key, warmup=3, rep=15, **kw)  # older Triton


_BLOCK_GEMM_TUNED = _autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": g}, num_warps=w, num_stages=st)
     for bm, bn, g, w, st in ((64, 128, 8, 4, 3), (64, 128, 8, 4, 4), (64, 128, 32, 4, 4), (64, 64, 8, 4, 3),
                              (128, 128, 8, 8, 3), (128, 128, 8, 4, 4))],
    key=["N", "K", "M_BUCKET"])(gk.block_gemm_kernel)


def _tuned(tuner, args: dict) -> LaunchConfig | None:
    """The config autotune picked for these arguments (all passed by name), if it has run for
    them. Its cache key, as Triton builds it: the key arguments' values, then the dtype of every
    argument that has one, in call order. A key Triton builds otherwise only costs the table."""
    named = {k: v for k, v in args.items() if k in tuner.arg_names}
    key = [named[name] for name in tuner.keys] + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    cfg = getattr(tuner, "cache", {}).get(tuple(key))
    return None if cfg is None else LaunchConfig(dict(cfg.kwargs), cfg.num_warps, cfg.num_stages)


def _pick(tuner, table: LaunchConfig, args: dict) -> LaunchConfig | None:
    """Autotune's config if tuned; None when autotune should run now (eager, on a GPU); else the table's."""
    if args["w_ptr"].device.type != "cuda":
        return table
    cfg = _tuned(tuner, args)
    if cfg is None and not torch.cuda.is_current_stream_capturing():
        return None
    return cfg or table


def _run(kernel, grid, cfg: LaunchConfig, args: dict, launch_pdl: bool = False) -> None:
    extra = {"launch_pdl": True} if launch_pdl else {}
    kernel[grid(cfg.kwargs)](**args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)


def _reduce(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    mn = y.numel()
    gk.splitk_reduce_kernel[(triton.cdiv(mn, 1024),)](part, bias, y, mn, y.shape[1], SPLIT_K=part.shape[0],
                                                      HAS_BIAS=bias is not None, BLOCK=1024)


def _check(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, what: str) -> tuple[int, int, int]:
    m, k = x.shape
    n = w.shape[-2]
    if k % BLOCK or w.shape[-1] != k or w.dtype != FP8:
        raise ValueError(f"{what}: need x [M, K] with K % 128 == 0 and an e4m3 weight [N, K]; got x "
                         f"{tuple(x.shape)}, weight {tuple(w.shape)} {w.dtype}")
    if ws.shape[-2:] != (triton.cdiv(n, BLOCK), k // BLOCK):
        raise ValueError(f"{what}: weight scale {tuple(ws.shape)} does not match weight {tuple(w.shape)}")
    return m, n, k


def _scales_layout(xs: torch.Tensor, m_pad: int) -> torch.Tensor:
    """Activation scales [M, K/128] as cuBLAS reads them: column-major, M padded with ones."""
    m, g = xs.shape
    if xs.stride(0) == 1 and m == m_pad:
        return xs
    out = torch.ones((g, m_pad), dtype=torch.float32, device=xs.device).t()
    out[:m] = xs
    return out


def col_major_scales(m: int, groups: int, device) -> torch.Tensor:
    return torch.empty((groups, m), dtype=torch.float32, device=device).t()


def quantize_activations_gpu(x: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 128 == 0) -> (q [M, K] e4m3, scale [M, K/128] float32, column-major as cuBLAS
    reads it); bit-identical to ``numerics.quantize_activations``. With ``rows`` > M the outputs have
    ``rows`` rows, the ones past M left unwritten: cuBLAS' row padding without a copy (a GEMM's output
    rows depend on their own input row only, and the caller drops them)."""
    m, k = x.shape
    if k % BLOCK:
        raise ValueError(f"activation width {k} is not a multiple of {BLOCK}")
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((rows or m, k), dtype=FP8, device=x.device)
    s = col_major_scales(rows or m, k // BLOCK, x.device)
    gk.act_quant_kernel[(triton.cdiv(m, 32), k // BLOCK)](x, q, s, m, k, x.stride(0), s.stride(0), s.stride(1),
                                                          BLOCK_M=32, PDL=pdl(x.device))
    return q, s


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3 RMSNorm fused with the next linear's activation quantization, one pass over x.

    x [M, K] bf16, weight [K] bf16 -> (q [M, K] e4m3, scale [M, K/128] float32 column-major), equal
    to ``quantize_activations(Qwen3RMSNorm(x))``: normalized in float32, rounded to x's dtype,
    times the weight in that dtype. Bit-identical to it except where the float32 sum of squares
    (summed in another order than torch's reduction) rounds differently: rare 1-ulp flips.
    """
    m, k = x.shape
    if k % BLOCK or weight.shape != (k,):
        raise ValueError(f"rmsnorm_quant: need x [M, K] with K % 128 == 0 and weight [K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = col_major_scales(m, k // BLOCK, x.device)
    inv_k = float(torch.tensor(1.0, dtype=torch.float32) / k)   # float32(1/K), as torch's CUDA mean
    gk.rmsnorm_quant_kernel[(m,)](x, weight.contiguous(), q, s, k, x.stride(0), s.stride(0), s.stride(1), inv_k,
                                  eps, GROUPS=triton.next_power_of_2(k // BLOCK), ON_CPU=x.device.type == "cpu",
                                  PDL=pdl(x.device), num_warps=8 if k >= 4096 else 4)
    return q, s


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm of x [M, K] bf16 (K % 128 == 0), one program per row: each row's result
    independent of M (torch's reduction splits rows over more threads when they are few, which
    changes the sum's order). Equal to ``layers.rms_norm`` but for rare 1-ulp flips (its float32
    sum of squares runs in another order)."""
    m, k = x.shape
    if k % BLOCK or weight.shape != (k,):
        raise ValueError(f"rmsnorm: need x [M, K] with K % 128 == 0 and weight [K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((m, k), dtype=x.dtype, device=x.device)
    inv_k = float(torch.tensor(1.0, dtype=torch.float32) / k)
    gk.rmsnorm_quant_kernel[(m,)](x, weight.contiguous(), y, y, k, x.stride(0), 0, 0, inv_k, eps,
                                  GROUPS=triton.next_power_of_2(k // BLOCK), ON_CPU=x.device.type == "cpu",
                                  QUANT=False, num_warps=8 if k >= 4096 else 4)
    return y


def bf16_config(n: int, k: int, sm_count: int) -> LaunchConfig:
    """``bf16_linear``'s one config for every M: 16-row tiles (decode sizes), 64 columns, 128-wide K
    steps; K split (2..8, each split >= 4 steps) while the tiles of one row chunk are fewer than
    1.5 per SM, as ``decode_config`` does: the choice depends on N and K only."""
    tiles, steps, split = triton.cdiv(n, 64), triton.cdiv(k, 128), 1
    while split < 8 and steps // (split * 2) >= 4 and tiles * split < 1.5 * sm_count:
        split *= 2
    return LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split}, num_warps=4, num_stages=3)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16 @ w [N, K]^T (+ bias) with one Triton config for every M (``bf16_config``): the
    decode step's BF16 linears (lm_head; every linear of a BF16 model) batch-invariant. K split
    partials are summed in split order by a second launch."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"bf16_linear: x {tuple(x.shape)} does not match weight {tuple(w.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w.contiguous()
    cfg = bf16_config(n, k, _sm_count(x.device))
    split = cfg.kwargs["SPLIT_K"]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split, m, n) if split > 1 else (0,), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.kwargs["BLOCK_N"]) * triton.cdiv(m, cfg.kwargs["BLOCK_M"]), split)
    _run(gk.bf16_gemm_kernel, lambda meta: grid, cfg, dict(
        x_ptr=x, w_ptr=w, b_ptr=bias, y_ptr=y, part_ptr=part, M=m, N=n, K=k, stride_xm=x.stride(0),
        HAS_BIAS=bias is not None, ON_CPU=x.device.type == "cpu"))
    if split > 1:
        _reduce(part, bias, y)
    return y


def output_parts(y: torch.Tensor, what: str) -> tuple[torch.Tensor, int, int]:
    """A linear's output as the consumer kernels read it (gemm_kernels.load_output): bf16 [M, N]
    -> (y, 0, 0); a split-K GEMV's unsummed float32 partials [S, M, N] (``fp8_gemm(partials=True)``)
    -> (y[0], S, stride between partials). The 2-D view gives the shape and the row stride."""
    if y.ndim == 3 and y.dtype == torch.float32 and y.stride(2) == 1:
        return y[0], y.shape[0], y.stride(0)
    if y.ndim == 2:
        return (y if y.stride(1) == 1 else y.contiguous()), 0, 0
    raise ValueError(f"{what}: need a [M, N] output or [S, M, N] float32 split-K partials; got "
                     f"{tuple(y.shape)} {y.dtype}")


def splitk_sum(y: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A linear's output made plain: float32 split-K partials [S, M, N] summed in split order
    (``out_dtype`` [M, N], the GEMV's own sum, bit for bit); a 2-D output as it is."""
    if y.ndim == 2:
        return y
    out = torch.empty(y.shape[1:], dtype=out_dtype, device=y.device)
    _reduce(y.contiguous(), None, out)
    return out


def silu_mul_quant(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU fused with the down projection's activation quantization.

    gate_up [M, 2I] bf16 (gate first, as the fused gate_up_proj emits it) or its GEMV's split-K
    partials [S, M, 2I] (summed here, ``output_parts``) -> (q [M, I] e4m3, scale [M, I/128] float32
    column-major), bit-identical to ``quantize_activations(F.silu(gate) * up)`` computed in bf16
    (one rounding after each op).
    """
    gu, splits, stride_s = output_parts(gate_up, "silu_mul_quant")
    m, two_i = gu.shape
    i = two_i // 2
    if two_i % (2 * BLOCK):
        raise ValueError(f"silu_mul_quant: width {two_i} is not 2 x a multiple of {BLOCK}")
    q = torch.empty((m, i), dtype=FP8, device=gu.device)
    s = col_major_scales(m, i // BLOCK, gu.device)
    groups = 4
    gk.silu_mul_quant_kernel[(m, triton.cdiv(i // BLOCK, groups))](
        gu, q, s, i, gu.stride(0), s.stride(0), s.stride(1), stride_s, GROUPS=groups,
        ON_CPU=gu.device.type == "cpu", SPLITS=splits, PDL=pdl(gu.device))
    return q, s


def gemv_counters(n: int, device) -> torch.Tensor:
    """The split-K arrival counters of an [N, K] weight's decode GEMV: int32, one per program of
    the first grid axis (N tile and row chunk) for 16-row tiles at M <= 16 and for the table's tiles
    (>= 64 rows) up to M = 256, zero. A caller that owns one per weight (FP8Linear does) saves the
    zero-fill launch per call; the kernel leaves it zero again."""
    return torch.zeros(4 * triton.cdiv(n, 16), dtype=torch.int32, device=device)


def _gemv(x, xs, w, ws, out_dtype, bias, a_fp8: bool, config: LaunchConfig | None = None,
          counters: torch.Tensor | None = None, fused_reduce: bool = True,
          use_pdl: bool = False, partials: bool = False) -> torch.Tensor:
    """Decode path, W8A8 (``a_fp8``) or W8A16, M_PAD = 16 rows per program (any M: row chunks, each
    row computed alike whatever M is, so the result is batch-invariant); ``config`` overrides the choice (tests);
    ``counters`` from ``gemv_counters`` (made here when None); ``fused_reduce`` False sums split-K
    partials in a second launch; ``partials`` (no bias) returns them unsummed, [S, M, N] float32,
    when K is split; ``use_pdl`` launches with programmatic dependent launch where the card has it
    (benchmarks compare them)."""
    m, n, k = _check(x, w, ws, "fp8 decode GEMM")
    w, ws = w.contiguous(), ws.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    args = dict(x_ptr=x, xs_ptr=xs if a_fp8 else ws, w_ptr=w, ws_ptr=ws, b_ptr=bias, y_ptr=y,
                part_ptr=torch.empty(0, dtype=torch.float32, device=x.device),
                cnt_ptr=torch.empty(0, dtype=torch.int32, device=x.device),
                M=m, N=n, K=k,
                stride_xm=x.stride(0), stride_xsm=xs.stride(0) if a_fp8 else 0,
                stride_xsk=xs.stride(1) if a_fp8 else 0, stride_wsn=ws.stride(0),
                A_FP8=a_fp8, HAS_BIAS=bias is not None, ON_CPU=x.device.type == "cpu", M_PAD=DECODE_MAX_M,
                FUSED_REDUCE=fused_reduce)
    use_pdl = use_pdl and pdl(x.device)
    cfg = config or decode_config(m, n, k, _sm_count(x.device), use_pdl)
    if 128 % cfg.kwargs["BLOCK_N"]:
        raise ValueError(f"fp8 decode GEMM: BLOCK_N must divide the 128-row scale block; got {cfg.kwargs['BLOCK_N']}")
    if cfg.kwargs.get("EVEN_N") and n % cfg.kwargs["BLOCK_N"]:
        raise ValueError(f"fp8 decode GEMM: EVEN_N needs N % BLOCK_N == 0; got N {n}, BLOCK_N {cfg.kwargs['BLOCK_N']}")
    split = cfg.kwargs["SPLIT_K"]
    partials = partials and split > 1 and bias is None
    if split > 1:
        args["part_ptr"] = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        args["FUSED_REDUCE"] = fused_reduce and not partials
    programs = triton.cdiv(n, cfg.kwargs["BLOCK_N"]) * triton.cdiv(m, DECODE_MAX_M)   # N tiles x row chunks
    if split > 1 and args["FUSED_REDUCE"]:     # only the in-kernel sum reads the counters
        use = counters is not None and counters.numel() >= programs
        args["cnt_ptr"] = counters if use else torch.zeros(programs, dtype=torch.int32, device=x.device)
    args["PDL"] = use_pdl
    _run(gk.gemv_kernel, lambda meta: (programs, split), cfg, args, use_pdl)
    if partials:
        return args["part_ptr"]
    if split > 1 and not fused_reduce:
        _reduce(args["part_ptr"], bias, y)
    return y


@cache
def use_tma(device: torch.device) -> bool:
    """Whether the W8A8 block GEMM fetches its tiles with the tensor-memory accelerator (SM90+)."""
    return device.type == "cuda" and TensorDescriptor is not None and torch.cuda.get_device_capability(device) >= (9, 0)


def tma_config(m: int) -> LaunchConfig:
    """The TMA block GEMM's config, from ``benchmarks/tune.py`` on an H200: 64-row tiles, 4 warps,
    3 stages at every Qwen3-VL-8B shape and M = 512..2048 (128-row tiles and warp specialization
    were slower: each K block's product is rescaled before it joins the accumulator)."""
    return LaunchConfig({"BLOCK_M": 64, "GROUP_M": 32 if m >= 2048 else 8}, num_warps=4, num_stages=3)


def _tma_block_gemm(x, xs, w, ws, out_dtype, bias, config: LaunchConfig | None = None) -> torch.Tensor:
    m, n, k = x.shape[0], w.shape[0], x.shape[1]
    cfg = config or tma_config(m)
    x = x if x.stride(1) == 1 and (x.stride(0) % 16 == 0) and x.data_ptr() % 16 == 0 else x.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    x_desc = TensorDescriptor.from_tensor(x, [cfg.kwargs["BLOCK_M"], BLOCK])
    w_desc = TensorDescriptor.from_tensor(w, [BLOCK, BLOCK])
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(n, BLOCK),)
    gk.block_gemm_tma_kernel[grid](x_desc, xs, w_desc, ws, bias, y, m, n, k, xs.stride(0), xs.stride(1), ws.stride(0),
                                   HAS_BIAS=bias is not None, **cfg.kwargs, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
    return y


def _block_gemm(x, xs, w, ws, out_dtype, bias, a_fp8: bool, config: LaunchConfig | None = None,
                tma: bool | None = None) -> torch.Tensor:
    """Triton block-scaled GEMM for any M, W8A8 (``a_fp8``) or W8A16. ``tma`` (default: W8A8 on
    SM90+, Hopper and Blackwell) fetches tiles with the TMA (``block_gemm_tma_kernel``, ``config``
    as ``tma_config``); else pointer loads (``block_gemm_kernel``: 8.9 cards, W8A16, the
    interpreter; ``config`` as ``prefill_config``)."""
    m, n, k = _check(x, w, ws, "fp8 block GEMM")
    w, ws = w.contiguous(), ws.contiguous()
    if a_fp8 and (use_tma(x.device) if tma is None else tma):
        return _tma_block_gemm(x, xs, w, ws, out_dtype, bias, config)
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    args = dict(x_ptr=x, xs_ptr=xs if a_fp8 else ws, w_ptr=w, ws_ptr=ws, b_ptr=bias, y_ptr=y, M=m, N=n, K=k,
                M_BUCKET=_m_bucket(m), stride_xm=x.stride(0), stride_xsm=xs.stride(0) if a_fp8 else 0,
                stride_xsk=xs.stride(1) if a_fp8 else 0, stride_wsn=ws.stride(0),
                A_FP8=a_fp8, HAS_BIAS=bias is not None, ON_CPU=x.device.type == "cpu")
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    cfg = config or _pick(_BLOCK_GEMM_TUNED, prefill_config(m, n, k, _sm_count(x.device), a_fp8), args)
    if cfg is None:
        _BLOCK_GEMM_TUNED[grid](**args)
    else:
        _run(gk.block_gemm_kernel, grid, cfg, args)
    return y


def triton_block_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 block-scaled GEMM in Triton, any M: xq [M, K] e4m3 with scales xs [M, K/128] (any
    strides), w [N, K] e4m3 with ws [N/128, K/128] -> [M, N] ``out_dtype`` (+ bias, added in float32).
    For every FP8 card where PyTorch's block-scaled ``scaled_mm`` refuses (all but SM90)."""
    return _block_gemm(xq, xs, w, ws, out_dtype, bias, True)


def _cublas_block_gemm(xq, xs, w, ws, out_dtype, bias) -> torch.Tensor:
    """cuBLAS' block-scaled FP8 GEMM (SM90 only). It wants the scales' token count and the
    weight's K blocks multiples of 4: pad both (zero rows meet scale 1; padded blocks meet no data)."""
    m, k = xq.shape
    pad = -m % 4
    if pad:
        xp = torch.zeros((m + pad, k), dtype=torch.uint8, device=xq.device).view(FP8)
        xp[:m] = xq
        xq = xp
    xs = _scales_layout(xs, m + pad)
    if ws.shape[1] % 4:
        ws = F.pad(ws, (0, -ws.shape[1] % 4), value=1.0)
    y = F.scaled_mm(xq, w.t(), xs, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
                    output_dtype=out_dtype)
    y = y[:m] if pad else y
    return y + bias if bias is not None else y


def _use_cublas(device: torch.device, n: int, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cublas":
        return True
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    return backend == "auto" and sm90 and n % BLOCK == 0


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None,
             backend: str = "auto", counters: torch.Tensor | None = None, pdl: bool = False,
             partials: bool = False, invariant: bool = False) -> torch.Tensor:
    """W8A8 GEMM on already-quantized activations (from ``rmsnorm_quant``, ``silu_mul_quant`` or
    ``quantize_activations_gpu``): xq [M, K] e4m3, xs [M, K/128] -> [M, N] ``out_dtype``.

    M <= 16, or any M with ``invariant`` (a decode step whose rows must not depend on the batch
    size: the GEMV's config depends on N and K only): the Triton GEMV on every card (``counters``: see ``gemv_counters``; ``pdl``: launched
    with programmatic dependent launch where the card has it: 5% slower in the engine's decode
    step on the H200, so off by default). ``partials`` (no bias): when the
    GEMV splits K, it returns its float32 partials [S, M, N] unsummed, for a consumer that sums
    them as it reads its input (``silu_mul_quant``, ``attention.add_rmsnorm_quant``,
    ``attention.qk_norm_rope_cache``, ``splitk_sum``): the same bits, without the last split's
    wait for the others. Larger M: cuBLAS on SM90 (``backend="auto"``, N a multiple of 128), the
    Triton block GEMM elsewhere or with ``backend="triton"``.
    """
    if (xq.shape[0] <= DECODE_MAX_M or invariant) and backend != "cublas":
        return _gemv(xq, xs, w, ws, out_dtype, bias, True, counters=counters, use_pdl=pdl, partials=partials)
    if _use_cublas(xq.device, w.shape[0], backend):
        return _cublas_block_gemm(xq, xs, w, ws, out_dtype, bias)
    return _block_gemm(xq, xs, w, ws, out_dtype, bias, True)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               backend: str = "auto", counters: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ dequant(w [N, K] e4m3, w_scale [N/128, K/128] f32)^T + bias, W8A8:
    a standalone activation quantization, then ``fp8_gemm``."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > DECODE_MAX_M and m % 4 and _use_cublas(x.device, w.shape[0], backend):
        # prefill: quantize into cuBLAS' 4-row padding directly (one launch fewer, no copy)
        xq, xs = quantize_activations_gpu(x2, m + (-m % 4))
        return _cublas_block_gemm(xq, xs, w, w_scale, x.dtype, bias)[:m].reshape(*lead, w.shape[0])
    xq, xs = quantize_activations_gpu(x2)
    return fp8_gemm(xq, xs, w, w_scale, x.dtype, bias, backend, counters).reshape(*lead, w.shape[0])


def w8a16_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16 @ dequant(w)^T + bias with x NOT quantized (W8A16, weight-only error): the
    weight tile is converted to bf16 in registers and its block scale applied per 128-wide K
    block. Not what a W8A8 server computes; the decode mode with the least error."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    if x2.shape[0] <= DECODE_MAX_M:
        return _gemv(x2, None, w, w_scale, x.dtype, bias, False, counters=counters).reshape(*lead, w.shape[0])
    return _block_gemm(x2, None, w, w_scale, x.dtype, bias, False).reshape(*lead, w.shape[0])


def fp8_grouped_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                     expert_ids: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MoE experts, W8A8 (decode sizes): row r of xq [R, K] (scales xs [R, K/128]) times expert
    ``expert_ids[r]``'s weight w [E, N, K] (scales ws [E, N/128, K/128]) -> [R, N].

    For top-k routing, repeat each token's quantized row k times (rows = token-expert pairs); an
    id < 0 gives a zero row (padding). Ids must be < E: they are not checked (a check would sync).
    """
    r, k = xq.shape
    if w.ndim != 3 or ws.ndim != 3 or expert_ids.shape != (r,):
        raise ValueError(f"fp8_grouped_gemm: need w [E, N, K], ws [E, N/128, K/128], expert_ids [R]; got "
                         f"{tuple(w.shape)}, {tuple(ws.shape)}, {tuple(expert_ids.shape)}")
    _, n, _ = _check(xq, w, ws, "fp8_grouped_gemm")
    w, ws = w.contiguous(), ws.contiguous()
    y = torch.empty((r, n), dtype=out_dtype, device=xq.device)
    gk.grouped_gemv_kernel[(r, triton.cdiv(n, 64))](
        xq, xs, w, ws, expert_ids, y, n, k, xq.stride(0), xs.stride(0), xs.stride(1),
        w.stride(0), ws.stride(0), ws.stride(1), BLOCK_N=64)
    return y
