"""The Triton kernels of gemm.py / gemm_kernels.py on the CPU, through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, and the suite's other modules
import it without: so ``test_kernels_under_the_triton_interpreter`` re-runs this module in a child
pytest with TRITON_INTERPRET=1, where the ``interp`` tests run (and are skipped in the parent).
Shapes are small: the interpreter runs programs one by one in numpy. The last test compiles the
table configs for cards no machine here has (8.9, 12.0), without running them.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import (INTERPRETER, fp8_weight, grouped_gemm_case, qwen3_rmsnorm, rel, run_under_triton_interpreter,
                     same_bits, w8a8_reference)
from fp8vl.kernels import gemm
from fp8vl.kernels.numerics import FP8_MAX, dequantize_weight, quantize_activations

interp = pytest.mark.skipif(not INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(INTERPRETER, reason="this is the child")
def test_kernels_under_the_triton_interpreter():
    run_under_triton_interpreter(__file__)



@interp
def test_activation_quantization_rounds_every_e4m3_tie_to_even():
    # 448 in every group makes the scale exactly 1, so q is x rounded to e4m3 by the kernel:
    # all midpoints between neighbouring e4m3 values (subnormals included), both signs
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()   # 0 .. 448
    mids = (codes[:-1] + codes[1:]) / 2
    vals = torch.cat([mids, -mids, codes, -codes, torch.tensor([1e-5, -1e-5, 0.0, -0.0])])
    vals = torch.cat([vals, torch.zeros(-len(vals) % 127)])
    x = torch.cat([torch.full((len(vals) // 127, 1), FP8_MAX), vals.view(-1, 127)], 1).reshape(1, -1)
    q, s = gemm.quantize_activations_gpu(x)
    q_ref, s_ref = quantize_activations(x)
    assert bool((s == 1).all())
    assert same_bits(q, q_ref)


@interp
@pytest.mark.parametrize("m,scale", [(1, 3.0), (5, 1e-3), (33, 100.0)])
def test_activation_quantization_is_bit_identical(m, scale):
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 512, generator=g) * scale).to(torch.bfloat16)
    x[0, :128] = 0                                   # an all-zero group: scale 1
    q, s = gemm.quantize_activations_gpu(x)
    q_ref, s_ref = quantize_activations(x)
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)
    assert s.stride() == (1, m)                      # column-major, as cuBLAS reads it


@interp
@pytest.mark.parametrize("k", [256, 640])            # 640: 5 groups (masked), mean by a non-power-of-2
def test_rmsnorm_quant_is_bit_identical_to_the_unfused_norm(k):
    g = torch.Generator().manual_seed(k)
    # multiples of 1/8 below 4: every order of summing their squares is exact in float32, so the
    # only freedom left (the reduction order) cannot hide a difference in the rest of the math
    x = (torch.randint(-31, 32, (3, k), generator=g).float() / 8).to(torch.bfloat16)
    w = (torch.randn(k, generator=g) * 0.3 + 1).to(torch.bfloat16)
    q, s = gemm.rmsnorm_quant(x, w, 1e-6)
    q_ref, s_ref = quantize_activations(qwen3_rmsnorm(x, w, 1e-6))
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)


@interp
def test_rmsnorm_quant_on_random_input_differs_at_most_by_rare_flips():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1024, generator=g).to(torch.bfloat16) * 5
    w = (torch.randn(1024, generator=g) * 0.3 + 1).to(torch.bfloat16)
    q, s = gemm.rmsnorm_quant(x, w, 1e-6)
    q_ref, s_ref = quantize_activations(qwen3_rmsnorm(x, w, 1e-6))
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 1e-3
    assert torch.allclose(s, s_ref, rtol=2**-8, atol=0)


@interp
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # numpy's exp(100) = inf, as expf's
@pytest.mark.parametrize("m,i", [(1, 384), (3, 1024)])
def test_silu_mul_quant_is_bit_identical_to_the_unfused_bf16_math(m, i):
    g = torch.Generator().manual_seed(i)
    gate_up = (torch.randn(m, 2 * i, generator=g) * 4).to(torch.bfloat16)
    gate_up[0, :8] = torch.tensor([-100.0, 100.0, -20.0, 0.0, 1e-30, -1e-30, 88.0, -88.0])
    q, s = gemm.silu_mul_quant(gate_up)
    gate, up = gate_up.chunk(2, -1)
    q_ref, s_ref = quantize_activations(F.silu(gate) * up)
    assert same_bits(q, q_ref) and torch.equal(s, s_ref)


@interp
@pytest.mark.parametrize("m,n,k", [(1, 200, 1024), (7, 256, 512), (16, 136, 384)])   # splits 2, 1, 1
def test_decode_gemm_matches_the_w8a8_simulation(m, n, k):
    q, s = fp8_weight(n, k, m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    b = torch.randn(n, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    y = gemm.fp8_gemm(xq, xs, q, s, torch.bfloat16, b)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert rel(y, w8a8_reference(x, q, s) + b.float()) < 5e-3


@interp
@pytest.mark.parametrize("split", [1, 3, 8])
def test_every_split_k_gives_the_same_product(split):
    q, s = fp8_weight(200, 1024, 0)       # partial last N tile and 128-row block; 3 splits: 3+3+2 blocks
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    cfg = gemm.LaunchConfig({"BLOCK_N": 64, "SPLIT_K": split, "UNROLL": 2})
    counters = gemm.gemv_counters(200, "cpu")
    y = gemm._gemv(xq, xs, q, s, torch.bfloat16, None, True, cfg, counters)
    assert rel(y, w8a8_reference(x, q, s)) < 5e-3
    assert not counters.any()                      # left zero for the next call (graph replays)
    b = torch.randn(200).to(torch.bfloat16)
    # the last split's in-kernel sum and the second launch sum the partials in the same order
    fused = gemm._gemv(xq, xs, q, s, torch.bfloat16, b, True, cfg, counters)
    two = gemm._gemv(xq, xs, q, s, torch.bfloat16, b, True, cfg, fused_reduce=False)
    assert torch.equal(fused, two) and not counters.any()


@interp
@pytest.mark.parametrize("split", [1, 3])
def test_gemv_rows_are_the_same_bits_at_every_batch_size(split):
    """Batch invariance: M = 40 runs in three 16-row chunks, each row the bits it gets alone (M = 1),
    with K split and summed in the kernel or returned as partials, W8A8 and W8A16."""
    q, s = fp8_weight(200, 1024, 3)
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    cfg = gemm.LaunchConfig({"BLOCK_N": 64, "SPLIT_K": split, "UNROLL": 2})
    counters = gemm.gemv_counters(200, "cpu")
    w8a8 = gemm._gemv(xq, xs, q, s, torch.bfloat16, None, True, cfg, counters)
    for a_fp8, xa in ((True, xs), (False, None)):
        xin = xq if a_fp8 else x
        many = gemm._gemv(xin, xa, q, s, torch.bfloat16, None, a_fp8, cfg, counters)
        for r in (0, 17, 39):
            one = gemm._gemv(xin[r:r + 1], None if xa is None else xa[r:r + 1], q, s, torch.bfloat16, None, a_fp8,
                             cfg, counters)
            assert same_bits(many[r:r + 1], one), (a_fp8, r)
        assert not counters.any()
    assert rel(gemm.fp8_gemm(xq, xs, q, s, invariant=True), w8a8_reference(x, q, s)) < 5e-3
    if split > 1:
        parts = gemm._gemv(xq, xs, q, s, torch.bfloat16, None, True, cfg, partials=True)
        assert parts.shape == (split, 40, 200) and same_bits(gemm.splitk_sum(parts), w8a8)


@interp
def test_bf16_linear_rows_are_the_same_bits_at_every_batch_size():
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(200, 1024, generator=g) * 0.02).to(torch.bfloat16)
    b = torch.randn(200, generator=g).to(torch.bfloat16)
    x = torch.randn(40, 1024, generator=g).to(torch.bfloat16)
    assert gemm.bf16_config(200, 1024, 8).kwargs["SPLIT_K"] > 1      # K split here (8 "SMs")
    many = gemm.bf16_linear(x, w, b)
    assert rel(many, x.float() @ w.float().t() + b.float()) < 5e-3
    for r in (0, 17, 39):
        assert same_bits(many[r:r + 1], gemm.bf16_linear(x[r:r + 1], w, b)), r


@interp
def test_rmsnorm_rows_are_the_unfused_norm_at_every_batch_size():
    g = torch.Generator().manual_seed(6)
    x = (torch.randint(-31, 32, (9, 640), generator=g).float() / 8).to(torch.bfloat16)   # exact sums (above)
    w = (torch.randn(640, generator=g) * 0.3 + 1).to(torch.bfloat16)
    y = gemm.rmsnorm(x, w, 1e-6)
    assert same_bits(y, qwen3_rmsnorm(x, w, 1e-6))
    assert same_bits(y[4:5], gemm.rmsnorm(x[4:5], w, 1e-6))


@interp
@pytest.mark.parametrize("a_fp8", [True, False])
def test_scales_loaded_a_step_ahead_give_the_same_bits_at_every_unroll(a_fp8):
    """The GEMV loads the next UNROLL K blocks' scales while it multiplies the current ones: 1, 2
    or 4 blocks per step, over splits of 3, 3 and 2 blocks (the last step partly past the split's
    end), give the same bits, W8A8 and W8A16; a tile that would straddle two 128-row scale blocks
    is refused. (Tiles of other heights are not compared bit for bit: the interpreter's dot sums
    in an order that depends on the tile's shape.)"""
    q, s = fp8_weight(256, 1024, 5)
    x = torch.randn(5, 1024, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x) if a_fp8 else (x, None)
    outs = [gemm._gemv(xq, xs, q, s, torch.bfloat16, None, a_fp8,
                       gemm.LaunchConfig({"BLOCK_N": 64, "SPLIT_K": 3, "UNROLL": u}), partials=True)
            for u in (1, 2, 4)]
    assert all(same_bits(o, outs[0]) for o in outs[1:])
    ref = w8a8_reference(x, q, s) if a_fp8 else x.float() @ dequantize_weight(q, s).float().T
    assert rel(gemm.splitk_sum(outs[0]), ref) < 5e-3
    with pytest.raises(ValueError, match="BLOCK_N must divide"):
        gemm._gemv(xq, xs, q, s, torch.bfloat16, None, a_fp8,
                   gemm.LaunchConfig({"BLOCK_N": 256, "SPLIT_K": 1, "UNROLL": 2}))


@interp
def test_split_k_partials_summed_by_the_consumer_are_the_gemvs_own_sum():
    """fp8_gemm(partials=True) leaves a split GEMV's float32 partials unsummed; splitk_sum and
    silu_mul_quant sum them as the GEMV's last split would: the same bits as the plain path."""
    q, s = fp8_weight(512, 1024, 2)      # gate_up-like [2I, K], I = 256
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    cfg = gemm.LaunchConfig({"BLOCK_N": 64, "SPLIT_K": 3, "UNROLL": 2})
    plain = gemm._gemv(xq, xs, q, s, torch.bfloat16, None, True, cfg)
    parts = gemm._gemv(xq, xs, q, s, torch.bfloat16, None, True, cfg, partials=True)
    assert parts.shape == (3, 3, 512) and parts.dtype == torch.float32
    assert not torch.equal(parts[0], parts[1])                     # real partials, not copies
    assert same_bits(gemm.splitk_sum(parts), plain)
    (q1, s1), (q2, s2) = gemm.silu_mul_quant(parts), gemm.silu_mul_quant(plain)
    assert same_bits(q1, q2) and torch.equal(s1, s2)
    # with a bias, or without a split, the output comes summed
    b = torch.randn(512).to(torch.bfloat16)
    assert gemm._gemv(xq, xs, q, s, torch.bfloat16, b, True, cfg, partials=True).shape == (3, 512)
    one = gemm.LaunchConfig({"BLOCK_N": 64, "SPLIT_K": 1, "UNROLL": 2})
    assert same_bits(gemm._gemv(xq, xs, q, s, torch.bfloat16, None, True, one, partials=True), plain)


@interp
@pytest.mark.parametrize("split", [1, 2])
def test_unmasked_weight_loads_give_the_masked_bits(split):
    """EVEN_N (the default where the tiles cover N exactly) drops the N mask from the weight loads
    and nothing else; a config asking for it where they do not is refused."""
    q, s = fp8_weight(256, 1024, 4)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    masked, even = (gemm._gemv(xq, xs, q, s, torch.bfloat16, None, True,
                               gemm.LaunchConfig({"BLOCK_N": 64, "SPLIT_K": split, "UNROLL": 2, "EVEN_N": e}))
                    for e in (False, True))
    assert same_bits(masked, even) and rel(even, w8a8_reference(x, q, s)) < 5e-3
    assert gemm.decode_config(1, 256, 1024, 8).kwargs["EVEN_N"]
    q2, s2 = fp8_weight(200, 1024, 4)
    with pytest.raises(ValueError, match="EVEN_N needs N % BLOCK_N == 0"):
        gemm._gemv(xq, xs, q2, s2, torch.bfloat16, None, True,
                   gemm.LaunchConfig({"BLOCK_N": 64, "SPLIT_K": split, "UNROLL": 2, "EVEN_N": True}))


@interp
@pytest.mark.parametrize("m,n,k", [(40, 200, 384), (80, 136, 256)])
def test_triton_block_gemm_matches_the_w8a8_simulation(m, n, k):
    q, s = fp8_weight(n, k, m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    y = gemm.triton_block_gemm(xq, xs, q, s)
    assert rel(y, w8a8_reference(x, q, s)) < 5e-3
    # two K blocks per step (k = 384: one pair, then the odd block alone)
    pairs = gemm.LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8, "PAIRS": True})
    yp = gemm._block_gemm(xq, xs, q, s, torch.bfloat16, None, True, pairs)
    assert rel(yp, w8a8_reference(x, q, s)) < 5e-3
    b = torch.randn(n).to(torch.bfloat16)
    yb = gemm.fp8_linear(x, q, s, b, backend="triton")   # the forced prefill path, bias in the kernel
    assert rel(yb, w8a8_reference(x, q, s) + b.float()) < 5e-3


@interp
@pytest.mark.parametrize("m", [3, 33])
def test_w8a16_is_the_weight_only_product(m):
    q, s = fp8_weight(200, 512, m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = gemm.w8a16_linear(x, q, s)
    ref = x.float() @ dequantize_weight(q, s, torch.float32).t()
    assert rel(y, ref) < 5e-3
    assert rel(y, w8a8_reference(x, q, s)) > 5e-3     # no activation quantization error in it


@interp
def test_grouped_expert_gemm_uses_each_rows_expert():
    y, want = grouped_gemm_case(4, 136, 256, [0, 3, 3, 1, -1, 2])
    for r, ref in enumerate(want):
        if ref is None:
            assert bool((y[r] == 0).all())
        else:
            assert rel(y[r], ref) < 5e-3


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (2048, 2048),
                                 (2048, 6144), (51200, 5120), (5120, 25600), (200, 256)])
@pytest.mark.parametrize("sms", [8, 58, 132, 170])
@pytest.mark.parametrize("pdl", [False, True])
def test_default_decode_configs_keep_k_splits_whole_and_split_no_more_than_needed(n, k, sms, pdl):
    config = gemm.decode_config(1, n, k, sms, pdl)
    cfg = config.kwargs
    assert gemm.decode_config(8, n, k, sms, pdl) == config                         # one config for every M
    assert cfg["BLOCK_N"] == (128 if n // 128 >= 2 * sms and not pdl else 64)     # 128 rows: two tiles per SM
    split, tiles, kbs = cfg["SPLIT_K"], -(-n // cfg["BLOCK_N"]), k // 128
    assert split in (1, 2, 4, 8)
    if split > 1:
        assert kbs // split >= cfg["UNROLL"] and kbs // split >= 4   # whole steps of whole K blocks
        half = split // 2                                 # the smaller split was short of programs or too long
        assert tiles * half < 1.5 * sms or kbs // half > 64
    assert cfg["PREFETCH"] == (4 if pdl else 0)           # prefetching only pays before a PDL wait
    assert config.num_stages == (4 if pdl and tiles * split <= 2 * sms else 3)   # 4 with PDL where one wave holds them
    assert cfg["EVEN_N"] == (n % cfg["BLOCK_N"] == 0)     # unmasked where the tiles cover N exactly


def test_pdl_is_off_without_a_cuda_device():
    assert not gemm.pdl(torch.device("cpu"))
    assert not gemm.use_tma(torch.device("cpu"))


def test_bad_shapes_get_one_clear_error():
    q, s = fp8_weight(256, 512, 0)
    with pytest.raises(ValueError, match="K % 128"):
        gemm.fp8_gemm(torch.zeros(2, 500, dtype=torch.float8_e4m3fn), torch.ones(2, 4), q, s)
    with pytest.raises(ValueError, match="weight scale"):
        gemm.fp8_gemm(torch.zeros(2, 512, dtype=torch.float8_e4m3fn), torch.ones(2, 4), q, s[:1])
    with pytest.raises(ValueError, match="backend"):
        gemm.fp8_gemm(torch.zeros(32, 512, dtype=torch.float8_e4m3fn), torch.ones(32, 4), q, s, backend="cutlass")


# The most shared memory one block may take on the cards no machine here has: 8.9 (Ada: RTX 40xx,
# L4) and 12.0 (consumer Blackwell: RTX 50xx). A config over it fails there at its first launch.
SHARED_PER_BLOCK = {(8, 9): 99 << 10, (12, 0): 99 << 10}
# (hidden, intermediate, attention heads) of Qwen3-VL 2B, 4B, 8B, 32B; 8 KV heads, head_dim 128
DECODERS = [(2048, 6144, 16), (2560, 9728, 32), (4096, 12288, 32), (5120, 25600, 64)]


def compiled_shared_bytes(kernel, cc: tuple[int, int], constexprs: dict, cfg: gemm.LaunchConfig,
                          x_type: str = "*fp8e4nv") -> int:
    """Shared memory of ``kernel`` compiled (Triton's own ptxas, no GPU) for compute capability
    ``cc`` with ``cfg``: pointers, N, K and the row stride 16-divisible, as a launch on real
    tensors specializes them (without that, Triton neither vectorizes nor pipelines the loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"x_ptr": x_type, "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "b_ptr": "*bf16",
                "y_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    const = {**constexprs, **cfg.kwargs}
    names = kernel.arg_names
    sig = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    aligned = [n for n in names if sig[n].startswith("*") or n in ("N", "K", "stride_xm")]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", cc[0] * 10 + cc[1], 32), options=opts).metadata.shared


@pytest.mark.skipif(INTERPRETER, reason="compiles for real targets")
@pytest.mark.parametrize("cc", list(SHARED_PER_BLOCK))
def test_table_configs_fit_the_shared_memory_of_ada_and_consumer_blackwell(cc):
    """Every decode-GEMV config the table gives for the Qwen3-VL decoder linears (fused qkv, o,
    fused gate_up, down; M = 1 and 8; launched with PDL too where the card has it; W8A8 and W8A16)
    and the block GEMM's table configs fit a block's shared memory on 8.9 and 12.0 cards."""
    from fp8vl.kernels import gemm_kernels as gk

    sms = {(8, 9): 76, (12, 0): 170}[cc]                  # an RTX 4080, an RTX 5090
    shapes = [s for h, i, heads in DECODERS for s in (((heads + 16) * 128, h), (h, heads * 128), (2 * i, h), (h, i))]
    gemv = {}
    for (n, k), m, pdl in itertools.product(shapes, (1, 8), (False, True) if cc >= (9, 0) else (False,)):
        cfg = gemm.decode_config(m, n, k, sms, pdl)
        gemv[(repr(cfg), pdl)] = (cfg, pdl)
    assert len(gemv) >= 2
    for (cfg, pdl), a_fp8 in itertools.product(gemv.values(), (True, False)):
        base = dict(A_FP8=a_fp8, HAS_BIAS=False, ON_CPU=False, M_PAD=gemm.DECODE_MAX_M, FUSED_REDUCE=True, PDL=pdl)
        used = compiled_shared_bytes(gk.gemv_kernel, cc, base, cfg, "*fp8e4nv" if a_fp8 else "*bf16")
        assert 0 < used <= SHARED_PER_BLOCK[cc], (cfg, pdl, a_fp8, used)
    for a_fp8 in (True, False):
        cfg = gemm.prefill_config(2048, 4096, 4096, sms, a_fp8)
        base = dict(A_FP8=a_fp8, HAS_BIAS=False, ON_CPU=False, PAIRS=False)
        used = compiled_shared_bytes(gk.block_gemm_kernel, cc, base, cfg, "*fp8e4nv" if a_fp8 else "*bf16")
        assert 0 < used <= SHARED_PER_BLOCK[cc], (cfg, a_fp8, used)


def compile_for(kernel, cc: tuple[int, int], types: dict, constexprs: dict, num_warps: int = 4,
                num_stages: int = 3) -> int:
    """``kernel`` compiled (no GPU) for compute capability ``cc``: argument types by name (others
    i32), pointers 16-divisible -> its shared memory in bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")})
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", cc[0] * 10 + cc[1], 32), options=opts).metadata.shared


@pytest.mark.skipif(INTERPRETER, reason="compiles for real targets")
@pytest.mark.parametrize("cc", [(9, 0), (8, 9), (12, 0)])
def test_batch_invariant_kernels_compile_for_hopper_ada_and_blackwell(cc):
    """The kernels only the batch-invariant decode runs (bf16_linear's GEMM, the plain RMSNorm,
    attention in fixed chunks merged in order) compile for real cards, within a block's shared memory."""
    from fp8vl.kernels import attention_kernels as ak
    from fp8vl.kernels import gemm_kernels as gk

    cfg = gemm.bf16_config(4096, 4096, 132)
    used = compile_for(gk.bf16_gemm_kernel, cc, {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
                                                  "y_ptr": "*bf16", "part_ptr": "*fp32"},
                       {"HAS_BIAS": False, "ON_CPU": False,
                        **{k: v for k, v in cfg.kwargs.items() if k != "SPLIT_K"}}, cfg.num_warps, cfg.num_stages)
    assert 0 < used <= 99 << 10, used
    compile_for(gk.rmsnorm_quant_kernel, cc, {"x_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*bf16", "s_ptr": "*fp32",
                                              "inv_k": "fp32", "eps": "fp32"},
                {"GROUPS": 32, "ON_CPU": False, "PDL": False, "QUANT": False}, 8)
    ptrs = {"q_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "lens_ptr": "*i64", "out_ptr": "*fp8e4nv",
            "os_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "qk_scale": "fp32"}
    compile_for(ak.decode_attention_kernel, cc, ptrs, {"H": 32, "D": 128, "G": 4, "G_PAD": 16, "BLOCK_N": 64,
                                                      "FINAL": False, "QUANT": True, "ON_CPU": False, "CHUNK": 64}, 4, 2)
    compile_for(ak.combine_kernel, cc, ptrs, {"H": 32, "D": 128, "HPG": 1, "S_PAD": 8, "QUANT": True,
                                             "IN_ORDER": True}, 1, 1)
