"""Batch invariance on the CPU: a prompt's greedy answer, and every decode step's logits bit for bit,
do not depend on what else shares its batch (batch size, prefill grouping, slot refills).

Tiny Qwen3-VL dense and MoE and Qwen2.5-VL, BF16 and FP8 (the W8A8 simulation), 12 images of 8
sizes (prompts of one length prefill together) and 2 text prompts, 128 new tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fp8vl import QuantizeOptions, quantize
from fp8vl.runtime.engine import Engine, EngineOptions, Request
from fp8vl.runtime.loader import Loaded, encode, load_model, load_processor
from fp8vl.apps.tiny import build_tiny

SIZES = [(64, 96), (128, 64), (96, 128), (64, 64), (64, 96), (160, 64), (64, 64), (96, 96),
         (128, 64), (64, 160), (96, 128), (128, 128)]
TOKENS = 128


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    root = tmp_path_factory.mktemp("q25")
    src = build_tiny(root / "src", "qwen2_5_vl")
    quantize(src, root / "fp8", QuantizeOptions(workers=1))
    return {"src": src, "fp8": root / "fp8"}


@pytest.fixture(scope="module")
def checkpoints(dense_src, dense_fp8, moe_src, moe_fp8, qwen25):
    return {("dense", "src"): dense_src, ("dense", "fp8"): dense_fp8.out, ("moe", "src"): moe_src,
            ("moe", "fp8"): moe_fp8.out, ("qwen2_5_vl", "src"): qwen25["src"], ("qwen2_5_vl", "fp8"): qwen25["fp8"]}


def _loaded(path) -> Loaded:
    return Loaded(load_model(path, "cpu", "w8a8"), load_processor(path, True), True, path)


def _requests(L: Loaded) -> list[Request]:
    rng = np.random.RandomState(0)
    reqs = [Request(encode(L, "Describe this image.", Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))),
                    f"img{i}") for i, (h, w) in enumerate(SIZES)]
    return reqs + [Request(encode(L, "Hello there. " * (i + 1)), f"txt{i}") for i in range(2)]


def _run(L: Loaded, reqs, eos, **opts) -> dict[str, list[int]]:
    eng = Engine(L.model, eos, EngineOptions(max_len=512, max_new_tokens=TOKENS, batch_invariant=True, **opts))
    return {r.tag: ids for r, ids in eng.generate(reqs)}


@pytest.mark.parametrize("arch", ["dense", "moe", "qwen2_5_vl"])
@pytest.mark.parametrize("which", ["src", "fp8"])
def test_greedy_answers_do_not_depend_on_the_batch(arch, which, checkpoints):
    """Batch 1, batch 3, every prompt at once, and continuous batching whose slots refill at
    different steps (an end-of-sequence token chosen so that answers end at different lengths)."""
    L = _loaded(checkpoints[arch, which])
    reqs = _requests(L)
    alone = _run(L, reqs, [], max_batch=1)
    assert len(alone) == len(reqs) and all(len(a) == TOKENS for a in alone.values())
    # an EOS that ends some answers early, at different steps: slots then free up and refill mid-run
    counts: dict[int, int] = {}
    for a in alone.values():
        for t in set(a[4:]):
            counts[t] = counts.get(t, 0) + 1
    eos = [min(counts, key=lambda t: (abs(counts[t] - len(reqs) // 2), t))]
    ended = {tag: a[:a.index(eos[0])] if eos[0] in a else a for tag, a in alone.items()}
    assert len({len(a) for a in ended.values()}) >= 3, "the chosen EOS does not stagger the answers"
    assert _run(L, reqs, [], max_batch=3) == alone
    assert _run(L, reqs, [], max_batch=len(reqs), prefill_batch=len(reqs)) == alone
    assert _run(L, reqs, eos, max_batch=4, prefill_batch=2) == ended


def _step_logits(L: Loaded, reqs: list[Request], answers: list[list[int]], batch: int) -> list[torch.Tensor]:
    eng = Engine(L.model, [], EngineOptions(max_len=512, max_new_tokens=TOKENS, max_batch=batch,
                                            batch_invariant=True))
    out = []
    for i in range(0, len(reqs), batch):
        out += eng.forced_logits_batch([(r.inputs, a) for r, a in zip(reqs[i:i + batch], answers[i:i + batch])])
    return out


@pytest.mark.parametrize("which", ["src", "fp8"])
def test_decode_logits_are_bit_identical_across_batch_sizes(which, checkpoints):
    """Teacher-forced on batch 1's answers: every position's logits at batch 1, 3 and 7 are the
    same bits."""
    L = _loaded(checkpoints["dense", which])
    reqs = _requests(L)[:7]
    eng = Engine(L.model, [], EngineOptions(max_len=512, max_new_tokens=24, max_batch=1))
    answers = [ids for _, ids in eng.generate(reqs)]
    one = _step_logits(L, reqs, answers, 1)
    assert all(r.shape == (24, one[0].shape[-1]) for r in one)
    for b in (3, 7):
        many = _step_logits(L, reqs, answers, b)
        assert all(torch.equal(x, y) for x, y in zip(one, many)), b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["src", "fp8"])
def test_gpu_answers_and_logits_do_not_depend_on_the_batch(which, dense_src, dense_fp8):
    """On the GPU (CUDA graphs, Triton decode kernels, FP8 GEMMs where the card has them), with
    ``batch_invariant``: the answers at batch 1, 3, all at once and with refills are
    the same, and so is every decode step's logits, bit for bit, at batch 1, 3 and 7 (the GEMV's
    row chunks, 16 rows each, and cuBLAS' sizes are crossed at 7 with graph buckets 8 and 16)."""
    path = dense_src if which == "src" else dense_fp8.out
    L = Loaded(load_model(path, "cuda"), load_processor(path, True), True, path)
    reqs = _requests(L)
    alone = _run(L, reqs, [], max_batch=1)
    assert _run(L, reqs, [], max_batch=3) == alone
    twice = reqs + [Request(r.inputs, r.tag + "+") for r in reqs]      # 28 at once: GEMV row chunks
    both = _run(L, twice, [], max_batch=len(twice), prefill_batch=len(twice))
    assert both == {**alone, **{t + "+": a for t, a in alone.items()}}
    eng = Engine(L.model, [], EngineOptions(max_len=512, max_new_tokens=24, max_batch=1, batch_invariant=True))
    assert eng.invariant
    answers = [ids for _, ids in eng.generate(reqs[:7])]
    one = _step_logits(L, reqs[:7], answers, 1)
    for b in (3, 7):
        many = _step_logits(L, reqs[:7], answers, b)
        assert all(torch.equal(x, y) for x, y in zip(one, many)), b
