"""fp8vl.checkpoint.plan on the headers of the tiny dense, tied and MoE Qwen3-VL checkpoints."""

from __future__ import annotations

import pytest

from fp8vl import QuantizeOptions
from fp8vl.errors import FP8VLError
from fp8vl.checkpoint.plan import make_plan
from fp8vl.checkpoint.shards import read_header
from helpers import language_linears, read_config, text_config


def header_of(src):
    infos, _ = read_header(src / "model.safetensors")
    return read_config(src), {n: t.shape for n, t in sorted(infos.items(), key=lambda kv: kv[1].offset)}


@pytest.fixture(scope="module")
def headers(dense_src, tied_src, moe_src):
    return {"dense": header_of(dense_src), "tied": header_of(tied_src), "moe": header_of(moe_src)}


def plan_for(headers, kind, **opts):
    cfg, shapes = headers[kind]
    return make_plan(cfg, shapes, QuantizeOptions(**opts))


def quantized(plan):
    return {e.name for e in plan.entries if e.quantize}


def kept(plan):
    return {e.name for e in plan.entries if not e.quantize}


@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_exactly_the_language_model_linears_are_quantized(headers, kind):
    plan = plan_for(headers, kind)
    assert quantized(plan) == language_linears(headers[kind][0])


@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
def test_every_vision_tensor_is_kept(headers, kind):
    plan = plan_for(headers, kind)
    vision = {n for n in headers[kind][1] if n.startswith("model.visual.")}
    assert len(vision) > 40 and vision <= kept(plan)


@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
def test_head_embeddings_norms_and_biases_are_kept(headers, kind):
    plan = plan_for(headers, kind)
    names = headers[kind][1]
    must_keep = {n for n in names if "norm" in n or n.endswith(".bias") or "embed_tokens" in n or
                 n.startswith("lm_head")}
    assert "model.language_model.embed_tokens.weight" in must_keep
    assert ("lm_head.weight" in must_keep) == (kind != "tied")
    assert must_keep <= kept(plan)


def test_every_source_tensor_of_dense_is_planned_once(headers):
    plan = plan_for(headers, "dense")
    assert sorted(e.name for e in plan.entries) == sorted(headers["dense"][1])
    assert all(e.source == e.name for e in plan.entries)


def test_moe_routers_are_kept_and_listed(headers):
    plan = plan_for(headers, "moe")
    routers = {n for n in headers["moe"][1] if n.endswith(".mlp.gate.weight")}
    assert len(routers) == text_config(headers["moe"][0])["num_hidden_layers"]
    assert routers <= kept(plan)
    assert {r.removesuffix(".weight") for r in routers} <= set(plan.not_converted)


def test_moe_fused_experts_split_per_expert_with_out_in_shapes(headers):
    cfg, shapes = headers["moe"]
    tc = text_config(cfg)
    h, i = tc["hidden_size"], tc["moe_intermediate_size"]
    n_exp = shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"][0]
    plan = plan_for(headers, "moe")
    got = {e.name: e.shape for e in plan.entries if e.quantize and ".mlp.experts." in e.name}
    expect = {}
    for n in range(tc["num_hidden_layers"]):
        for e in range(n_exp):
            base = f"model.language_model.layers.{n}.mlp.experts.{e}"
            expect |= {f"{base}.gate_proj.weight": (i, h), f"{base}.up_proj.weight": (i, h),
                       f"{base}.down_proj.weight": (h, i)}
    assert got == expect
    # nothing else in the language model is quantized but attention projections
    assert quantized(plan) - set(expect) == language_linears(cfg, moe=True)
    assert not any(e.name.endswith(("experts.gate_up_proj", "experts.down_proj")) for e in plan.entries)


@pytest.mark.parametrize("pattern", ["*.layers.0.*", "re:layers\\.0\\.", "model.language_model.layers.0"],
                         ids=["glob", "regex", "prefix"])
def test_ignore_patterns_add_to_the_kept_set(headers, pattern):
    base = plan_for(headers, "dense")
    plan = plan_for(headers, "dense", ignore=(pattern,))
    layer0 = {n for n in language_linears(headers["dense"][0]) if ".layers.0." in n}
    assert layer0 and layer0 <= quantized(base)
    assert quantized(plan) == quantized(base) - layer0
    assert kept(plan) == kept(base) | layer0
    assert {n.removesuffix(".weight") for n in layer0} <= set(plan.not_converted)


def test_regex_ignore_keeps_only_what_it_matches(headers):
    plan = plan_for(headers, "dense", ignore=("re:o_proj$",))
    assert {n for n in kept(plan) if n.endswith("o_proj.weight")} == \
        {n for n in language_linears(headers["dense"][0]) if n.endswith("o_proj.weight")}
    assert quantized(plan) == {n for n in language_linears(headers["dense"][0]) if "o_proj" not in n}


@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
def test_modules_to_not_convert_lists_lm_head_and_every_kept_matrix_module(headers, kind):
    cfg, shapes = headers[kind]
    plan = plan_for(headers, kind)
    linears = language_linears(cfg, moe=kind == "moe")
    kept_matrices = {n.removesuffix(".weight") for n, s in shapes.items()
                     if n.endswith(".weight") and len(s) >= 2 and n not in linears}
    assert "model.visual.patch_embed.proj" in kept_matrices and "model.visual.blocks.0.attn.qkv" in kept_matrices
    assert set(plan.not_converted) == kept_matrices | {"lm_head"}
    assert len(plan.not_converted) == len(set(plan.not_converted))
    assert not set(plan.not_converted) & {e.name.removesuffix(".weight") for e in plan.entries if e.quantize}


def test_ignored_moe_experts_are_listed_in_modules_to_not_convert(headers):
    plan = plan_for(headers, "moe", ignore=("model.language_model.layers.0.mlp.experts",))
    assert "model.language_model.layers.0.mlp.experts.0.gate_proj.weight" not in quantized(plan)
    listed = set(plan.not_converted)
    assert "model.language_model.layers.0.mlp.experts" in listed or \
        {"model.language_model.layers.0.mlp.experts.gate_up_proj",
         "model.language_model.layers.0.mlp.experts.down_proj"} <= listed


def test_glob_over_per_expert_modules_keeps_the_experts(headers):
    plan = plan_for(headers, "moe", ignore=("*.mlp.experts.*",))
    assert not any(".mlp.experts." in n for n in quantized(plan))


def test_unknown_model_type_gives_a_warning_naming_it(headers):
    cfg, shapes = headers["dense"]
    plan = make_plan(dict(cfg, model_type="my_new_vlm"), shapes, QuantizeOptions())
    assert len(plan.warnings) == 1 and "my_new_vlm" in plan.warnings[0]
    assert quantized(plan) == language_linears(cfg)
    assert plan_for(headers, "dense").warnings == ()


def test_widths_not_multiple_of_128_are_kept_and_listed():
    """An input width K not a multiple of 128 (down_proj) and an output width N not one (up_proj: a
    partial last scale block, which Transformers and vLLM's merged layers refuse) stay BF16."""
    shapes = {"model.layers.0.mlp.down_proj.weight": (256, 300), "model.layers.0.mlp.up_proj.weight": (300, 256),
              "model.layers.0.mlp.gate_proj.weight": (384, 256)}
    plan = make_plan({"model_type": "qwen3"}, shapes, QuantizeOptions())
    assert quantized(plan) == {"model.layers.0.mlp.gate_proj.weight"}
    groups = {e.name: e.group for e in plan.entries}
    assert groups["model.layers.0.mlp.down_proj.weight"] == "k not multiple of 128"
    assert groups["model.layers.0.mlp.up_proj.weight"] == "n not multiple of 128"
    assert {"model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"} <= set(plan.not_converted)


def test_nothing_to_quantize_raises_fp8vl_error(headers):
    cfg, shapes = headers["dense"]
    with pytest.raises(FP8VLError, match="nothing to quantize"):
        make_plan(cfg, shapes, QuantizeOptions(ignore=("re:.",)))
