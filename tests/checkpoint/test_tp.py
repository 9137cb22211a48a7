"""Tensor-parallel sizes vLLM (0.33 rules) can start an FP8 block checkpoint with, on the real models' shapes.

Shapes only (no weights): the FP8 linears each model's checkpoint holds, [N, K] per module, with the
published sizes. The expected per-rank sizes are recomputed here from the roles vLLM gives each linear;
tests/check/test_vllm_check.py checks the same report against vLLM itself on tiny models.
"""

from __future__ import annotations

import math

import pytest

from fp8vl.checkpoint.tp import SIZES, summarize, tp_report

BLOCK = 128


def model(hidden, heads, kv_heads, head_dim, layers, inter=None, experts=0, moe_inter=None):
    """(config, {module: (N, K)}) of the text model's FP8 linears; MoE experts split per expert."""
    cfg = {"text_config": {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                           "head_dim": head_dim, "num_hidden_layers": layers}}
    lin = {}
    for n in range(layers):
        p = f"model.language_model.layers.{n}."
        lin[p + "self_attn.q_proj"] = (heads * head_dim, hidden)
        lin[p + "self_attn.k_proj"] = (kv_heads * head_dim, hidden)
        lin[p + "self_attn.v_proj"] = (kv_heads * head_dim, hidden)
        lin[p + "self_attn.o_proj"] = (hidden, heads * head_dim)
        if experts:
            for e in range(experts):
                lin[p + f"mlp.experts.{e}.gate_proj"] = (moe_inter, hidden)
                lin[p + f"mlp.experts.{e}.up_proj"] = (moe_inter, hidden)
                lin[p + f"mlp.experts.{e}.down_proj"] = (hidden, moe_inter)
        else:
            lin[p + "mlp.gate_proj"] = (inter, hidden)
            lin[p + "mlp.up_proj"] = (inter, hidden)
            lin[p + "mlp.down_proj"] = (hidden, inter)
    return cfg, lin


MODELS = {
    # name: (kwargs, {format: (expected max TP, expert parallelism suggested beyond)})
    "Qwen3-VL-30B-A3B": (dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, layers=48, experts=128,
                              moe_inter=768), {"fp8": (8, None), "compressed-tensors": (2, 2)}),
    "Qwen3-VL-235B-A22B": (dict(hidden=4096, heads=64, kv_heads=4, head_dim=128, layers=94, experts=128,
                                moe_inter=1536), {"fp8": (8, None), "compressed-tensors": (4, 4)}),
    "Qwen3-VL-8B": (dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, layers=36, inter=12288),
                    {"fp8": (8, None), "compressed-tensors": (8, None)}),
    "Qwen3-4B-like": (dict(hidden=2560, heads=32, kv_heads=8, head_dim=128, layers=36, inter=9728),
                      {"fp8": (4, None), "compressed-tensors": (4, None)}),
}
FORMATS = ("fp8", "compressed-tensors")


def per_rank(module: str, n: int, k: int, tp: int, kv_heads: int, head_dim: int) -> int | None:
    """The size vLLM splits for one rank (None: split unevenly), by role: row-parallel splits K,
    column-parallel splits N; fewer KV heads than ranks are replicated, one head per rank."""
    if module.endswith(("o_proj", "down_proj")):
        return k // tp if k % tp == 0 else None
    if module.endswith(("k_proj", "v_proj")) and kv_heads < tp:
        return head_dim
    return n // tp if n % tp == 0 else None


def expected_failures(cfg, lin, tp, fmt) -> set[str]:
    """Modules vLLM 0.33 refuses at TP ``tp``. Experts: gate/up carry the verdict for the expert's
    intermediate size (down shares it); the fp8 format refines blocks down to gcd >= 32."""
    tc = cfg["text_config"]
    bad = set()
    for m, (n, k) in lin.items():
        if ".experts." in m:
            if m.endswith("down_proj"):
                continue
            size = n // tp if n % tp == 0 else None
            if size is not None and size % BLOCK and fmt == "fp8" and math.gcd(BLOCK, size, tc["hidden_size"]) >= 32:
                continue
        else:
            if tp == 1:
                continue
            size = per_rank(m, n, k, tp, tc["num_key_value_heads"], tc["head_dim"])
        if size is None or size % BLOCK:
            bad.add(m)
    return bad


@pytest.fixture(scope="module")
def reports():
    out = {}
    for name, (kw, _) in MODELS.items():
        cfg, lin = model(**kw)
        for fmt in FORMATS:
            out[name, fmt] = (cfg, lin, tp_report(cfg, lin, fmt=fmt))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_failing_modules_per_tp_size_are_the_recomputed_ones(reports, name, fmt):
    cfg, lin, rep = reports[name, fmt]
    assert set(rep["sizes"]) == set(SIZES) == {1, 2, 4, 8}
    assert rep["vllm"] == "0.33" and rep["format"] == fmt
    for tp in SIZES:
        failing = expected_failures(cfg, lin, tp, fmt)
        assert len(rep["sizes"][tp]) == len(failing), (tp, rep["sizes"][tp][:3])
        for problem in rep["sizes"][tp]:
            assert problem.split(":")[0] in failing, problem


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_max_tp_and_expert_parallel_suggestion(reports, name, fmt):
    cfg, lin, rep = reports[name, fmt]
    max_tp, ep = MODELS[name][1][fmt]
    fits = [tp for tp in SIZES if not expected_failures(cfg, lin, tp, fmt)]
    assert fits == [tp for tp in SIZES if tp <= max_tp]           # every size up to the max, none beyond
    assert rep["max_tp"] == max_tp
    assert rep["expert_parallel_beyond"] == ep


def test_30b_a3b_experts_refine_scale_blocks_in_fp8_and_stop_compressed_tensors_at_tp4(reports):
    """768-wide experts: 192 per rank at TP 4 (gcd 64), 96 at TP 8 (gcd 32). vLLM 0.33 refines the fp8
    format's expert scales to that grid; compressed-tensors has no refinement and fails at build."""
    assert 768 // 4 == 192 and math.gcd(128, 192, 2048) == 64 and math.gcd(128, 96, 2048) == 32
    _, _, rep = reports["Qwen3-VL-30B-A3B", "fp8"]
    assert all(not p for p in rep["sizes"].values())
    line = summarize(rep)
    assert "vLLM 0.33 rules" in line and "TP in {1, 2, 4, 8}" in line and "fails" not in line
    assert "TP 4: experts 192 wide per rank, scale blocks refined to 64x64" in line
    assert "TP 8: experts 96 wide per rank, scale blocks refined to 32x32" in line
    cfg, lin, rep = reports["Qwen3-VL-30B-A3B", "compressed-tensors"]
    assert all(".experts." in p and "192" in p for p in rep["sizes"][4])
    assert len(rep["sizes"][4]) == 48 * 128 * 2 and rep["phase"][4] == "build"
    # the attention linears still split at 8: only experts stop TP, so expert parallelism helps
    assert not [m for m in expected_failures(cfg, lin, 8, "compressed-tensors") if ".experts." not in m]
    line = summarize(rep)
    assert "TP in {1, 2}" in line and "TP=4 fails at build" in line and "192" in line
    assert "beyond TP=2 use expert parallelism" in line and "--enable-expert-parallel" in line


def test_235b_experts_fit_tp4_and_fail_tp8_only_without_refinement(reports):
    assert 1536 // 4 % BLOCK == 0 and (1536 // 8) % BLOCK
    _, _, rep = reports["Qwen3-VL-235B-A22B", "compressed-tensors"]
    assert not rep["sizes"][4] and all(str(1536 // 8) in p for p in rep["sizes"][8])
    line = summarize(rep)
    assert "TP in {1, 2, 4}" in line and "TP=8 fails at build" in line and "beyond TP=4" in line
    assert "TP in {1, 2, 4, 8}" in summarize(reports["Qwen3-VL-235B-A22B", "fp8"][2])


def test_4_kv_heads_are_replicated_beyond_tp4_not_split(reports):
    """235B has 4 KV heads: at TP 8 each rank holds one whole 128-row head, which fits the block."""
    for fmt in FORMATS:
        _, _, rep = reports["Qwen3-VL-235B-A22B", fmt]
        assert not [p for p in rep["sizes"][8] if "k_proj" in p or "v_proj" in p or "KV" in p]


def test_dense_8b_fits_every_tp_size(reports):
    _, _, rep = reports["Qwen3-VL-8B", "fp8"]
    assert all(not p for p in rep["sizes"].values())
    assert rep["max_tp"] == 8 and rep["expert_parallel_beyond"] is None
    line = summarize(rep)
    assert "TP in {1, 2, 4, 8}" in line and "fails" not in line and "expert" not in line


@pytest.mark.parametrize("fmt", FORMATS)
def test_9728_intermediate_fails_tp8_at_build_on_down_proj(reports, fmt):
    cfg, lin, rep = reports["Qwen3-4B-like", fmt]
    assert 9728 // 8 == 1216 and 1216 % BLOCK == 64
    failing = {p.split(":")[0] for p in rep["sizes"][8]}
    assert failing == {m for m in lin if m.endswith(("gate_proj", "up_proj", "down_proj"))}
    assert all("1216" in p for p in rep["sizes"][8])
    # vLLM builds gate_up_proj before down_proj: compressed-tensors stops there; the fp8 format lets
    # the merged gate_up_proj through and stops at down_proj.
    first = "down_proj" if fmt == "fp8" else "gate_proj"
    assert rep["phase"][8] == "build" and rep["sizes"][8][0].split(":")[0].endswith(first)
    line = summarize(rep)
    assert "TP=8 fails at build" in line and first in line and "expert" not in line


def test_narrow_kv_fails_at_load_in_fp8_and_at_build_in_compressed_tensors():
    """2 KV heads of 64: 64 KV rows per rank at TP 2. vLLM skips the block check for the merged qkv_proj
    in the fp8 format and fails loading v_proj's scales; compressed-tensors checks it at build."""
    cfg, lin = model(hidden=256, heads=4, kv_heads=2, head_dim=64, layers=1, inter=512)
    fp8, ct = tp_report(cfg, lin, fmt="fp8"), tp_report(cfg, lin, fmt="compressed-tensors")
    assert fp8["phase"][2] == "load" and ct["phase"][2] == "build"
    assert {p.split(":")[0].rsplit(".", 1)[-1] for p in fp8["sizes"][2]} == {"k_proj", "v_proj"}
    assert "TP=2 fails at load" in summarize(fp8) and "TP=2 fails at build" in summarize(ct)


def test_heads_that_do_not_split_fail_at_build_vision_included():
    cfg, lin = model(hidden=256, heads=4, kv_heads=4, head_dim=128, layers=1, inter=1024)
    cfg["vision_config"] = {"num_heads": 2}
    rep = tp_report(cfg, lin)
    assert not rep["sizes"][2]
    assert rep["phase"][4] == "build" and any("2 vision attention heads" in p for p in rep["sizes"][4])
    assert any("4 attention heads do not split into 8" in p for p in rep["sizes"][8])


def test_format_comes_from_the_config_when_not_given():
    cfg, lin = model(hidden=2048, heads=32, kv_heads=4, head_dim=128, layers=1, experts=2, moe_inter=768)
    assert tp_report(cfg, lin)["max_tp"] == 8
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    assert tp_report(cfg, lin)["max_tp"] == 2 and tp_report(cfg, lin)["format"] == "compressed-tensors"


def test_per_rank_size_not_a_block_multiple_and_uneven_split_are_both_reported():
    cfg, lin = model(hidden=2048, heads=16, kv_heads=16, head_dim=128, layers=1, inter=384 * 3)
    rep = tp_report(cfg, lin)
    assert 1152 % 8 == 0 and (1152 // 8) % BLOCK       # 144 per rank
    assert any("down_proj" in p and "144" in p for p in rep["sizes"][8])
    assert rep["max_tp"] == 1                            # 1152 / 2 = 576 is not a block multiple either
    cfg, lin = model(hidden=2048, heads=16, kv_heads=16, head_dim=128, layers=1, inter=1302)
    rep = tp_report(cfg, lin)
    assert 1302 % 4
    assert any("gate_proj" in p and "does not split into 4 equal parts" in p for p in rep["sizes"][4])
