"""Triton kernels behind gemm.py: FP8 block-scaled GEMM/GEMV, fused activation quantization.

Every kernel runs compiled on a CUDA GPU and, for tests, under ``TRITON_INTERPRET=1`` on CPU
tensors (``ON_CPU``). Three interpreter gaps are worked around here, not in the callers:
- its float down-casts truncate (bf16) or drop the carry (fp8): values are rounded to nearest-even
  in float32 arithmetic first (``_bf16_rne``, ``_e4m3_rne``), so every cast below is exact, on the
  GPU too;
- it cannot call libdevice: ``ON_CPU`` uses ``tl.exp`` where the GPU needs ``libdevice.exp``
  (``tl.exp`` lowers to the approximate ``ex2.approx`` there; PyTorch's SiLU uses ``expf``);
- its bf16 ``tl.dot`` is wrong: ``ON_CPU`` multiplies bf16 operands as float32 (same products).
Activation scales are read through strides (gemm.py stores them column-major, as cuBLAS reads them).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

try:  # griddepcontrol (programmatic dependent launch, SM90+), in Triton since 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_PDL = True
except ImportError:  # pragma: no cover - older Triton: gemm.py never sets PDL
    HAS_PDL = False


@triton.jit
def _bf16_rne(x):
    """float32 -> float32 holding x rounded to the nearest bf16 (ties to even)."""
    b = x.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_rne(v):
    """|v| <= 448 float32 -> float32 holding v rounded to the nearest e4m3fn value (ties to even)."""
    b = v.to(tl.uint32, bitcast=True)
    normal = (((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
    # below 2^-6 e4m3fn is subnormal, in steps of 2^-9: 1.5 * 2^14 has float32 ulp 2^-9, so
    # the float32 add rounds there (to even); the sign bit keeps -0 for small negatives
    sub = ((v + 24576.0) - 24576.0).to(tl.uint32, bitcast=True) | ((b >> 31) << 31)
    return tl.where(tl.abs(v) < 0.015625, sub.to(tl.float32, bitcast=True), normal)


@triton.jit
def _quantize_rows(x):
    """x [R, 128] float32 -> (q [R, 128] float32 exact in e4m3, scale [R]) as
    numerics.quantize_activations: scale = amax / 448 (0 -> 1), q = clamp(x / scale, +-448)."""
    # div_rn: IEEE division, as torch divides (a plain "/" is approximate on the GPU)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 448.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    q = _e4m3_rne(tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0))
    return q, scale


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel, if it was launched with programmatic dependent launch (the GEMV is),
    start now: its programs take the SMs this grid leaves free and stream their weights while
    this one runs; they wait (``gdc_wait``) for this grid to finish before reading its output."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptrs):
    """``prefetch.global.L2`` of the line at each pointer (no value returned; $0 is a dummy)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _store_out(ptrs, acc, mask):
    """Store float32 ``acc`` in the output's dtype (bf16 rounded to nearest even on both backends)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        acc = _bf16_rne(acc)
    tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def load_output(ptr, offs, mask, stride_s, SPLITS: tl.constexpr):
    """A linear's output at ``offs`` as float32 holding bf16 values: read from a bf16 tensor
    (SPLITS == 0) or summed from float32 split-K partials [SPLITS, ...] (``stride_s`` apart) in
    split order from zero, then rounded to bf16: the very sum and rounding the GEMV's own split-K
    sum stores (gemv_kernel), so a consumer computes the same bits either way."""
    if SPLITS == 0:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros_like(offs).to(tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(ptr + s * stride_s + offs, mask=mask, other=0.0)
    return _bf16_rne(acc)


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sm, stride_sk,
                     BLOCK_M: tl.constexpr, PDL: tl.constexpr = False):
    """A [BLOCK_M, 128] tile of x [M, K] per program -> q [M, K] e4m3 and its scales."""
    release_dependents(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    cols = g * 128 + tl.arange(0, 128)
    mask = rows < M
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask[:, None], other=0.0)
    q, scale = _quantize_rows(x.to(tl.float32))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=mask[:, None])
    tl.store(s_ptr + rows * stride_sm + g * stride_sk, scale, mask=mask)


@triton.jit
def rmsnorm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, stride_xm, stride_sm, stride_sk, inv_k, eps,
                         GROUPS: tl.constexpr, ON_CPU: tl.constexpr, PDL: tl.constexpr = False,
                         QUANT: tl.constexpr = True):
    """One row per program: Qwen3's RMSNorm (float32 normalize, round to bf16, times the bf16
    weight, round to bf16), then quantized per 128 channels (QUANT; else stored as bf16 in q_ptr).
    GROUPS = next_pow2(K / 128). One program per row: the row's sum runs in one order whatever
    the number of rows (torch's reduction splits a row over more threads when rows are few)."""
    release_dependents(PDL)
    row = tl.program_id(0)
    g = tl.arange(0, GROUPS)
    cols = g[:, None] * 128 + tl.arange(0, 128)[None, :]                      # [GROUPS, 128]
    live = g < K // 128
    x = tl.load(x_ptr + row * stride_xm + cols, mask=live[:, None], other=0.0).to(tl.float32)
    ss = tl.sum(tl.sum(x * x, axis=1), axis=0)
    # torch's mean: sum / K on the CPU, sum * float32(1/K) on CUDA (equal when K is a power of 2)
    if ON_CPU:
        var = tl.math.div_rn(ss, K.to(tl.float32))
    else:
        var = ss * inv_k
    h = _bf16_rne(x * tl.math.rsqrt(var + eps))
    w = tl.load(w_ptr + cols, mask=live[:, None], other=0.0).to(tl.float32)
    if QUANT:
        q, scale = _quantize_rows(_bf16_rne(w * h))
        tl.store(q_ptr + row * K + cols, q.to(tl.float8e4nv), mask=live[:, None])
        tl.store(s_ptr + row * stride_sm + g * stride_sk, scale, mask=live)
    else:
        tl.store(q_ptr + row * K + cols, _bf16_rne(w * h).to(tl.bfloat16), mask=live[:, None])


@triton.jit
def silu_mul_quant_kernel(gu_ptr, q_ptr, s_ptr, I, stride_gm, stride_sm, stride_sk, stride_gs,
                          GROUPS: tl.constexpr, ON_CPU: tl.constexpr, SPLITS: tl.constexpr = 0,
                          PDL: tl.constexpr = False):
    """GROUPS 128-channel groups of one row per program: silu(gate) rounded to bf16, times up,
    rounded to bf16 (as Transformers computes it in bf16), then quantized per 128 channels.
    gate_up is bf16 or its GEMV's unsummed split-K partials (``load_output``)."""
    release_dependents(PDL)
    row = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * 128 + tl.arange(0, 128)[None, :]
    live = g < I // 128
    gate = load_output(gu_ptr, row * stride_gm + cols, live[:, None], stride_gs, SPLITS)
    up = load_output(gu_ptr, row * stride_gm + I + cols, live[:, None], stride_gs, SPLITS)
    if ON_CPU:
        e = tl.exp(-gate)
    else:
        e = libdevice.exp(-gate)   # expf, as torch's silu; tl.exp is ex2.approx on the GPU
    act = _bf16_rne(tl.math.div_rn(gate, 1.0 + e))
    q, scale = _quantize_rows(_bf16_rne(act * up))
    tl.store(q_ptr + row * I + cols, q.to(tl.float8e4nv), mask=live[:, None])
    tl.store(s_ptr + row * stride_sm + g * stride_sk, scale, mask=live)


@triton.jit
def _column(v, u: tl.constexpr, UNROLL: tl.constexpr):
    """Column ``u`` of v [..., UNROLL], exactly (the other columns add zeros): Triton tensors have
    no indexing by a constant."""
    return tl.sum(tl.where(tl.arange(0, UNROLL) == u, v, 0.0), axis=len(v.shape) - 1)


@triton.jit
def _group_scales(xs_ptr, ws_row, offs_m, mask_m, kb0, kb_hi, stride_xsm, stride_xsk, A_FP8: tl.constexpr,
                  UNROLL: tl.constexpr):
    """Scales of K blocks kb0 .. kb0 + UNROLL - 1 (zero past kb_hi): the weight tile's ws [UNROLL]
    and, for W8A8, the activation rows' xs [M_PAD, UNROLL] (a placeholder for W8A16)."""
    kk = kb0 + tl.arange(0, UNROLL)
    live = kk < kb_hi
    ws = tl.load(ws_row + kk, mask=live, other=0.0)
    if A_FP8:
        xs = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + kk[None, :] * stride_xsk,
                     mask=mask_m[:, None] & live[None, :], other=0.0)
    else:
        xs = ws
    return ws, xs


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, SPLIT_K,
                stride_xm, stride_xsm, stride_xsk, stride_wsn,
                A_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, ON_CPU: tl.constexpr,
                M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, EVEN_N: tl.constexpr = False):
    """Decode GEMV, M_PAD rows per program: y[:, n-tile] = sum over this split's 128-wide K blocks of
    (x . q) * w_scale (* x_scale when A_FP8), float32 accumulate. Computed transposed, acc^T
    [BLOCK_N, M_PAD] = q_tile . x_tile^T ("swap AB"): the weight tile is the tensor cores' wide A
    operand (64+ rows: Hopper's wgmma reads it from shared memory) and the few activation rows the
    narrow B operand; x . q^T with 16 padded rows as A ran 0.2-2 us slower per linear in a
    side-by-side sweep (H200). W8A16 keeps x . q^T (its bf16 weight tile comes from registers;
    transposed, it ran 0.95-1.13x BF16 against 1.05-1.28x) and transposes its accumulator once at
    the end.

    Grid (N / BLOCK_N * M / M_PAD, SPLIT_K): program 0's index is the row chunk (fastest, so the
    chunks of one weight tile run together and share it in L2) and the N tile. Each row's result is
    computed by the same instructions whatever M is (no config depends on M): batch-invariant.
    SPLIT_K == 1 writes y (+ bias) in its dtype; otherwise each split
    writes float32 partials [SPLIT_K, M, N], summed in split order (deterministic): with
    FUSED_REDUCE by the last split of each N tile to finish (an arrival counter per tile, cnt_ptr,
    zero before the call and reset to zero by that split, so a CUDA graph can replay it), which
    saves the second launch; else by splitk_reduce_kernel. UNROLL K blocks per iteration put more
    weight bytes in flight per program. A_FP8 False is W8A16: x bf16, the weight tile converted to
    bf16 in registers (exact: e4m3 is a subset of bf16). EVEN_N (N % BLOCK_N == 0): the weight
    loads go unmasked in N. BLOCK_N divides 128, so a tile's rows share one weight scale per K
    block; the scales of the next UNROLL K blocks load while the current ones are multiplied.

    PDL (launched with programmatic dependent launch, SM90+): the programs start while the
    previous kernel (the producer of x) still runs, pull their first PREFETCH K blocks of weight
    into L2 (weights never depend on it), then wait for it (``gdc_wait``) before touching x, the
    partials, the counters or y. Everything this kernel reads or writes but the weights comes
    after that wait, so it is as ordered as a plain launch. It lets its own dependent start only
    after that wait: releasing at the start let a chain of GEMVs run ahead, each one's programs
    holding SM slots and L2 lines while waiting (20-25% slower on split-K shapes, H200)."""
    chunks = tl.cdiv(M, M_PAD)
    pid_n = tl.program_id(0) // chunks
    pid_c = tl.program_id(0) % chunks
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_c * M_PAD + tl.arange(0, M_PAD)
    offs_k = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kbs = K // 128
    per = tl.cdiv(kbs, SPLIT_K)
    kb_lo = pid_k * per
    kb_hi = tl.minimum(kb_lo + per, kbs)
    if PDL:
        if PREFETCH > 0:
            # one 128-byte line per row and K block: [BLOCK_N, PREFETCH] lines, clamped into the matrix
            pk = tl.minimum(kb_lo + tl.arange(0, PREFETCH), kb_hi - 1)
            pn = tl.minimum(offs_n, N - 1)
            _prefetch_l2(w_ptr + pn[:, None].to(tl.int64) * K + pk[None, :] * 128)
        gdc_wait()
        release_dependents(PDL)
    tl.static_assert(128 % BLOCK_N == 0, "a tile's rows must share their weight scales")
    ws_row = ws_ptr + (pid_n * BLOCK_N // 128) * stride_wsn
    ws_g, xs_g = _group_scales(xs_ptr, ws_row, offs_m, mask_m, kb_lo, kb_hi, stride_xsm, stride_xsk, A_FP8, UNROLL)
    if A_FP8:
        acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)                    # transposed: [n, m]
    else:
        acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)                    # W8A16: [m, n]
    for kb0 in range(kb_lo, kb_hi, UNROLL):
        # the next group's scales, in flight while this group's products run: loaded in the step
        # that uses them, their latency (an L2 round trip; the pipeline prefetches only the dot
        # operands) stood in every step: 0.2-1.5 us per Qwen3-VL-8B linear (H200)
        ws_n, xs_n = _group_scales(xs_ptr, ws_row, offs_m, mask_m, kb0 + UNROLL, kb_hi, stride_xsm, stride_xsk,
                                   A_FP8, UNROLL)
        for u in tl.static_range(UNROLL):
            kb = kb0 + u
            live = kb < kb_hi
            k0 = kb * 128
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :],
                        mask=mask_m[:, None] & live, other=0.0)
            w_mask = live if EVEN_N else mask_n[:, None] & live
            w = tl.load(w_ptr + offs_n[:, None] * K + k0 + offs_k[None, :], mask=w_mask, other=0.0)
            ws = _column(ws_g, u, UNROLL)
            if A_FP8:
                acc += tl.dot(w, tl.trans(x)) * ws * _column(xs_g, u, UNROLL)[None, :]
            elif ON_CPU:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32))) * ws
            else:
                acc += tl.dot(x, tl.trans(w.to(tl.bfloat16))) * ws
        ws_g, xs_g = ws_n, xs_n
    if not A_FP8:
        acc = tl.trans(acc)
    out = offs_m[None, :] * N + offs_n[:, None]                                # [n, m] offsets in y [M, N]
    mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        _store_out(y_ptr + out, acc, mask)
    else:
        tl.store(part_ptr + pid_k * M * N + out, acc, mask=mask)
        if FUSED_REDUCE:
            # every thread's partial is stored before the counter moves (barrier, then a release
            # atomic); the last arrival reads the others' partials from L2 (.cg), after its acquire
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                tl.debug_barrier()
                tot = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    tot += tl.load(part_ptr + s * M * N + out, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    tot += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                _store_out(y_ptr + out, tot, mask)
                tl.store(cnt_ptr + tl.program_id(0), 0)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def bf16_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, M, N, K, SPLIT_K, stride_xm,
                     HAS_BIAS: tl.constexpr, ON_CPU: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] = x [M, K] @ w [N, K]^T (+ bias), bf16 operands, float32 accumulate, for the decode
    step's BF16 linears: one config for every M, so each row is computed by the same instructions
    in the same order whatever else shares the call (batch-invariant; cuBLAS picks its kernel and
    split by M). Grid (N / BLOCK_N * M / BLOCK_M, SPLIT_K), row tiles fastest (they share the weight
    tile in L2). SPLIT_K > 1 writes float32 partials [SPLIT_K, M, N] for splitk_reduce_kernel."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_n = tl.program_id(0) // tiles_m
    pid_m = tl.program_id(0) % tiles_m
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    steps = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(steps, SPLIT_K)
    lo = pid_k * per
    hi = tl.minimum(lo + per, steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(lo, hi):
        kk = step * BLOCK_K + offs_k
        mask_k = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if ON_CPU:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    mask = mask_m[:, None] & mask_n[None, :]
    out = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        _store_out(y_ptr + out, acc, mask)
    else:
        tl.store(part_ptr + pid_k * M * N + out, acc, mask=mask)


@triton.jit
def splitk_reduce_kernel(part_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """y = sum_s part[s] (+ bias), s in order: part [SPLIT_K, M, N] float32 -> y [M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    _store_out(y_ptr + offs, acc, mask)


@triton.jit
def _band_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program's [BLOCK_M, BLOCK_N] output tile, tiles taken in GROUP_M-row
    bands so that neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % band) % rows_in_band, (pid % band) // rows_in_band


@triton.jit
def _store_tile(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] (+ bias) into y [M, N] at rows offs_m, columns offs_n, masked to y."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store_out(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, (offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _block_scales(xs_ptrs, ws_ptrs, kb, stride_xsk, A_FP8: tl.constexpr):
    """K block kb's activation scales (W8A8; a placeholder for W8A16) and weight scales."""
    ws = tl.load(ws_ptrs + kb)
    xs = tl.load(xs_ptrs + kb * stride_xsk) if A_FP8 else ws
    return xs, ws


@triton.jit(do_not_specialize=["M_BUCKET"])
def block_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_xsm, stride_xsk, stride_wsn,
                      A_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, ON_CPU: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                      PAIRS: tl.constexpr = False):
    """Prefill GEMM, y = x @ dequant(w)^T: [BLOCK_M, BLOCK_N] tiles, one 128-wide K block per
    step with both block scales applied to that step's float32 product (the DeepSeek 1x128 /
    128x128 recipe). Tiles in GROUP_M-row bands so neighbouring programs share weight tiles in L2.
    Rows and columns past M, N wrap (modulo) for loads, so loads need no masks; stores are masked.
    PAIRS: two K blocks per step, both products issued before either is rescaled (two tensor-core
    products in flight instead of one; W8A8 only; sums in another order, same error bound)."""
    pid_m, pid_n = _band_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, 128)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]             # [BLOCK_M, 128]
    w_ptrs = w_ptr + rn[None, :] * K + offs_k[:, None]                     # [128, BLOCK_N] = w^T
    ws_ptrs = ws_ptr + (rn // 128) * stride_wsn                            # [BLOCK_N]
    xs_ptrs = xs_ptr + rm * stride_xsm                                     # [BLOCK_M]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kbs = K // 128
    start = 0
    if PAIRS:
        start = kbs - kbs % 2
        for kb in range(0, start, 2):
            p0 = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs))
            p1 = tl.dot(tl.load(x_ptrs + 128), tl.load(w_ptrs + 128))
            xs0, ws0 = _block_scales(xs_ptrs, ws_ptrs, kb, stride_xsk, True)
            xs1, ws1 = _block_scales(xs_ptrs, ws_ptrs, kb + 1, stride_xsk, True)
            acc += p0 * (xs0[:, None] * ws0[None, :]) + p1 * (xs1[:, None] * ws1[None, :])
            x_ptrs += 256
            w_ptrs += 256
    # the next K block's scales load while this one's product runs, as in gemv_kernel: 4-12%
    # faster at the 8B prefill shapes (H200; the TMA kernel below, so changed, ran 2-14% slower);
    # the last step reloads its own (clamped), so no load needs a mask
    xs, ws = _block_scales(xs_ptrs, ws_ptrs, tl.minimum(start, kbs - 1), stride_xsk, A_FP8)
    for kb in range(start, kbs):
        xs_next, ws_next = _block_scales(xs_ptrs, ws_ptrs, tl.minimum(kb + 1, kbs - 1), stride_xsk, A_FP8)
        a = tl.load(x_ptrs)
        b = tl.load(w_ptrs)
        if A_FP8:
            acc += tl.dot(a, b) * (xs[:, None] * ws[None, :])
        elif ON_CPU:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32)) * ws[None, :]
        else:
            acc += tl.dot(a, b.to(tl.bfloat16)) * ws[None, :]
        xs, ws = xs_next, ws_next
        x_ptrs += 128
        w_ptrs += 128
    _store_tile(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, HAS_BIAS)


@triton.jit
def block_gemm_tma_kernel(x_desc, xs_ptr, w_desc, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xsm, stride_xsk, stride_wsn,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """W8A8 prefill GEMM as ``block_gemm_kernel`` (same tiles, bands and per-K-block rescale), its
    operand tiles fetched by the tensor-memory accelerator (SM90+: Hopper, Blackwell) from host-side
    descriptors: x [M, K] in [BLOCK_M, 128] tiles, w [N, K] in [128, 128] tiles, zero-filled past the
    edges. 1.35-2x the pointer-load kernel's speed on the H200 at the Qwen3-VL-8B prefill shapes."""
    pid_m, pid_n = _band_tile(M, N, BLOCK_M, 128, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * 128
    rm = (off_m + tl.arange(0, BLOCK_M)) % M        # scales of rows past M: any real row's (dropped)
    acc = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    for kb in range(0, K // 128):
        a = x_desc.load([off_m, kb * 128])
        b = w_desc.load([off_n, kb * 128])
        xs = tl.load(xs_ptr + rm * stride_xsm + kb * stride_xsk)
        ws = tl.load(ws_ptr + pid_n * stride_wsn + kb)   # one weight block per 128-wide tile: a scalar
        acc += tl.dot(a, b.T) * (xs[:, None] * ws)
    _store_tile(y_ptr, b_ptr, acc, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, 128), M, N, HAS_BIAS)


@triton.jit
def grouped_gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, e_ptr, y_ptr, N, K, stride_xm, stride_xsm, stride_xsk,
                        stride_we, stride_wse, stride_wsn, BLOCK_N: tl.constexpr):
    """MoE decode: row r of x times expert e_ptr[r]'s weight, y [R, N]. Grid (R, N / BLOCK_N).
    One activation row per program, so a multiply-and-sum instead of a 16-row dot; an expert id
    < 0 (padding) gives a zero row. Rows sharing an expert re-read its tile (from L2 mostly)."""
    r = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    mask_n = offs_n < N
    e = tl.load(e_ptr + r).to(tl.int64)
    use = e >= 0
    e = tl.maximum(e, 0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(0, K // 128):
        x = tl.load(x_ptr + r * stride_xm + kb * 128 + offs_k).to(tl.float32)
        w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * K + kb * 128 + offs_k[None, :],
                    mask=mask_n[:, None] & use, other=0.0).to(tl.float32)
        xs = tl.load(xs_ptr + r * stride_xsm + kb * stride_xsk)
        ws = tl.load(ws_ptr + e * stride_wse + (offs_n // 128) * stride_wsn + kb, mask=mask_n, other=0.0)
        acc += tl.sum(w * x[None, :], axis=1) * xs * ws
    _store_out(y_ptr + r * N + offs_n, acc, mask_n)
