"""What fp8vl writes or says for the engines (compat.py), on real tiny checkpoints saved by Transformers 5.
Whether the engines then load them is tests/check/test_vllm_check.py and tests/check/test_sglang_check.py."""

from __future__ import annotations

import json

import pytest

from fp8vl import QuantizeOptions, quantize
from fp8vl.checkpoint.compat import checkpoint_findings, config_fields, layout_warnings, with_fields
from fp8vl.checkpoint.plan import make_plan
from fp8vl.apps.tiny import build_tiny
from fp8vl.check.verify import verify
from helpers import read_config, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    return {arch: build_tiny(root / arch, arch) for arch in ("gemma3", "llama", "qwen2_5_vl")}


def shapes_of(folder):
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({n: tuple(s.get_slice(n).get_shape()) for n in s.keys()})
    return out


def test_transformers_5_saves_qwen3_vl_moe_without_norm_topk_prob_and_fp8vl_adds_it(moe_fp8):
    src, out = read_config(moe_fp8.src), read_config(moe_fp8.out)
    assert "norm_topk_prob" not in src["text_config"]           # what Transformers 5 writes
    assert out["text_config"]["norm_topk_prob"] is True
    assert moe_fp8.result.plan.config_fields == {"text_config.norm_topk_prob": True}
    # everything else in text_config is the source's
    assert {k: v for k, v in out["text_config"].items() if k != "norm_topk_prob"} == src["text_config"]
    card = (moe_fp8.out / "README.md").read_text()
    assert "text_config.norm_topk_prob = true added" in card


def test_config_fields_only_where_missing_and_only_for_qwen3_vl_moe(dense_fp8, moe_src):
    assert config_fields(read_config(dense_fp8.src)) == {}
    cfg = read_config(moe_src)
    assert config_fields(with_fields(cfg, {"text_config.norm_topk_prob": False})) == {}   # a stated value wins
    assert with_fields(cfg, {"text_config.norm_topk_prob": True})["vision_config"] == cfg["vision_config"]


def test_quantize_summary_and_dry_run_say_which_field_is_added(moe_src, tmp_path):
    done = run_cli("quantize", moe_src, "--dry-run")
    assert done.returncode == 0 and "text_config.norm_topk_prob = true added" in done.stdout
    assert "vLLM 0.33 rules" in done.stdout
    done = run_cli("quantize", moe_src, tmp_path / "out")
    assert done.returncode == 0 and "text_config.norm_topk_prob = true added" in done.stdout


def test_verify_flags_a_moe_output_without_the_field(moe_fp8, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(moe_fp8.out, bare)
    cfg = read_config(bare)
    del cfg["text_config"]["norm_topk_prob"]
    (bare / "config.json").write_text(json.dumps(cfg))
    r = verify(bare)
    assert not r.ok
    assert [c for c in r.checks if c.name == "engines" and c.level == "error" and "norm_topk_prob" in c.message]
    assert verify(moe_fp8.out).ok


def test_qwen2_5_vl_lists_the_vision_attention_parents_for_sglang(tiny, dense_src):
    plan = make_plan(read_config(tiny["qwen2_5_vl"]), shapes_of(tiny["qwen2_5_vl"]), QuantizeOptions())
    qkv = [m for m in plan.not_converted if m.endswith(".attn.qkv")]
    assert qkv and all(m.removesuffix(".qkv") in plan.not_converted for m in qkv)
    # Qwen3-VL: SGLang builds its vision tower unquantized; the list stays the kept modules
    dense = make_plan(read_config(dense_src), shapes_of(dense_src), QuantizeOptions())
    assert not [m for m in dense.not_converted if m.endswith(".attn")]


def test_gemma3_saved_by_transformers_5_gets_the_vllm_layout_warning(tiny):
    cfg, names = read_config(tiny["gemma3"]), list(shapes_of(tiny["gemma3"]))
    assert not [n for n in names if ".vision_model." in n]       # Transformers 5's layout
    warnings = layout_warnings(cfg, names, "fp8")
    assert len(warnings) == 1 and "vision_tower.vision_model.*" in warnings[0] and "vLLM" in warnings[0]
    assert ("warning", warnings[0]) in checkpoint_findings(cfg, names, "compressed-tensors")
    # Google's release layout names vision_model: no warning
    assert not layout_warnings(cfg, [n.replace("vision_tower.", "vision_tower.vision_model.") for n in names], "fp8")


def test_llama_fp8_layout_warns_for_sglang_and_names_compressed_tensors(tiny, tmp_path):
    cfg, names = read_config(tiny["llama"]), list(shapes_of(tiny["llama"]))
    (w,) = layout_warnings(cfg, names, "fp8")
    assert "SGLang" in w and "--format compressed-tensors" in w
    assert not layout_warnings(cfg, names, "compressed-tensors")
    res = quantize(tiny["llama"], tmp_path / "llama-fp8", QuantizeOptions(workers=2))
    assert w in res.plan.warnings and w in (tmp_path / "llama-fp8" / "README.md").read_text()
    assert [c for c in verify(tmp_path / "llama-fp8").checks if c.level == "warning" and c.message == w]
