"""attention.py's Triton kernels against the engine's torch decode step.

CPU: the ``interp`` tests run in a child pytest with TRITON_INTERPRET=1 (as test_gemm_kernels.py
explains); shapes are small. GPU: the ``gpu`` tests (bigger shapes, CUDA-graph capture) skip
without a CUDA device. The references are the engine's own torch decode attention, the functions
Engine._decode runs without the kernels (layers.torch_qk_norm_rope_cache, torch_decode_attention,
torch_attention_block), and a float64 attention.
"""

from __future__ import annotations

import pytest
import torch

from helpers import INTERPRETER, qwen3_rmsnorm, run_under_triton_interpreter, same_bits
from fp8vl.kernels import attention
from fp8vl.runtime.engine import capture_graph
from fp8vl.runtime.layers import torch_attention_block, torch_decode_attention, torch_qk_norm_rope_cache
from fp8vl.kernels.numerics import quantize_activations

interp = pytest.mark.skipif(not INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child process")
gpu = pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF = torch.bfloat16


@pytest.mark.skipif(INTERPRETER, reason="this is the child")
def test_kernels_under_the_triton_interpreter():
    run_under_triton_interpreter(__file__)



def within_rounding(a: torch.Tensor, b: torch.Tensor, frac: float = 0.02) -> bool:
    """bf16 tensors equal but for rare rounding flips: the GPU's rsqrt may put a normalized value one
    ulp from torch's, and the rotary's bf16 multiply-adds carry it on (a few ulps of that element).
    At most ``frac`` of the elements differ, each by at most 2^-6 of itself plus 2^-8 of the largest."""
    af, bf = a.float(), b.float()
    diff = (af - bf).abs()
    ok = diff <= 2**-6 * bf.abs() + 2**-8 * bf.abs().amax()
    return a.shape == b.shape and bool(ok.all()) and float((diff > 0).float().mean()) <= frac


def reference_rope_cache(qkv, q_norm, k_norm, eps, cos, sin, kc, vc, lens):
    """The engine's decode step from the qkv split to the cache writes -> q [b, H, D], the kernel's layout."""
    return torch_qk_norm_rope_cache(qkv, q_norm, k_norm, eps, cos, sin, kc, vc, lens)[:, :, 0]


def sdpa_reference(q, kc, vc, lens, scale):
    """The engine's attention (SDPA, boolean mask over the whole static cache) of q [b, H, D] -> [b, H*D]."""
    return torch_decode_attention(q[:, :, None], kc, vc, lens, scale)


def exact_attention(q, kc, vc, lens, scale):
    """float64 attention of the bf16 inputs -> [b, H*D] float64, and max|v| per row over live positions."""
    b, h, d = q.shape
    g = h // kc.shape[1]
    out, vmax = [], []
    for r in range(b):
        n = int(lens[r]) + 1
        k = kc[r, :, :n].double().repeat_interleave(g, 0)                   # [H, n, D]
        v = vc[r, :, :n].double().repeat_interleave(g, 0)
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[r].double(), k) * scale, -1)
        out.append(torch.einsum("hn,hnd->hd", p, v).reshape(-1))
        vmax.append(v.abs().amax())
    return torch.stack(out), torch.stack(vmax)


def within_bound(out, exact, vmax):
    """The bound attention.py states: weights off by <= 2^-9 relative (-> 2^-8 max|v|), one bf16
    rounding of the output (2^-9 relative; 2^-8 allowed)."""
    err = (out.double() - exact).abs()
    return bool((err <= 2**-8 * vmax[:, None] + 2**-8 * exact.abs() + 1e-6).all())


def make_inputs(b, h, kv, d, L, lens, seed, device="cpu", exact_sums=False, extra_rows=1):
    g = torch.Generator().manual_seed(seed)
    if exact_sums:   # multiples of 1/8 below 4: every order of summing squares is exact in float32
        qkv = torch.randint(-31, 32, (b, (h + 2 * kv) * d), generator=g).float() / 8
    else:
        qkv = torch.randn(b, (h + 2 * kv) * d, generator=g) * 3
    ang = torch.rand(b, d // 2, generator=g) * 20
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kc = torch.randn(b + extra_rows, kv, L, d, generator=g)   # stale entries everywhere: must not count
    vc = torch.randn(b + extra_rows, kv, L, d, generator=g)
    qn = (torch.randn(d, generator=g) * 0.3 + 1)
    kn = (torch.randn(d, generator=g) * 0.3 + 1)
    t = lambda x: x.to(device=device, dtype=BF)  # noqa: E731
    return (t(qkv), t(qn), t(kn), t(cos), t(sin), t(kc), t(vc), torch.tensor(lens, device=device))


# ----------------------------------------------------------------------- CPU (interpreter)
@interp
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_cache_is_bit_identical_to_the_engine(d, norm):
    h, kv, L = 4, 2, 24
    qkv, qn, kn, cos, sin, kc, vc, lens = make_inputs(4, h, kv, d, L, [0, L - 1, 7, 13], d, exact_sums=norm)
    qn, kn = (qn, kn) if norm else (None, None)
    kc2, vc2 = kc.clone(), vc.clone()
    q = attention.qk_norm_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc, vc, lens)
    q_ref = reference_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc2, vc2, lens)
    # equal values, the sign of a zero aside: torch 2.11's CPU bf16 rotary gives +0 where the kernel
    # (and later torch) give -0
    assert q.shape == q_ref.shape and torch.equal(q, q_ref)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)      # the written slots, and nothing else


@interp
def test_qk_norm_rope_cache_on_random_input_differs_at_most_by_rare_one_ulp_flips():
    h, kv, d, L = 8, 2, 128, 16
    qkv, qn, kn, cos, sin, kc, vc, lens = make_inputs(6, h, kv, d, L, [0, 3, 5, 15, 9, 1], 5)
    kc2, vc2 = kc.clone(), vc.clone()
    q = attention.qk_norm_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc, vc, lens)
    q_ref = reference_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc2, vc2, lens)
    for a, r in ((q, q_ref), (kc, kc2)):
        diff = a.view(torch.int16).int() - r.contiguous().view(torch.int16).int()
        assert int(diff.abs().max()) <= 1 and float((diff != 0).float().mean()) < 1e-2
    assert same_bits(vc, vc2)


@interp
def test_a_length_past_the_cache_writes_nothing():
    h, kv, d, L = 4, 2, 64, 8
    qkv, qn, kn, cos, sin, kc, vc, _ = make_inputs(2, h, kv, d, L, [0, 0], 3)
    kc2, vc2 = kc.clone(), vc.clone()
    q = attention.qk_norm_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc, vc, torch.tensor([L, L + 5]))
    assert same_bits(kc, kc2) and same_bits(vc, vc2)
    q_ref = reference_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc2, vc2, torch.tensor([0, 0]))
    assert same_bits(q, q_ref.contiguous())


@interp
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("splits", [1, 3, None])      # None: attention_splits' choice (2 here)
def test_decode_attention_is_within_the_stated_bound(d, splits):
    h, kv, L = 4, 2, 150                              # 3 blocks of 64 positions, the last partial
    lens = [0, L - 1, 37, 64]
    _, _, _, _, _, kc, vc, lens_t = make_inputs(4, h, kv, d, L, lens, d)
    q = (torch.randn(4, h, d, generator=torch.Generator().manual_seed(1)) * 2).to(BF)
    scale = d ** -0.5
    out = attention.decode_attention(q, kc, vc, lens_t, scale, splits=splits)
    exact, vmax = exact_attention(q, kc, vc, lens_t, scale)
    assert out.shape == (4, h * d) and out.dtype == BF
    assert within_bound(out, exact, vmax)
    assert within_bound(sdpa_reference(q, kc, vc, lens_t, scale), exact, vmax)   # the bound is bf16-sized
    if splits is None:
        assert attention.attention_splits(4, kv, L, 8) == 2


@interp
@pytest.mark.parametrize("quantize", [False, True])
def test_chunked_attention_rows_do_not_depend_on_the_batch_or_the_cache_length(quantize):
    """``chunk``: a row's output is the same bits alone or among others, in a cache of 150 or of 320
    positions (3 or 5 splits, trailing ones empty), and within the stated bound."""
    h, kv, d, L = 4, 2, 128, 150
    lens = [0, L - 1, 37, 64, 128]
    _, _, _, _, _, kc, vc, lens_t = make_inputs(5, h, kv, d, L, lens, 3)
    q = (torch.randn(5, h, d, generator=torch.Generator().manual_seed(3)) * 2).to(BF)
    many = attention.decode_attention(q, kc, vc, lens_t, d ** -0.5, quantize, chunk=64)
    longer = (torch.nn.functional.pad(kc, (0, 0, 0, 170)), torch.nn.functional.pad(vc, (0, 0, 0, 170)))
    for r in range(5):
        one = attention.decode_attention(q[r:r + 1], kc[r:r + 1], vc[r:r + 1], lens_t[r:r + 1], d ** -0.5, quantize,
                                         chunk=64)
        big = attention.decode_attention(q[r:r + 1], longer[0][r:r + 1], longer[1][r:r + 1], lens_t[r:r + 1],
                                         d ** -0.5, quantize, chunk=64)
        for a, b in ((one, big), (one, many)):
            a, b = (a, b) if not quantize else (a[0], b[0])
            assert same_bits(a, b[r:r + 1] if b.shape[0] > 1 else b), r
    if not quantize:
        exact, vmax = exact_attention(q, kc, vc, lens_t, d ** -0.5)
        assert within_bound(many, exact, vmax)


@interp
@pytest.mark.parametrize("d,splits", [(128, 1), (128, 4), (64, 1), (64, 2)])
def test_quantized_attention_output_is_the_activation_quantization_of_the_bf16_output(d, splits):
    h, kv, L = 4, 2, 100
    _, _, _, _, _, kc, vc, lens = make_inputs(3, h, kv, d, L, [L - 1, 0, 50], d + 1)
    q = (torch.randn(3, h, d, generator=torch.Generator().manual_seed(2)) * 2).to(BF)
    out = attention.decode_attention(q, kc, vc, lens, 0.1, splits=splits)
    oq, os_ = attention.decode_attention(q, kc, vc, lens, 0.1, quantize=True, splits=splits)
    q_ref, s_ref = quantize_activations(out)
    assert same_bits(oq, q_ref) and torch.equal(os_, s_ref)
    assert os_.stride() == (1, 3)                     # column-major, as quantize_activations_gpu


@interp
def test_the_whole_attention_block_matches_the_engine_step():
    h, kv, d, L = 4, 2, 128, 70
    qkv, qn, kn, cos, sin, kc, vc, lens = make_inputs(3, h, kv, d, L, [69, 0, 12], 9)
    kc2, vc2 = kc.clone(), vc.clone()
    q = attention.qk_norm_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc, vc, lens)
    out = attention.decode_attention(q, kc, vc, lens, d ** -0.5)
    kc3, vc3 = kc2.clone(), vc2.clone()
    q_ref = reference_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc2, vc2, lens)
    exact, vmax = exact_attention(q_ref.contiguous(), kc2, vc2, lens, d ** -0.5)
    assert within_bound(out, exact, vmax)
    block = torch_attention_block(qkv, qn, kn, 1e-6, cos, sin, kc3, vc3, lens, d ** -0.5)   # what _decode runs
    assert same_bits(kc3, kc2) and same_bits(vc3, vc2) and within_bound(block, exact, vmax)


@interp
@pytest.mark.parametrize("k", [256, 640])
def test_add_rmsnorm_quant_is_the_add_then_the_fused_norm(k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randint(-15, 16, (3, k), generator=g).float() / 8).to(BF)     # sums exact (see test_gemm_kernels)
    delta = (torch.randint(-15, 16, (3, k), generator=g).float() / 8).to(BF)
    w = (torch.randn(k, generator=g) * 0.3 + 1).to(BF)
    y, q, s = attention.add_rmsnorm_quant(x, delta, w, 1e-6)
    assert same_bits(y, x + delta)
    q_ref, s_ref = quantize_activations(qwen3_rmsnorm(x + delta, w, 1e-6))
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)
    # bf16 rounding of the add itself (not exact inputs)
    x, delta = torch.randn(2, k, generator=g).to(BF) * 7, torch.randn(2, k, generator=g).to(BF) * 1e-2
    assert same_bits(attention.add_rmsnorm_quant(x, delta, w, 1e-6)[0], x + delta)


@interp
def test_consumers_sum_split_k_partials_as_the_gemv_would():
    """add_rmsnorm_quant and qk_norm_rope_cache given a GEMV's unsummed float32 partials [S, M, N]
    compute the bits they compute on gemm.splitk_sum of them (the GEMV's own sum)."""
    from fp8vl.kernels.gemm import splitk_sum

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 256, generator=g).to(BF)
    parts = torch.randn(3, 3, 256, generator=g)
    w = (torch.randn(256, generator=g) * 0.3 + 1).to(BF)
    (y1, q1, s1), (y2, q2, s2) = (attention.add_rmsnorm_quant(x, parts, w, 1e-6),
                                  attention.add_rmsnorm_quant(x, splitk_sum(parts), w, 1e-6))
    assert same_bits(y1, y2) and same_bits(q1, q2) and torch.equal(s1, s2)
    h, kv, d, L = 4, 2, 64, 24
    qkv, qn, kn, cos, sin, kc, vc, lens = make_inputs(2, h, kv, d, L, [3, 9], 6)
    parts = torch.randn(2, 2, (h + 2 * kv) * d, generator=g) * 3
    kc2, vc2 = kc.clone(), vc.clone()
    q = attention.qk_norm_rope_cache(parts, qn, kn, 1e-6, cos, sin, kc, vc, lens)
    q2 = attention.qk_norm_rope_cache(splitk_sum(parts), qn, kn, 1e-6, cos, sin, kc2, vc2, lens)
    assert same_bits(q, q2) and same_bits(kc, kc2) and same_bits(vc, vc2)
    assert not same_bits(vc, make_inputs(2, h, kv, d, L, [3, 9], 6)[6])      # the cache was written


def test_bad_shapes_get_one_clear_error():
    kc = torch.zeros(2, 2, 8, 64, dtype=BF)
    with pytest.raises(ValueError, match="qkv must be bf16"):
        attention.qk_norm_rope_cache(torch.zeros(2, 100, dtype=BF), None, None, 1e-6, torch.zeros(2, 64, dtype=BF),
                                     torch.zeros(2, 64, dtype=BF), kc, kc.clone(), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="both q_norm and k_norm"):
        attention.qk_norm_rope_cache(torch.zeros(2, 512, dtype=BF), torch.ones(64, dtype=BF), None, 1e-6,
                                     torch.zeros(2, 64, dtype=BF), torch.zeros(2, 64, dtype=BF), kc, kc.clone(),
                                     torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="H a multiple of KV"):
        attention.decode_attention(torch.zeros(2, 3, 64, dtype=BF), kc, kc.clone(), torch.zeros(2, dtype=torch.long),
                                   1.0)
    with pytest.raises(ValueError, match="quantize needs"):
        attention.decode_attention(torch.zeros(2, 2, 256, dtype=BF), torch.zeros(2, 2, 8, 256, dtype=BF),
                                   torch.zeros(2, 2, 8, 256, dtype=BF), torch.zeros(2, dtype=torch.long), 1.0, True)
    with pytest.raises(ValueError, match="head_dim 32"):
        attention.decode_attention(torch.zeros(2, 2, 32, dtype=BF), torch.zeros(2, 2, 8, 32, dtype=BF),
                                   torch.zeros(2, 2, 8, 32, dtype=BF), torch.zeros(2, dtype=torch.long), 1.0)


# ----------------------------------------------------------------------- GPU
@gpu
@pytest.mark.parametrize("norm", [True, False])
def test_gpu_rope_cache_on_8b_shapes(norm):
    h, kv, d, L, b = 32, 8, 128, 512, 16
    lens = torch.randint(0, L, (b,)).tolist()
    qkv, qn, kn, cos, sin, kc, vc, lens = make_inputs(b, h, kv, d, L, lens, 0, "cuda", exact_sums=norm)
    qn, kn = (qn, kn) if norm else (None, None)
    kc2, vc2 = kc.clone(), vc.clone()
    q = attention.qk_norm_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc, vc, lens)
    q_ref = reference_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc2, vc2, lens)
    assert same_bits(vc, vc2)
    if norm:   # the q/k RMSNorm's rsqrt on the GPU may round one ulp away from torch's
        assert within_rounding(q, q_ref) and within_rounding(kc, kc2)
    else:
        assert same_bits(q, q_ref.contiguous()) and same_bits(kc, kc2)


@gpu
@pytest.mark.parametrize("b,L", [(1, 2048), (8, 2048), (64, 512)])
def test_gpu_attention_on_8b_shapes(b, L):
    h, kv, d = 32, 8, 128
    lens = torch.randint(0, L, (b,))
    lens[0] = L - 1
    lens[-1] = 0 if b > 1 else L - 1
    _, _, _, _, _, kc, vc, lens = make_inputs(b, h, kv, d, L, lens.tolist(), 1, "cuda")
    q = (torch.randn(b, h, d, device="cuda") * 2).to(BF)
    out = attention.decode_attention(q, kc, vc, lens, d ** -0.5)
    exact, vmax = exact_attention(q, kc, vc, lens, d ** -0.5)
    assert within_bound(out, exact, vmax)
    oq, os_ = attention.decode_attention(q, kc, vc, lens, d ** -0.5, quantize=True)
    q_ref, s_ref = quantize_activations(out)
    assert same_bits(oq, q_ref) and torch.equal(os_, s_ref)


@gpu
def test_gpu_add_rmsnorm_quant():
    x = (torch.randint(-15, 16, (8, 4096), device="cuda").float() / 8).to(BF)
    delta = (torch.randint(-15, 16, (8, 4096), device="cuda").float() / 8).to(BF)
    w = (torch.randn(4096, device="cuda") * 0.3 + 1).to(BF)
    y, q, s = attention.add_rmsnorm_quant(x, delta, w, 1e-6)
    q_ref, s_ref = quantize_activations(qwen3_rmsnorm(x + delta, w, 1e-6))
    assert same_bits(y, x + delta) and same_bits(q, q_ref) and torch.equal(s, s_ref)


@gpu
@pytest.mark.parametrize("b", [2, 64])               # split sequence + combine; one launch, no split
def test_gpu_cuda_graph_replay_equals_eager_as_lens_change(b):
    h, kv, d, L = 32, 8, 128, 1024
    qkv, qn, kn, cos, sin, kc, vc, lens = make_inputs(b, h, kv, d, L, [5] * b, 2, "cuda")
    kc0, vc0 = kc.clone(), vc.clone()

    def step():
        q = attention.qk_norm_rope_cache(qkv, qn, kn, 1e-6, cos, sin, kc, vc, lens)
        return attention.decode_attention(q, kc, vc, lens, d ** -0.5, quantize=True)

    graph, (oq, os_) = capture_graph(step)
    for new in ([7] * b, torch.randint(0, L, (b,)).tolist(), [L - 1] * b):
        lens.copy_(torch.tensor(new, device="cuda"))
        kc.copy_(kc0)
        vc.copy_(vc0)
        graph.replay()
        got = (oq.clone(), os_.clone(), kc.clone(), vc.clone())
        kc.copy_(kc0)
        vc.copy_(vc0)
        want = step()
        assert same_bits(got[0], want[0]) and torch.equal(got[1], want[1])
        assert same_bits(got[2], kc) and same_bits(got[3], vc)
