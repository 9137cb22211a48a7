"""--format compressed-tensors (FP8_BLOCK) judged by the real ``compressed_tensors`` package and Transformers."""

from __future__ import annotations

import pytest
import torch

from fp8vl import QuantizeOptions, quantize
from fp8vl.checkpoint.formats import quantization_config, scale_suffix
from helpers import (FP8, TILE, astronaut, expand_scales, language_linears, load_tensors, read_config,
                     same_bytes)

# Mean next-token KL (nats) of Transformers + compressed-tensors vs the BF16 source, image+text prompt.
# Measured 0.061 (max 0.22, top-1 0.80 over 39 positions): compressed-tensors runs the linears W8A8
# (activations fake-quantized per 128 channels, in bf16) and the tiny model's logits are peaked.
CT_KL_BOUND = 0.12
PROMPT = "Describe this image concisely."
QUANT_FIELDS = ("num_bits", "type", "symmetric", "strategy", "block_structure", "dynamic", "group_size")


@pytest.fixture(scope="module")
def ct_dense(tmp_path_factory, dense_src):
    out = tmp_path_factory.mktemp("ct") / "dense-ct"
    quantize(dense_src, out, QuantizeOptions(format="compressed-tensors"))
    return out


# ---------------------------------------------------------------- (a) the config

def test_compressed_tensors_parses_the_config_as_fp8_block(ct_dense):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    raw = read_config(ct_dense)["quantization_config"]
    qc = QuantizationConfig.model_validate(raw)
    assert qc.quant_method == "compressed-tensors" and qc.format == "float-quantized"
    assert qc.quantization_status == QuantizationStatus.COMPRESSED
    assert list(qc.config_groups) == ["group_0"]
    group = qc.config_groups["group_0"]
    preset = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    assert group.targets == preset.targets == ["Linear"]
    assert group.output_activations is None and preset.output_activations is None
    for ours, theirs in ((group.weights, preset.weights), (group.input_activations, preset.input_activations)):
        for f in QUANT_FIELDS:
            assert getattr(ours, f) == getattr(theirs, f), f
    assert group.weights.block_structure == [TILE, TILE] and group.input_activations.group_size == TILE
    assert qc.kv_cache_scheme is None


def test_compressed_tensors_parses_the_config_from_the_dict_too(ct_dense):
    from compressed_tensors.quantization import QuantizationConfig

    raw = read_config(ct_dense)["quantization_config"]
    a, b = QuantizationConfig.model_validate(raw), QuantizationConfig(**raw)
    assert a == b and a.ignore == raw["ignore"]


# ---------------------------------------------------------------- (c) the bytes

def test_fp8_bytes_equal_compressed_tensors_quantize_for_the_same_weight_and_scale(ct_dense, dense_src):
    """compressed_tensors' own quantize(x, scale, zero_point, args) on the source weight and the stored
    scale (both given in float32: the division then rounds once, as the format prescribes)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    args = preset_name_to_scheme("FP8_BLOCK", ["Linear"]).weights
    src, out = load_tensors(dense_src), load_tensors(ct_dense)
    names = language_linears(read_config(dense_src))
    assert len(names) == 14
    for name in names:
        scale = out[name.replace(".weight", ".weight_scale")]
        q = ct_quantize(src[name].float(), scale.float(), None, args, dtype=FP8)
        assert same_bytes(out[name], q), name


def test_scales_equal_compressed_tensors_qparams_of_each_tile(ct_dense, dense_src):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = preset_name_to_scheme("FP8_BLOCK", ["Linear"]).weights
    src, out = load_tensors(dense_src), load_tensors(ct_dense)
    for name in language_linears(read_config(dense_src)):
        w = src[name].float()
        n, k = w.shape
        tiles = w.reshape(n // TILE, TILE, k // TILE, TILE)
        scale, zp = calculate_qparams(tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3)), args)
        stored = out[name.replace(".weight", ".weight_scale")]
        assert same_bytes(stored, scale.to(torch.bfloat16)), name
        assert not zp.any()


def test_compressed_tensors_dequantize_gives_codes_times_scale(ct_dense):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    args = preset_name_to_scheme("FP8_BLOCK", ["Linear"]).weights
    out = load_tensors(ct_dense)
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    q, s = out[name], out[name.replace(".weight", ".weight_scale")]
    got = ct_dequantize(q, s.float(), None, args, dtype=torch.float32)
    assert torch.equal(got, q.float() * expand_scales(s, tuple(q.shape)))


# ---------------------------------------------------------------- (d) names and dtypes

def test_ignore_lists_full_module_names_of_everything_kept(ct_dense, dense_src):
    ignore = read_config(ct_dense)["quantization_config"]["ignore"]
    assert len(ignore) == len(set(ignore))
    src = load_tensors(dense_src)
    linears = language_linears(read_config(dense_src))
    kept = {n.removesuffix(".weight") for n, t in src.items() if t.ndim >= 2 and n.endswith(".weight")} \
        - {n.removesuffix(".weight") for n in linears}
    assert set(ignore) == kept | {"lm_head"}
    assert "lm_head" in ignore and "model.language_model.embed_tokens" in ignore
    vision = {m for m in kept if m.startswith("model.visual.")}
    assert {"model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.mlp.linear_fc2", "model.visual.merger.linear_fc1",
            "model.visual.deepstack_merger_list.0.linear_fc2", "model.visual.patch_embed.proj"} <= vision
    assert not any(p.startswith("re:") for p in ignore)


def test_scales_are_named_weight_scale_in_bf16_by_default(ct_dense, dense_src):
    out = load_tensors(ct_dense)
    assert scale_suffix("compressed-tensors") == "weight_scale"
    linears = language_linears(read_config(dense_src))
    scales = {n for n in out if n.endswith("_scale") or n.endswith("_scale_inv")}
    assert scales == {n.replace(".weight", ".weight_scale") for n in linears}
    for name in linears:
        assert out[name].dtype == FP8
        s = out[name.replace(".weight", ".weight_scale")]
        assert s.dtype == torch.bfloat16 and tuple(s.shape) == (out[name].shape[0] // TILE, out[name].shape[1] // TILE)


def test_scale_dtype_float32_is_honoured(dense_src, tmp_path):
    out = tmp_path / "ct32"
    quantize(dense_src, out, QuantizeOptions(format="compressed-tensors", scale_dtype="float32"))
    t = load_tensors(out)
    scales = [v for n, v in t.items() if n.endswith(".weight_scale")]
    assert len(scales) == 14 and all(s.dtype == torch.float32 for s in scales)


def test_fp8_format_config_lists_the_same_modules_under_both_keys():
    qc = quantization_config("fp8", ["lm_head", "model.visual.blocks.0.attn.qkv"])
    assert qc["modules_to_not_convert"] == qc["ignored_layers"] == ["lm_head", "model.visual.blocks.0.attn.qkv"]
    assert qc["weight_block_size"] == [TILE, TILE] and qc["quant_method"] == "fp8"
    assert scale_suffix("fp8") == "weight_scale_inv"


# ---------------------------------------------------------------- (b) Transformers loads it

@pytest.fixture(scope="module")
def ct_loaded(ct_dense, hf_models):
    """(source, compressed-tensors output) loaded by Transformers, and their next-token comparison."""
    from fp8vl.check.evaluate import compare_models
    from fp8vl.runtime.loader import load_hf_model

    src, q = hf_models("dense", "src"), load_hf_model(ct_dense)
    return src, q, compare_models(src, q, PROMPT, astronaut())


def test_transformers_loads_it_and_next_token_kl_to_source_is_small(ct_loaded):
    _, _, m = ct_loaded
    print(f"compressed-tensors: KL mean {m['kl_mean']:.4f} max {m['kl_max']:.4f} top-1 {m['top1']:.3f} "
          f"over {m['tokens']}")
    assert m["tokens"] > 16
    assert 1e-4 < m["kl_mean"] < CT_KL_BOUND
    assert m["top1"] >= 0.7


def test_compressed_tensors_applies_the_scheme_to_exactly_the_language_linears(ct_loaded, dense_src):
    _, q, _ = ct_loaded
    schemed = {n for n, mod in q.model.named_modules() if getattr(mod, "quantization_scheme", None) is not None}
    assert schemed == {n.removesuffix(".weight") for n in language_linears(read_config(dense_src))}


def test_transformers_weights_are_codes_times_scale_and_vision_is_the_source(ct_loaded, ct_dense):
    src, q, _ = ct_loaded
    out = load_tensors(ct_dense)
    params = dict(q.model.named_parameters())
    fp8 = [n for n, t in out.items() if t.dtype == FP8]
    assert len(fp8) == 14
    for name in fp8:
        s = out[name.replace(".weight", ".weight_scale")]
        expect = (out[name].float() * expand_scales(s, tuple(out[name].shape))).to(torch.bfloat16)
        assert torch.equal(params[name].detach(), expect), name
    vis_src = dict(src.model.model.visual.named_parameters())
    vis_q = dict(q.model.model.visual.named_parameters())
    assert len(vis_src) > 40 and set(vis_q) == set(vis_src)
    assert all(same_bytes(vis_q[n].detach(), p.detach()) for n, p in vis_src.items())


# ---------------------------------------------------------------- one home for the scale names

def test_formats_py_is_the_only_module_that_spells_a_scale_name():
    """Code outside checkpoint/formats.py takes the scale tensor names from it (SCALE_SUFFIXES,
    scale_suffix); docstrings and comments may name them. The one exception is FP8Linear's buffer, a
    module attribute the runtime reads as ``m.weight_scale_inv``, not a name looked up in a checkpoint."""
    import ast
    from pathlib import Path

    import fp8vl
    from fp8vl.checkpoint.formats import SCALE_SUFFIXES

    root = Path(fp8vl.__file__).parent
    allowed = {("runtime/fp8_modules.py", "weight_scale_inv")}
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "checkpoint/formats.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and any(s in node.value for s in SCALE_SUFFIXES) and (rel, node.value) not in allowed:
                found.append(f"{rel}:{node.lineno}: {node.value[:60]!r}")
    assert found == []
    assert SCALE_SUFFIXES == (scale_suffix("fp8"), scale_suffix("compressed-tensors"))
