"""Triton kernels behind attention.py: the decode step's attention block in three launches.

Same conventions as gemm_kernels.py (compiled on CUDA, ``TRITON_INTERPRET=1`` on CPU tensors):
every bf16 result is rounded to nearest-even in float32 first (``_bf16_rne``) so the cast is exact
on both backends, and the interpreter's bf16 ``tl.dot`` is replaced by a float32 one (``ON_CPU``).
Row offsets are int64: a static cache of 256 rows x 8 heads x 8k positions x 128 passes 2^31.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemm_kernels import _bf16_rne, _e4m3_rne, _quantize_rows, load_output


@triton.jit
def qk_norm_rope_cache_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, lens_ptr, q_ptr, eps, L,
                              stride_qkv, stride_cos, stride_sin, stride_kb, stride_kh, stride_kl,
                              stride_vb, stride_vh, stride_vl, stride_qkvs,
                              H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr,
                              SPLITS: tl.constexpr = 0):
    """Grid (b, H + KV). Program (r, j): query head j (j < H) or key head j - H of row r, whose
    slice of the qkv row starts at j * D either way (keys follow queries). Per head: Qwen3 RMSNorm
    (when NORM), then x*cos + rotate_half(x)*sin with one bf16 rounding per op, as Transformers.
    Query heads go to q [b, H, D]; key heads (and their value heads, copied as they are) to the
    caches at position lens[r], skipped when lens[r] >= L (out of the cache). qkv is bf16 or its
    GEMV's unsummed split-K partials (gemm_kernels.load_output)."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    d = tl.arange(0, D)
    rot = (d + D // 2) % D                       # rotate_half(x)[d] = -x[d + D/2] | x[d - D/2]
    src = r * stride_qkv + j * D
    x = load_output(qkv_ptr, src + d, d < D, stride_qkvs, SPLITS)
    xr = load_output(qkv_ptr, src + rot, d < D, stride_qkvs, SPLITS)
    is_q = j < H
    if NORM:
        # D is a power of 2: ss * (1/D) is torch's mean exactly (on CPU and CUDA)
        inv = tl.math.rsqrt(tl.sum(x * x, axis=0) * (1.0 / D) + eps)
        w = tl.where(is_q, tl.load(qn_ptr + d), tl.load(kn_ptr + d)).to(tl.float32)
        wr = tl.where(is_q, tl.load(qn_ptr + rot), tl.load(kn_ptr + rot)).to(tl.float32)
        x = _bf16_rne(w * _bf16_rne(x * inv))
        xr = _bf16_rne(wr * _bf16_rne(xr * inv))
    c = tl.load(cos_ptr + r * stride_cos + d).to(tl.float32)
    s = tl.load(sin_ptr + r * stride_sin + d).to(tl.float32)
    xr = tl.where(d < D // 2, -xr, xr)
    y = _bf16_rne(_bf16_rne(x * c) + _bf16_rne(xr * s))
    tl.store(q_ptr + (r * H + j) * D + d, y.to(tl.bfloat16), mask=is_q & (d < D))
    pos = tl.load(lens_ptr + r)
    t = j - H
    write = (t >= 0) & (pos < L) & (d < D)
    tl.store(kc_ptr + r * stride_kb + t * stride_kh + pos * stride_kl + d, y.to(tl.bfloat16), mask=write)
    v = load_output(qkv_ptr, r * stride_qkv + (j + KV) * D + d, write, stride_qkvs, SPLITS)
    tl.store(vc_ptr + r * stride_vb + t * stride_vh + pos * stride_vl + d, v.to(tl.bfloat16), mask=write)


@triton.jit
def decode_attention_kernel(q_ptr, kc_ptr, vc_ptr, lens_ptr, out_ptr, os_ptr, m_ptr, l_ptr, acc_ptr, qk_scale,
                            SPLITS, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                            stride_sm, stride_sk,
                            H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                            BLOCK_N: tl.constexpr, FINAL: tl.constexpr,
                            QUANT: tl.constexpr, ON_CPU: tl.constexpr, CHUNK: tl.constexpr = 0):
    """Grid (b, KV, SPLITS): the G query heads of one KV head (padded to G_PAD >= 16 rows for
    tl.dot) against split s of positions 0..lens[r]; the split's chunk is cut from lens[r] on the
    device, so the loop bound depends on data but the launch does not (graph capturable).
    SPLITS is a plain argument (one compiled kernel for every split count), FINAL a constexpr.
    Online softmax in base 2 (qk_scale = scale * log2 e), float32 state; p is rounded to bf16
    for the p @ v product and the denominator sums the same rounded p, so the output is an exact
    convex combination of the rows of v with weights off by at most 2^-9 relative.
    FINAL (SPLITS == 1): writes out [b, H*D] (bf16, or e4m3 + scales when QUANT, D == 128).
    Else: float32 partials m, l [b, H, SPLITS] and acc [b, H, SPLITS, D] for combine_kernel.
    CHUNK > 0: split s holds positions [s * CHUNK, (s + 1) * CHUNK), whatever SPLITS and lens[r]
    are, so a row's splits, and its result, depend on its own length only (batch-invariant)."""
    r = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    live = g < G
    heads = kvh * G + g                          # GQA: query head h reads KV head h // G
    q = tl.load(q_ptr + (r * H + heads[:, None]) * D + d[None, :], mask=live[:, None], other=0.0)
    n = tl.load(lens_ptr + r) + 1                # positions 0..lens[r], the new token included
    if CHUNK > 0:
        chunk = CHUNK
    else:
        chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    k_base = kc_ptr + r * stride_kb + kvh * stride_kh
    v_base = vc_ptr + r * stride_vb + kvh * stride_vh
    # every block iterated holds >= 1 live position, so m_i is finite after the first one
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pm = pos < hi
        k = tl.load(k_base + pos[:, None] * stride_kl + d[None, :], mask=pm[:, None], other=0.0)
        if ON_CPU:
            sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = tl.where(pm[None, :], sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = _bf16_rne(tl.exp2(sc - m_new[:, None]))
        v = tl.load(v_base + pos[:, None] * stride_vl + d[None, :], mask=pm[:, None], other=0.0)
        if ON_CPU:
            pv = tl.dot(p, v.to(tl.float32))
        else:
            pv = tl.dot(p.to(tl.bfloat16), v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if FINAL:
        o = acc / l_i[:, None]
        cols = r * H * D + heads[:, None] * D + d[None, :]
        if QUANT:                                # D == 128: one head is one quantization group
            qv, scale = _quantize_rows(_bf16_rne(o))
            tl.store(out_ptr + cols, qv.to(tl.float8e4nv), mask=live[:, None])
            tl.store(os_ptr + r * stride_sm + heads * stride_sk, scale, mask=live)
        else:
            tl.store(out_ptr + cols, _bf16_rne(o).to(tl.bfloat16), mask=live[:, None])
    else:
        part = (r * H + heads) * SPLITS + sp     # empty splits write m = -inf, l = 0, acc = 0
        tl.store(m_ptr + part, m_i, mask=live)
        tl.store(l_ptr + part, l_i, mask=live)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])


@triton.jit
def combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, os_ptr, SPLITS, stride_sm, stride_sk,
                   H: tl.constexpr, D: tl.constexpr, HPG: tl.constexpr, S_PAD: tl.constexpr, QUANT: tl.constexpr,
                   IN_ORDER: tl.constexpr = False):
    """Grid (b, H / HPG): merges the SPLITS partials of HPG heads (HPG * D = 128 channels = one
    quantization group when QUANT; HPG = 1 otherwise), splits summed in a fixed order. IN_ORDER:
    summed one split after the other, so trailing empty splits (which add exact zeros) leave the
    result as it is: with decode_attention_kernel's CHUNK, a row's output depends on its own
    length only, not on SPLITS (the cache length) or the tree of a padded reduction."""
    r = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    hh = grp * HPG + tl.arange(0, HPG)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    smask = (s < SPLITS)[None, :]
    part = (r * H + hh)[:, None] * SPLITS + s[None, :]                      # [HPG, S_PAD]
    m = tl.load(m_ptr + part, mask=smask, other=float("-inf"))
    mx = tl.max(m, axis=1)                       # finite: split 0 always holds position 0 (max: exact)
    if IN_ORDER:
        num = tl.zeros((HPG, D), dtype=tl.float32)
        den = tl.zeros((HPG,), dtype=tl.float32)
        for sp in range(0, SPLITS):
            one = (r * H + hh) * SPLITS + sp                                 # [HPG]
            w1 = tl.exp2(tl.load(m_ptr + one) - mx)
            num += tl.load(acc_ptr + one[:, None] * D + d[None, :]) * w1[:, None]
            den += w1 * tl.load(l_ptr + one)
        o = num / den[:, None]
    else:
        l = tl.load(l_ptr + part, mask=smask, other=0.0)
        w = tl.exp2(m - mx[:, None])             # 0 for empty splits
        acc = tl.load(acc_ptr + part[:, :, None] * D + d[None, None, :], mask=smask[:, :, None], other=0.0)
        o = tl.sum(acc * w[:, :, None], axis=1) / tl.sum(w * l, axis=1)[:, None]   # [HPG, D]
    o = _bf16_rne(o)
    cols = r * H * D + hh[:, None] * D + d[None, :]
    if QUANT:
        scale = tl.math.div_rn(tl.max(tl.max(tl.abs(o), axis=1), axis=0), 448.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        qv = _e4m3_rne(tl.clamp(tl.math.div_rn(o, scale), -448.0, 448.0))
        tl.store(out_ptr + cols, qv.to(tl.float8e4nv))
        tl.store(os_ptr + r * stride_sm + grp * stride_sk, scale)
    else:
        tl.store(out_ptr + cols, o.to(tl.bfloat16))


@triton.jit
def add_rmsnorm_quant_kernel(x_ptr, dx_ptr, y_ptr, w_ptr, q_ptr, s_ptr, K, stride_xm, stride_dm, stride_sm,
                             stride_sk, stride_ds, inv_k, eps, GROUPS: tl.constexpr, ON_CPU: tl.constexpr,
                             SPLITS: tl.constexpr = 0):
    """One row per program: y = x + delta (bf16, one rounding, as torch adds), stored, then
    gemm_kernels.rmsnorm_quant_kernel's Qwen3 RMSNorm + per-128 quantization of y. delta is bf16
    or its GEMV's unsummed split-K partials (gemm_kernels.load_output)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUPS)
    cols = g[:, None] * 128 + tl.arange(0, 128)[None, :]
    live = (g < K // 128)[:, None]
    x = tl.load(x_ptr + row * stride_xm + cols, mask=live, other=0.0).to(tl.float32)
    dx = load_output(dx_ptr, row * stride_dm + cols, live, stride_ds, SPLITS)
    y = _bf16_rne(x + dx)
    tl.store(y_ptr + row * K + cols, y.to(tl.bfloat16), mask=live)
    ss = tl.sum(tl.sum(y * y, axis=1), axis=0)
    if ON_CPU:                                   # torch's mean: sum / K on the CPU, sum * (1/K) on CUDA
        var = tl.math.div_rn(ss, K.to(tl.float32))
    else:
        var = ss * inv_k
    h = _bf16_rne(y * tl.math.rsqrt(var + eps))
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    q, scale = _quantize_rows(_bf16_rne(w * h))
    tl.store(q_ptr + row * K + cols, q.to(tl.float8e4nv), mask=live)
    tl.store(s_ptr + row * stride_sm + g * stride_sk, scale, mask=g < K // 128)
