"""drift.py: the error measured while converting equals the error computed plainly in float64."""

from __future__ import annotations

import json
import math

import torch

from fp8vl.conversion.drift import FILE, chunk_error, summarize_parts
from helpers import ref_block_quantize


def _plain(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> tuple[float, float, float, float]:
    n, k = w.shape
    dq = q.double() * s.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    e = w.double() - dq
    return float((e * e).sum()), float((w.double() ** 2).sum()), float(e.abs().max()), float(w.abs().max())


def test_chunk_error_equals_the_float64_error_of_codes_times_scales_on_partial_tiles():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 260, generator=g) * 0.02).bfloat16()       # partial tiles both ways
    w[5, 7] = 0.9                                                     # an outlier tile
    q, s = ref_block_quantize(w)
    got, want = chunk_error(w, q, s), _plain(w, q, s)
    for a, b in zip(got, want):
        assert math.isclose(a, b, rel_tol=1e-5), (got, want)


def test_tiny_weights_do_not_underflow_to_an_exact_sqnr():
    w = (torch.randn(128, 128, generator=torch.Generator().manual_seed(1)) * 1e-25).float()
    q, s = ref_block_quantize(w)
    err2, sig2, _, _ = chunk_error(w, q, s)
    e2, s2, _, _ = _plain(w, q, s)
    assert err2 > 0 and math.isclose(err2, e2, rel_tol=1e-4) and math.isclose(sig2, s2, rel_tol=1e-4)


def test_parts_combine_to_the_whole_tensor_and_the_figures_mean_what_they_say():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(512, 256, generator=g) * 0.02).bfloat16()
    q, s = ref_block_quantize(w)
    parts = [chunk_error(w[r:r + 128], q[r:r + 128], s[r // 128:r // 128 + 1]) for r in range(0, 512, 128)]
    fig = summarize_parts(parts)
    err2, sig2, max_err, amax = _plain(w, q, s)
    assert math.isclose(fig["sqnr_db"], 10 * math.log10(sig2 / err2), abs_tol=1e-3)
    assert math.isclose(fig["rel_error"], math.sqrt(err2 / sig2), rel_tol=1e-5)
    assert math.isclose(fig["max_rel_error"], max_err / amax, rel_tol=1e-5)
    assert summarize_parts([(0.0, 1.0, 0.0, 1.0)])["sqnr_db"] is None       # exact: no infinite float in JSON


def test_quantize_writes_one_figure_per_fp8_tensor(tied_fp8):
    doc = json.loads((tied_fp8.out / FILE).read_text())
    fp8 = [e.name for e in tied_fp8.result.plan.entries if e.quantize]
    assert list(doc["tensors"]) == fp8
    assert all(25 < t["sqnr_db"] < 40 for t in doc["tensors"].values())


def test_the_figures_do_not_depend_on_torch_s_thread_count():
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(640, 4096, generator=g) * 0.02).bfloat16()
    q, s = ref_block_quantize(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = chunk_error(w, q, s)
        torch.set_num_threads(max(2, threads))
        many = chunk_error(w, q, s)
    finally:
        torch.set_num_threads(threads)
    assert one == many
