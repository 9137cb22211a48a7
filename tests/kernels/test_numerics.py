"""fp8vl.kernels.numerics against the plain tile-by-tile reference in helpers.py."""

from __future__ import annotations

import pytest
import torch

from fp8vl.kernels.numerics import (dequantize_weight, fake_quantize_activations, fp8_nan_count, quantize_activations,
                          quantize_weight)
from helpers import (FP8, as_bytes, ref_activation_quantize, ref_block_quantize,
                     ref_dequantize, within_e4m3_bound)

IN_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SCALE_DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(256, 384), (300, 200), (128, 1), (1, 1000), (129, 127)]


def weights(shape, dtype, seed=0, spread=1.0):
    """Gaussian weights with a few 8x outliers and tiles of very different magnitude."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * spread
    w[torch.rand(shape, generator=g) < 1e-3] *= 8
    w[: shape[0] // 2] *= 1e-3   # upper tiles tiny, lower tiles large
    return w.to(dtype)


def assert_matches_reference(w, scale_dtype):
    q, s = quantize_weight(w.clone(), scale_dtype)
    rq, rs = ref_block_quantize(w, scale_dtype)
    assert q.dtype == FP8 and s.dtype == scale_dtype
    assert s.shape == rs.shape and torch.equal(s, rs)
    assert q.shape == w.shape and torch.equal(as_bytes(q), as_bytes(rq))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=str)
def test_weight_bytes_and_scales_equal_reference(in_dtype, scale_dtype, shape):
    assert_matches_reference(weights(shape, in_dtype), scale_dtype)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
def test_all_zero_tile_gets_scale_one_and_zero_codes(scale_dtype):
    w = weights((256, 256), torch.bfloat16)
    w[128:, :128] = 0
    q, s = quantize_weight(w, scale_dtype)
    assert s[1, 0].item() == 1.0
    assert torch.count_nonzero(q[128:, :128].float()) == 0
    assert fp8_nan_count(q) == 0
    assert_matches_reference(w, scale_dtype)


def test_all_zero_weight_quantizes_to_zeros_with_unit_scales():
    q, s = quantize_weight(torch.zeros(300, 200, dtype=torch.bfloat16))
    assert torch.equal(s, torch.ones(3, 2)) and torch.count_nonzero(q.float()) == 0


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 3.0e38), (torch.bfloat16, 3.0e38), (torch.float16, 65000.0)],
                         ids=["f32", "bf16", "f16"])
def test_huge_values_give_no_nan_and_stay_within_bound(dtype, big, scale_dtype):
    w = weights((256, 256), torch.float32).clamp(-1, 1) * big
    w[0, 0], w[200, 200] = big, -big
    w = w.to(dtype)
    q, s = quantize_weight(w.clone(), scale_dtype)
    assert fp8_nan_count(q) == 0 and not torch.isnan(q.float()).any()
    assert torch.isfinite(s.float()).all()
    assert q[0, 0].float().item() == 448.0 and q[200, 200].float().item() == -448.0
    assert within_e4m3_bound(w, q, s).all()
    assert_matches_reference(w, scale_dtype)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=str)
def test_dequantized_error_within_e4m3_bound(in_dtype, scale_dtype):
    w = weights((300, 200), in_dtype, seed=1)
    q, s = quantize_weight(w.clone(), scale_dtype)
    ok = within_e4m3_bound(w, q, s)
    assert ok.all(), f"{int((~ok).sum())} elements outside the e4m3 bound"


def test_error_bound_rejects_a_scale_off_by_ten_percent():
    """The bound check itself can fail: the right codes read with a 10% wrong scale are outside it."""
    w = weights((256, 256), torch.float32, seed=2)
    q, s = quantize_weight(w.clone())
    assert within_e4m3_bound(w, q, s).all()
    assert not within_e4m3_bound(w, q, s * 1.1).all()


def test_dequantize_weight_is_q_times_tile_scale():
    w = weights((300, 200), torch.bfloat16, seed=3)
    q, s = quantize_weight(w)
    d = dequantize_weight(q, s, torch.float32)
    assert torch.equal(d, ref_dequantize(q, s))


def test_non_2d_weight_is_rejected():
    with pytest.raises(ValueError):
        quantize_weight(torch.ones(2, 128, 128))


def test_quantize_weight_leaves_a_float32_input_unchanged():
    w = weights((256, 256), torch.float32)
    before = w.clone()
    quantize_weight(w)
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 256), (7, 384), (1, 128)], ids=str)
def test_activation_quantization_per_token_per_128_equals_reference(shape, dtype):
    x = weights((shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1]), torch.float32, seed=4)
    x = x.reshape(shape).to(dtype)
    x.reshape(-1, shape[-1])[0, :128] = 0  # one all-zero group
    q, s = quantize_activations(x)
    rq, rs = ref_activation_quantize(x)
    assert s.shape == (*shape[:-1], shape[-1] // 128) and s.dtype == torch.float32
    assert torch.equal(s, rs) and torch.equal(as_bytes(q), as_bytes(rq))
    assert s.reshape(-1)[0].item() == 1.0


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
def test_fake_quantize_activations_is_dequant_of_reference(dtype):
    x = weights((6, 256), torch.float32, seed=5).to(dtype)
    rq, rs = ref_activation_quantize(x)
    expect = (rq.float() * rs.repeat_interleave(128, -1)).to(dtype)
    got = fake_quantize_activations(x)
    assert got.dtype == dtype and torch.equal(got, expect)
    assert not torch.equal(got, x)  # it really rounds


def test_activation_width_not_multiple_of_128_is_rejected():
    with pytest.raises(ValueError):
        quantize_activations(torch.ones(2, 200))


def test_fp8_nan_count_counts_both_nan_codes():
    codes = torch.tensor([0x7F, 0xFF, 0x7E, 0x00, 0x80, 0x7F], dtype=torch.uint8)
    q = codes.view(FP8)
    assert fp8_nan_count(q) == 3 == int(torch.isnan(q.float()).sum())


def test_w8a8_matmul_is_the_w8a8_product_and_each_row_its_own():
    """The CPU's W8A8 product: within float32 rounding of dequant(x) @ dequant(W)^T, and each row the
    same bits alone as among 40 (a float32 GEMM's rounding of a row depends on M)."""
    from fp8vl.kernels.numerics import w8a8_matmul

    g = torch.Generator().manual_seed(0)
    q, s = quantize_weight(torch.randn(300, 512, generator=g) * 0.05)
    x = torch.randn(40, 512, generator=g)
    y = w8a8_matmul(x, q, s)
    ref = fake_quantize_activations(x) @ dequantize_weight(q, s, torch.float32).t()
    assert y.dtype == torch.float32 and torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(y[r:r + 1], w8a8_matmul(x[r:r + 1], q, s)) for r in range(40))
    assert torch.equal(w8a8_matmul(x.view(4, 10, 512), q, s), y.view(4, 10, 300))
