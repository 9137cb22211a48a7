"""fp8vl.runtime.prefill on the tiny real-architecture models: the restated prefill against Transformers'
forward of the very same weights (logits and the keys/values it caches), in float32 on the CPU,
and its fused FP8 path against the W8A8 simulation on a GPU (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fp8vl.runtime.engine import PREFILL_PAD, Engine, EngineOptions, round_up
from fp8vl.check.evaluate import kl_stats
from fp8vl.runtime.layers import _decoder_layers
from fp8vl.runtime.loader import Loaded, encode, load_model, load_processor
from fp8vl.runtime.prefill import decoder_inputs, dense_deepstack, run_layers
from fp8vl.apps.tiny import build_tiny
from helpers import pad_tokens

VLM = {"qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"}


def _image(seed: int, h: int = 64, w: int = 96) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, dense_src, moe_src):
    """Tiny BF16 checkpoints by architecture (Qwen3-VL ones from the session fixtures)."""
    root = tmp_path_factory.mktemp("prefill")
    out = {"qwen3_vl": dense_src, "qwen3_vl_moe": moe_src}
    for arch in ("qwen3", "llama", "qwen2_5_vl"):
        out[arch] = build_tiny(root / arch, arch)
    return out


def _loaded(path, vlm: bool, dtype=torch.float32, mode="w8a8", device="cpu") -> Loaded:
    return Loaded(load_model(path, device, mode, dtype), load_processor(path, vlm), vlm, path)


def _prompts(L: Loaded, image: bool) -> list[dict[str, torch.Tensor]]:
    """Two prompts of one length: same text, different pictures of one size (or one word changed)."""
    if image:
        return [encode(L, "Describe this image.", _image(s)) for s in (1, 2)]
    a = encode(L, "The quick brown fox jumps over the lazy dog.")
    ids = a["input_ids"].clone()
    ids[0, -6] = ids[0, -6] + 1
    return [a, dict(a, input_ids=ids)]


def _forward(model, inputs) -> tuple[torch.Tensor, object]:
    """Transformers' own forward: last-position logits [vocab] and its cache."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return out.logits[0, -1].float(), getattr(out, "cache", None) or out.past_key_values


@pytest.mark.parametrize("arch,image", [("qwen3_vl", True), ("qwen3_vl", False), ("qwen3_vl_moe", True),
                                        ("qwen3", False), ("llama", False), ("qwen2_5_vl", True)])
def test_prefill_equals_transformers_forward_logits_and_cache(arch, image, sources):
    """float32: two prompts prefilled together into slots 2 and 0 give each prompt's own forward
    logits (KL < 1e-6) and write exactly the keys/values Transformers caches."""
    L = _loaded(sources[arch], arch in VLM)
    eng = Engine(L.model, [], EngineOptions(max_len=128, max_batch=3))
    assert eng.restated or arch == "qwen2_5_vl"     # Qwen2.5-VL: restated where its rotary table is flat
    prompts = _prompts(L, image)
    got = eng._prefill([2, 0], prompts)
    for slot, inputs, (logits, n, delta) in zip([2, 0], prompts, got):
        ref, cache = _forward(L.model, inputs)
        assert n == inputs["input_ids"].shape[1]
        assert delta == (int(L.model.model.rope_deltas.flatten()[0]) if image else 0)
        st = kl_stats(ref[None], logits.float()[None])
        assert st["kl_max"] < 1e-6 and st["top1"] == 1.0, st
        for i in range(len(eng.layers)):
            torch.testing.assert_close(eng.k[i][slot, :, :n], cache.layers[i].keys[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(eng.v[i][slot, :, :n], cache.layers[i].values[0], rtol=1e-5, atol=1e-5)


def test_deepstack_features_reach_the_restated_layers(dense_src):
    """The image prompt's DeepStack features sit at its image positions, and leaving them out
    changes the hidden states: the equality above depends on them."""
    L = _loaded(dense_src, True)
    inputs = _prompts(L, True)[0]
    d = decoder_inputs(L.model, inputs)
    n_img = int((inputs["input_ids"] == L.model.config.image_token_id).sum())
    assert d.visual_mask is not None and int(d.visual_mask.sum()) == n_img > 0
    assert len(d.deepstack) == len(L.model.config.vision_config.deepstack_visual_indexes)
    ds = dense_deepstack(d)
    assert ds.shape == (len(d.deepstack), *d.embeds.shape)
    assert bool((ds[:, ~d.visual_mask] == 0).all()) and bool((ds[:, d.visual_mask] != 0).any())
    layers = _decoder_layers(L.model)
    rotary = L.model.model.language_model.rotary_emb
    cos, sin = rotary(d.embeds, d.position_ids)
    caches = [torch.zeros(1, 2, 64, 64) for _ in layers]
    slots = torch.tensor([0])
    with_ds = run_layers(layers, d.embeds, cos, sin, ds, caches, list(caches), slots)
    without = run_layers(layers, d.embeds, cos, sin, None, caches, list(caches), slots)
    assert (with_ds - without).abs().max() > 1e-2


def test_decoder_inputs_restores_the_language_model_when_the_forward_fails(dense_src):
    L = _loaded(dense_src, True)
    lm = L.model.model.language_model
    inputs = _prompts(L, True)[0]
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:, :7])      # wrong patch width
    with pytest.raises(Exception):
        decoder_inputs(L.model, bad)
    assert L.model.model.language_model is lm
    d = decoder_inputs(L.model, inputs)                                  # and it still works
    assert d.embeds.shape[:2] == inputs["input_ids"].shape and d.position_ids.shape[0] == 3


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_vl_moe"])
def test_padding_to_the_graph_length_keeps_real_positions(arch, sources):
    """run_layers over inputs zero-padded to n_pad (what the prefill graphs replay) gives the
    unpadded hidden states and cache entries at the real positions (to float32 rounding: the CPU's
    GEMM and attention block differently at another length)."""
    L = _loaded(sources[arch], True)
    d = decoder_inputs(L.model, _prompts(L, True)[0])
    layers = _decoder_layers(L.model)
    cos, sin = L.model.model.language_model.rotary_emb(d.embeds, d.position_ids)
    ds = dense_deepstack(d)
    n = d.embeds.shape[1]
    n_pad = round_up(n, PREFILL_PAD)
    assert n_pad > n

    def run(x, c, s, dd):
        k = [torch.zeros(1, 2, n_pad, 64) for _ in layers]
        v = [torch.zeros(1, 2, n_pad, 64) for _ in layers]
        return run_layers(layers, x, c, s, dd, k, v, torch.tensor([0])), k, v

    x0, k0, v0 = run(d.embeds, cos, sin, ds)
    x1, k1, v1 = run(pad_tokens(d.embeds, n_pad), pad_tokens(cos, n_pad), pad_tokens(sin, n_pad),
                     pad_tokens(ds, n_pad, 2))
    assert x1.shape[1] == n_pad
    torch.testing.assert_close(x1[:, :n], x0, rtol=1e-5, atol=1e-5)
    for a, b in zip(k0 + v0, k1 + v1):
        torch.testing.assert_close(b[:, :, :n], a[:, :, :n], rtol=1e-5, atol=1e-5)


def test_fp8_restated_prefill_matches_transformers_forward_with_the_same_fp8_linears(dense_fp8):
    """W8A8 simulation, float32 activations: restated prefill against Transformers' forward with
    the same FP8Linear modules (activation quantization may move a value on an e4m3 rounding
    boundary by one step, hence the decode tests' bound)."""
    L = _loaded(dense_fp8.out, True)
    eng = Engine(L.model, [], EngineOptions(max_len=128, max_batch=2))
    assert eng.restated and eng.fused is None
    for inputs in _prompts(L, True) + _prompts(L, False)[:1]:
        logits = eng._prefill([1], [inputs])[0][0]
        ref, cache = _forward(L.model, inputs)
        st = kl_stats(ref[None], logits.float()[None])
        assert st["kl_mean"] < 1e-3 and st["top1"] == 1.0, st
        n = inputs["input_ids"].shape[1]
        err = max(float((eng.k[i][1, :, :n] - cache.layers[i].keys[0]).norm() / cache.layers[i].keys[0].norm())
                  for i in range(len(eng.layers)))
        assert err < 1e-3, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_fp8_prefill_is_close_to_the_w8a8_simulation(dense_src, dense_fp8):
    """The fused FP8 path (activation quantization inside RMSNorm, SiLU-and-mul and the residual
    add; real FP8 GEMMs) against the same layers with every FP8Linear in the W8A8 simulation:
    closer than half of FP8's own drift from the BF16 source. (Not top-1 for top-1: the tiny random
    model has near-ties, and a one-ulp difference in a float32 sum can flip an activation's FP8 code;
    on the H200 one of the two prompts' top-1 flips between BF16 and the simulation too.)"""
    from fp8vl.runtime.fp8_modules import FP8Linear

    fp8 = _loaded(dense_fp8.out, True, torch.bfloat16, "auto", "cuda")
    src = _loaded(dense_src, True, torch.bfloat16, "auto", "cuda")
    fast = Engine(fp8.model, [], EngineOptions(max_len=128, max_batch=2, prefill_graphs=False))
    assert fast.fused is not None
    ref_eng = Engine(src.model, [], EngineOptions(max_len=128, max_batch=2, prefill_graphs=False))
    prompts = _prompts(fp8, True)
    got = [lg.float().cpu() for lg, _, _ in fast._prefill([0, 1], prompts)]
    bf16 = [lg.float().cpu() for lg, _, _ in ref_eng._prefill([0, 1], prompts)]
    k_fast = [k[:2].clone() for k in fast.k]
    mods = [m for m in fp8.model.modules() if isinstance(m, FP8Linear)]
    modes = [m.mode for m in mods]
    for m in mods:
        m.mode = "w8a8"
    try:
        sim_eng = Engine(fp8.model, [], EngineOptions(max_len=128, max_batch=2, prefill_graphs=False))
        assert sim_eng.fused is None
        sim = [lg.float().cpu() for lg, _, _ in sim_eng._prefill([0, 1], prompts)]
    finally:
        for m, mode in zip(mods, modes):
            m.mode = mode
    st = kl_stats(torch.stack(sim), torch.stack(got))
    drift = kl_stats(torch.stack(bf16), torch.stack(sim))
    assert st["kl_mean"] < 0.5 * drift["kl_mean"], (st, drift)
    # the keys each layer cached: closer to the simulation's than BF16's are (H200: 0.046 against
    # 0.091 at the worst layer; errors compound through the tiny random model's layers)
    n = prompts[0]["input_ids"].shape[1]

    def rel(a, b):
        return float((a[:2, :, :n].float() - b[:2, :, :n].float()).norm() / b[:2, :, :n].float().norm())

    for layer, (a, b, c) in enumerate(zip(k_fast, sim_eng.k, ref_eng.k)):
        assert rel(a, b) < rel(c, b), (layer, rel(a, b), rel(c, b))
