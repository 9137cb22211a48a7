"""fp8vl.runtime.fp8_modules: FP8Linear's simulated modes against plain float32 math, and load_fp8_model.

The reference numerics come from helpers (tile-by-tile weight quantization/dequantization,
token-by-token activation quantization), not from fp8vl.kernels.numerics.
"""

from __future__ import annotations

import re

import pytest
import torch

from fp8vl.errors import FP8VLError
from fp8vl.runtime.loader import load_fp8_model
from fp8vl.runtime.fp8_modules import FP8Experts, FP8Linear, fp8_mode, fp8_modules, resolve_mode
from helpers import (FP8, TILE, expand_scales, expert_slices, load_tensors, read_config, ref_activation_quantize,
                     ref_block_quantize, ref_dequantize, text_config, within_e4m3_bound)

EXPERT = re.compile(r"^(?P<base>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[torch.rand(n, k, generator=g) < 2e-3] *= 10       # outliers: tiles with different scales
    w[:, :TILE][: min(n, TILE)] *= 0.01                   # one tile much smaller than the rest
    return w


def fake_quant_ref(x: torch.Tensor) -> torch.Tensor:
    """Per token and per 128 channels: quantize, then dequantize, in float32."""
    q, s = ref_activation_quantize(x)
    return q.to(torch.float32) * s.repeat_interleave(TILE, -1)


SHAPES = [  # (leading dims of x, N out, K in, bias, scale dtype)
    ((5,), 128, 128, False, torch.float32),
    ((3, 4), 200, 256, True, torch.float32),     # partial tile in N
    ((2, 1, 3), 384, 384, True, torch.bfloat16),  # Qwen's bf16 scales
    ((7,), 130, 512, False, torch.bfloat16),
]


@pytest.mark.parametrize("lead,n,k,bias,scale_dtype", SHAPES)
def test_w8a8_equals_an_independent_float32_computation(lead, n, k, bias, scale_dtype):
    seed = n * 1000 + k
    q, s = ref_block_quantize(random_weight(n, k, seed), scale_dtype)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(*lead, k, generator=g) * 3
    x[..., :TILE] *= 0.05                                 # groups with different scales
    layer = FP8Linear(q, s, b, mode="w8a8")
    with torch.no_grad():
        y = layer(x)
    ref = fake_quant_ref(x) @ ref_dequantize(q, s).t() + (b if b is not None else 0)
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the activation quantization is really there: without it the result differs
    unquantized = x @ ref_dequantize(q, s).t() + (b if b is not None else 0)
    assert float((y - unquantized).abs().max()) > 1e-3 * float(ref.abs().max())
    # bf16 input: the same computation, rounded to bf16 at the end
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        yb = layer(xb)
    refb = fake_quant_ref(xb.float()) @ ref_dequantize(q, s).t() + (b if b is not None else 0)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), refb, rtol=2**-7, atol=1e-5 * float(refb.abs().max()))


@pytest.mark.parametrize("lead,n,k,bias", [((4,), 130, 200, True), ((2, 3), 256, 128, False)])
def test_dequant_mode_is_x_times_the_dequantized_weight(lead, n, k, bias):
    """Weight-only: any K, partial tiles in both dimensions."""
    q, s = ref_block_quantize(random_weight(n, k, n + k))
    g = torch.Generator().manual_seed(7)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(*lead, k, generator=g)
    with torch.no_grad():
        y = FP8Linear(q, s, b, mode="dequant")(x)
    ref = x @ ref_dequantize(q, s).t() + (b if b is not None else 0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_w8a8_refuses_an_input_width_that_is_not_a_multiple_of_128():
    q, s = ref_block_quantize(random_weight(128, 200, 3))
    with pytest.raises(ValueError, match="200"):
        FP8Linear(q, s, mode="w8a8")(torch.randn(2, 200))


def test_fp8linear_needs_an_fp8_weight():
    with pytest.raises(ValueError, match="e4m3"):
        FP8Linear(torch.randn(128, 128), torch.ones(1, 1))


def test_modes_on_cpu():
    assert resolve_mode("auto", "cpu") == "w8a8"
    assert resolve_mode("dequant", "cpu") == "dequant"
    with pytest.raises(FP8VLError, match="compute capability"):
        resolve_mode("scaled_mm", "cpu")
    with pytest.raises(FP8VLError, match="unknown runtime mode"):
        resolve_mode("int8", "cpu")


# ---------------------------------------------------------------- load_fp8_model

@pytest.mark.parametrize("layout", ["fp8vl", "compressed-tensors", "qwen bf16 scales"])
def test_load_fp8_model_swaps_in_every_fp8_weight_with_its_own_bytes(dense_fp8, tmp_path, layout):
    from fp8vl import QuantizeOptions, quantize

    out = dense_fp8.out
    if layout != "fp8vl":
        out = tmp_path / "out"
        opts = QuantizeOptions(format="compressed-tensors", workers=1) if layout == "compressed-tensors" else \
            QuantizeOptions(scale_dtype="bfloat16", workers=1)
        quantize(dense_fp8.src, out, opts)
    model = load_fp8_model(out, "cpu", "w8a8")
    assert fp8_mode(model) == "w8a8"
    ckpt, src = load_tensors(out), load_tensors(dense_fp8.src)
    fp8_names = {n.removesuffix(".weight") for n, t in ckpt.items() if t.dtype == FP8}
    mods = fp8_modules(model)
    assert set(mods) == fp8_names and len(mods) > 0
    suffix = "weight_scale" if layout == "compressed-tensors" else "weight_scale_inv"
    for name, m in mods.items():
        assert m.mode == "w8a8"
        assert torch.equal(m.weight.view(torch.uint8), ckpt[name + ".weight"].view(torch.uint8))
        stored = ckpt[f"{name}.{suffix}"]
        assert stored.dtype == (torch.float32 if layout == "fp8vl" else torch.bfloat16)
        assert torch.equal(m.weight_scale_inv, stored.float())
    # what stays BF16 is the source's, untouched
    params = dict(model.named_parameters())
    for name in ("lm_head.weight", "model.visual.blocks.0.attn.qkv.weight", "model.language_model.norm.weight"):
        assert torch.equal(params[name], src[name])


def expert_weights(ex, e, hidden, inter):
    """(gate, up, down) [out, in] of expert e as the loaded module computes with them: FP8Experts'
    own FP8 linears (q * scale), or slices of older fused parameters."""
    if isinstance(ex, FP8Experts):
        return tuple(ref_dequantize(m.weight, m.weight_scale_inv)
                     for m in (ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e]))
    return expert_slices(ex.gate_up_proj.data, ex.down_proj.data, hidden, inter, e)


def n_experts(ex):
    return len(ex.gate_proj) if isinstance(ex, FP8Experts) else ex.gate_up_proj.shape[0]


def test_load_fp8_model_fills_the_fused_moe_experts_with_the_dequantized_weights(moe_fp8):
    """Transformers' Qwen3-VL-MoE holds experts fused and 3-D; the checkpoint stores them per expert
    (Qwen's FP8 layout). load_fp8_model must compute every expert with its own q * scale: as FP8
    linears in place of the fused module (Transformers 5), or written into the fused tensors."""
    model = load_fp8_model(moe_fp8.out, "cpu", "dequant")
    ckpt, src = load_tensors(moe_fp8.out), load_tensors(moe_fp8.src)
    tc = text_config(read_config(moe_fp8.src))
    hidden, inter = tc["hidden_size"], tc["moe_intermediate_size"]
    bases = sorted({EXPERT.match(n)["base"] for n in ckpt if EXPERT.match(n)})
    assert len(bases) == tc["num_hidden_layers"]
    for base in bases:
        ex = model.get_submodule(base)
        n_exp = src[base + ".gate_up_proj"].shape[0]
        assert n_exp == n_experts(ex) > 1
        for e in range(n_exp):
            got = dict(zip(("gate_proj", "up_proj", "down_proj"), expert_weights(ex, e, hidden, inter)))
            want_src = dict(zip(("gate_proj", "up_proj", "down_proj"),
                                expert_slices(src[base + ".gate_up_proj"], src[base + ".down_proj"], hidden, inter, e)))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                q, s = ckpt[f"{base}.{e}.{proj}.weight"], ckpt[f"{base}.{e}.{proj}.weight_scale_inv"]
                dq = ref_dequantize(q, s)
                assert torch.equal(got[proj], dq.to(got[proj].dtype)), (base, e, proj)
                # and q * s is the source within e4m3's rounding bound, element by element
                assert within_e4m3_bound(want_src[proj], q, s).all(), (base, e, proj)
                w = want_src[proj].float()
                slack = got[proj].float().abs() * 2.0**-8          # the bf16 rounding of q * s
                bound = torch.maximum(w.abs() * 2.0**-4, expand_scales(s, tuple(w.shape)) * 2.0**-10)
                assert ((got[proj].float() - w).abs() <= bound * (1 + 1e-6) + slack).all()


def test_transformers_own_load_of_the_fp8_moe_leaves_the_experts_random(moe_fp8):
    """Why load_fp8_model fills the experts itself: Transformers (5.x) has no mapping from the per-expert
    FP8 names (``experts.{e}.gate_proj.weight`` + scale, Qwen's released layout, what vLLM loads) to its
    fused 3-D parameters. It reports the per-expert tensors as unexpected, the fused parameters as missing,
    and initializes those at random: a model that loads without error but computes garbage."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(moe_fp8.out, dtype=torch.bfloat16, device_map="cpu",
                                                              output_loading_info=True)
    src = load_tensors(moe_fp8.src)
    fused = {n for n in src if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert fused and fused <= set(info["missing_keys"])
    ours = load_fp8_model(moe_fp8.out, "cpu", "dequant")
    theirs = {n: p.detach() for n, p in model.named_parameters()}
    tc = text_config(read_config(moe_fp8.src))
    hidden, inter = tc["hidden_size"], tc["moe_intermediate_size"]
    for name in fused:
        w = src[name].float()
        base = name.rsplit(".", 1)[0]
        ex = ours.get_submodule(base)
        parts = [expert_weights(ex, e, hidden, inter) for e in range(n_experts(ex))]
        if name.endswith("gate_up_proj"):   # back to the source's own fused layout
            mine = torch.stack([torch.cat([g, u], 0) for g, u, _ in parts])
        else:
            mine = torch.stack([d for _, _, d in parts])
        if mine.shape != w.shape:
            mine = mine.transpose(1, 2)
        rel_theirs = float((theirs[name].float() - w).norm() / w.norm())
        rel_ours = float((mine.float() - w).norm() / w.norm())
        assert rel_ours < 0.05, (name, rel_ours)
        assert rel_theirs > 0.5, (name, rel_theirs)
    # the attention linears, which Transformers does map, agree between both loads
    name = "model.language_model.layers.0.self_attn.q_proj"
    ckpt = load_tensors(moe_fp8.out)
    dq = ref_dequantize(ckpt[name + ".weight"], ckpt[name + ".weight_scale_inv"]).to(torch.bfloat16)
    assert torch.equal(theirs[name + ".weight"], dq)


def test_w8a8_moe_experts_quantize_both_gemm_inputs(moe_fp8):
    model = load_fp8_model(moe_fp8.out, "cpu", "w8a8", dtype=torch.float32)
    ckpt = load_tensors(moe_fp8.out)
    tc = text_config(read_config(moe_fp8.src))
    base = "model.language_model.layers.0.mlp.experts"
    ex = model.get_submodule(base)
    n_exp, top_k, hidden = n_experts(ex), tc["num_experts_per_tok"], tc["hidden_size"]
    g = torch.Generator().manual_seed(0)
    tokens = 12
    x = torch.randn(tokens, hidden, generator=g)
    idx = torch.stack([torch.randperm(n_exp, generator=g)[:top_k] for _ in range(tokens)])
    wts = torch.rand(tokens, top_k, generator=g)
    wts = wts / wts.sum(1, keepdim=True)
    with torch.no_grad():
        y = ex(x, idx, wts)

    def dq(e, proj):
        return ref_dequantize(ckpt[f"{base}.{e}.{proj}.weight"], ckpt[f"{base}.{e}.{proj}.weight_scale_inv"])
    ref = torch.zeros(tokens, hidden)
    for t in range(tokens):
        xq = fake_quant_ref(x[t:t + 1])
        for j in range(top_k):
            e = int(idx[t, j])
            h = torch.nn.functional.silu(xq @ dq(e, "gate_proj").t()) * (xq @ dq(e, "up_proj").t())
            ref[t] += wts[t, j] * (fake_quant_ref(h) @ dq(e, "down_proj").t())[0]
    assert float((y - ref).norm() / ref.norm()) < 1e-5
