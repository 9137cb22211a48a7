"""vLLM's own loader (vLLM's venv, on the CPU) on tiny outputs of every architecture and both formats:
``fp8vl verify --vllm``. Run by ``make test-vllm``; skipped where vLLM is not installed."""

from __future__ import annotations

import json

import pytest

from engine_outputs import FORMATS, build_outputs, checks, edited_copy, engine_python
from fp8vl.apps.tiny import ARCHS
from fp8vl.checkpoint.tp import SIZES
from fp8vl.check.verify import verify
from helpers import run_cli

FOUND = engine_python("vllm")
pytestmark = pytest.mark.skipif(FOUND is None, reason="vLLM is not installed here: `make test-vllm` sets it up")
PY = (FOUND[0],) if FOUND else ()
# Measured with vLLM 0.33.0: every output loads as intended except Gemma 3, whose Transformers-5
# layout vLLM cannot load (vision_tower.* instead of vision_tower.vision_model.*).
REFUSED = {"gemma3"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return build_outputs(tmp_path_factory.mktemp("engine-outputs"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_builds_and_loads_every_output_as_intended(outputs, arch, fmt):
    r = verify(outputs[arch, fmt], engines=("vllm",), engine_python=PY, engine_tp=SIZES)
    found = checks(r, "vllm")
    assert found["ok"][0].message.startswith(f"vLLM {FOUND[1]} ran its own loader")
    if arch in REFUSED:
        assert any("vision_tower.embeddings" in c.message for c in found["error"]), found
        assert any("vision_tower.vision_model" in c.message for c in checks(r, "engines")["warning"])
        return
    assert not found["error"], found["error"]
    layers = [c for c in found["ok"] if c.name == "vllm layers"]
    assert layers and "FP8 layers built quantized" in layers[0].message and "used all" in layers[0].message
    # vLLM's measured TP sizes agree with fp8vl's TP report (a disagreement is a warning)
    assert not found["warning"], found["warning"]
    assert [c for c in found["ok"] if c.name == "vllm tp"]
    assert r.ok, [c for c in r.checks if c.level == "error"]


def test_tp_report_matches_vllm_on_the_tiny_moe(outputs):
    """Tiny MoE (2 KV heads of 64, 2 vision heads): fp8 fails at load at TP 2 (v_proj scales), at build
    at TP 4 (vision heads); compressed-tensors at build already at TP 2."""
    for fmt, phase in (("fp8", "load"), ("compressed-tensors", "build")):
        r = verify(outputs["qwen3_vl_moe", fmt], engines=("vllm",), engine_python=PY, engine_tp=(2, 4))
        assert r.tp["phase"][2] == phase and r.tp["phase"][4] == "build"
        tp = [c.message for c in checks(r, "vllm tp")["ok"]]
        assert tp and f"TP 2 fails at {phase}" in tp[0], tp
        assert not checks(r, "vllm tp")["warning"]
    assert "weight_scale_inv" in tp[0] or "v_proj" in tp[0] or phase == "build"


def test_cli_verify_vllm_passes_on_the_tiny_moe_and_names_the_version(outputs):
    done = run_cli("verify", outputs["qwen3_vl_moe", "fp8"], "--vllm", "--engine-python", PY[0], timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "PASSED" in done.stdout and f"vLLM {FOUND[1]}" in done.stdout
    done = run_cli("verify", outputs["qwen3_vl_moe", "fp8"], "--vllm", "--engine-python", PY[0], "--engine-tp", "",
                   "--json", "-", timeout=900)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"]
    assert any(c["message"].startswith(f"vLLM {FOUND[1]} ran its own loader") for c in report["checks"])


def test_short_ignore_list_fails_in_vllm_naming_the_vision_linears(outputs, tmp_path):
    def cut(cfg):
        cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head"]
        cfg["quantization_config"]["ignored_layers"] = ["lm_head"]
    short = edited_copy(outputs["qwen3_vl_moe", "fp8"], tmp_path / "short", cut)
    r = verify(short, engines=("vllm",), engine_python=PY, engine_tp=())
    layers = [c.message for c in checks(r, "vllm layers")["error"]]
    assert layers and "BF16 linear(s) land in layers vLLM builds as FP8" in layers[0]
    assert "visual.blocks.0.attn.qkv" in layers[0] and "visual.merger" in layers[0]
    unwritten = [c.message for c in checks(r, "vllm load")["error"]]
    assert unwritten and "weight_scale_inv" in unwritten[0] and "visual." in unwritten[0]
    done = run_cli("verify", short, "--vllm", "--engine-python", PY[0], "--engine-tp", "", "--json", "-",
                   timeout=900)
    assert done.returncode == 1
    assert any(c["name"] == "vllm layers" and c["level"] == "error" and "visual.blocks.0.attn.qkv" in c["message"]
               for c in json.loads(done.stdout)["checks"])


def test_moe_without_norm_topk_prob_fails_to_build_and_verify_says_what_to_add(outputs, tmp_path):
    bare = edited_copy(outputs["qwen3_vl_moe", "fp8"], tmp_path / "bare",
                       lambda cfg: cfg["text_config"].pop("norm_topk_prob"))
    r = verify(bare, engines=("vllm",), engine_python=PY, engine_tp=())
    assert any("norm_topk_prob" in c.message for c in checks(r, "vllm build")["error"])
    assert any("text_config.norm_topk_prob" in c.message for c in checks(r, "engines")["error"])


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory):
    """The tiny MoE with whole 128-wide KV heads and 4 vision heads, so that TP 2 and 4 reach the experts:
    384-wide experts are 192 and 96 per rank there, not multiples of 128."""
    import torch
    from transformers import AutoModelForImageTextToText

    from fp8vl import QuantizeOptions, quantize
    from fp8vl.apps.tiny import processor_for, qwen3_vl_config, train_tokenizer

    root = tmp_path_factory.mktemp("wide-moe")
    tok = train_tokenizer()
    cfg = qwen3_vl_config(tok, "moe")
    cfg.text_config.head_dim = 128
    cfg.text_config.rope_parameters["mrope_section"] = [24, 20, 20]     # sums to head_dim / 2
    cfg.vision_config.num_heads = 4
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16).save_pretrained(root / "src")
    processor = processor_for(tok)
    processor.save_pretrained(root / "src")
    processor.image_processor.save_pretrained(root / "src")
    processor.video_processor.save_pretrained(root / "src")
    return {fmt: quantize(root / "src", root / fmt, QuantizeOptions(format=fmt, workers=2)).output for fmt in FORMATS}


def test_vllm_refines_narrow_expert_blocks_in_fp8_and_refuses_them_in_compressed_tensors(wide_moe):
    r = verify(wide_moe["fp8"], engines=("vllm",), engine_python=PY, engine_tp=(1, 2, 4))
    assert r.tp["notes"][2] and "refined to 64x64" in r.tp["notes"][2][0]
    assert r.tp["notes"][4] and "refined to 32x32" in r.tp["notes"][4][0]
    tp = [c.message for c in checks(r, "vllm tp")["ok"]]
    assert tp and tp[0].startswith("builds and loads at TP 1, 2, 4"), tp
    assert not checks(r, "vllm")["warning"] and not checks(r, "vllm")["error"]
    r = verify(wide_moe["compressed-tensors"], engines=("vllm",), engine_python=PY, engine_tp=(1, 2, 4))
    tp = [c.message for c in checks(r, "vllm tp")["ok"]]
    assert r.tp["phase"][2] == "build" and tp and "TP 2 fails at build" in tp[0] and "192" in tp[0], tp
    assert not checks(r, "vllm")["warning"]
