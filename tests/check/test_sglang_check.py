"""SGLang's own loader (SGLang's venv, on the CPU) on tiny outputs of every architecture and both
formats: ``fp8vl verify --sglang``. Run by ``make test-sglang``; skipped where SGLang is not installed."""

from __future__ import annotations

import pytest

from engine_outputs import FORMATS, build_outputs, checks, edited_copy, engine_python
from fp8vl.apps.tiny import ARCHS
from fp8vl.check.verify import verify

FOUND = engine_python("sglang")
pytestmark = pytest.mark.skipif(FOUND is None, reason="SGLang is not installed here: `make test-sglang` sets it up")
PY = (FOUND[0],) if FOUND else ()
# Measured with SGLang 0.5.23: every output loads as intended except Llama in the fp8 layout (its
# load_weights drops weight_scale_inv; fp8vl says so and names compressed-tensors) and Gemma 3 as
# Transformers 5 saves it (vision_tower.* instead of vision_tower.vision_model.*, as in vLLM).
REFUSED = {("llama", "fp8")}
LAYOUT_REFUSED = {"gemma3"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return build_outputs(tmp_path_factory.mktemp("engine-outputs"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sglang_builds_and_loads_every_output_as_intended(outputs, arch, fmt):
    r = verify(outputs[arch, fmt], engines=("sglang",), engine_python=PY)
    found = checks(r, "sglang")
    assert found["ok"][0].message.startswith(f"SGLang {FOUND[1]} ran its own loader")
    if arch in LAYOUT_REFUSED:
        assert any("vision_tower.embeddings" in c.message for c in found["error"]), found
        assert any("SGLang" in c.message and "vision_tower.vision_model" in c.message
                   for c in checks(r, "engines")["warning"])
        return
    if (arch, fmt) in REFUSED:
        assert found["error"], "SGLang was expected to refuse Llama's fp8 layout"
        assert any("weight_scale_inv" in c.message for c in found["error"]), found["error"]
        assert any("compressed-tensors" in c.message for c in checks(r, "engines")["warning"])
        return
    assert not found["error"], found["error"]
    layers = [c for c in found["ok"] if c.name == "sglang layers"]
    assert layers and "used all" in layers[0].message
    assert r.ok, [c for c in r.checks if c.level == "error"]


def test_qwen2_5_vl_vision_qkv_needs_the_parent_name_in_sglang(outputs, tmp_path):
    """Without the ...attn parents fp8vl lists, SGLang builds Qwen2.5-VL's vision qkv as FP8 and casts
    the BF16 weight into it: the check names the layer."""
    def drop_parents(cfg):
        q = cfg["quantization_config"]
        q["modules_to_not_convert"] = q["ignored_layers"] = [
            m for m in q["modules_to_not_convert"] if not m.endswith(".attn")]
    bare = edited_copy(outputs["qwen2_5_vl", "fp8"], tmp_path / "bare", drop_parents)
    r = verify(bare, engines=("sglang",), engine_python=PY)
    errors = [c.message for c in checks(r, "sglang")["error"]]
    assert any("visual.blocks.0.attn.qkv" in m for m in errors), errors
