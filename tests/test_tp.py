"""Tensor-parallel sizes vLLM can start an FP8 block checkpoint with, on the real models' linear shapes.

Shapes only (no weights): the FP8 linears each model's checkpoint holds, [N, K] per module, with the
published sizes. The expected per-rank sizes are recomputed here from the roles vLLM gives each linear.
"""

from __future__ import annotations

import pytest

from fp8vl.tp import SIZES, summarize, tp_report

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
    # name: (kwargs, expected max TP, expert parallelism suggested beyond)
    "Qwen3-VL-30B-A3B": (dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, layers=48, experts=128,
                              moe_inter=768), 2, 2),
    "Qwen3-VL-235B-A22B": (dict(hidden=4096, heads=64, kv_heads=4, head_dim=128, layers=94, experts=128,
                                moe_inter=1536), 4, 4),
    "Qwen3-VL-8B": (dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, layers=36, inter=12288), 8, None),
    "Qwen3-4B-like": (dict(hidden=2560, heads=32, kv_heads=8, head_dim=128, layers=36, inter=9728), 4, None),
}


def per_rank(module: str, n: int, k: int, tp: int, kv_heads: int, head_dim: int) -> int | None:
    """The size vLLM splits for one rank (None: split unevenly), by role: row-parallel splits K,
    column-parallel splits N; fewer KV heads than ranks are replicated, one head per rank."""
    if module.endswith(("o_proj", "down_proj")):
        return k // tp if k % tp == 0 else None
    if module.endswith(("k_proj", "v_proj")) and kv_heads < tp:
        return head_dim
    return n // tp if n % tp == 0 else None


def expected_failures(cfg, lin, tp) -> set[str]:
    tc = cfg["text_config"]
    bad = set()
    for m, (n, k) in lin.items():
        size = per_rank(m, n, k, tp, tc["num_key_value_heads"], tc["head_dim"])
        if size is None or size % BLOCK:
            bad.add(m)
    return bad


@pytest.fixture(scope="module")
def reports():
    out = {}
    for name, (kw, _, _) in MODELS.items():
        cfg, lin = model(**kw)
        out[name] = (cfg, lin, tp_report(cfg, lin))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_failing_modules_per_tp_size_are_the_recomputed_ones(reports, name):
    cfg, lin, rep = reports[name]
    assert set(rep["sizes"]) == set(SIZES) == {1, 2, 4, 8}
    for tp in SIZES:
        failing = expected_failures(cfg, lin, tp)
        assert len(rep["sizes"][tp]) == len(failing), (tp, rep["sizes"][tp][:3])
        for problem in rep["sizes"][tp]:
            assert problem.split(":")[0] in failing, problem


@pytest.mark.parametrize("name", MODELS)
def test_max_tp_and_expert_parallel_suggestion(reports, name):
    cfg, lin, rep = reports[name]
    _, max_tp, ep = MODELS[name]
    fits = [tp for tp in SIZES if not expected_failures(cfg, lin, tp)]
    assert fits == [tp for tp in SIZES if tp <= max_tp]           # every size up to the max, none beyond
    assert rep["max_tp"] == max_tp
    assert rep["expert_parallel_beyond"] == ep


def test_30b_a3b_experts_leave_192_rows_per_rank_at_tp4(reports):
    cfg, lin, rep = reports["Qwen3-VL-30B-A3B"]
    assert 768 // 2 % BLOCK == 0 and 768 // 4 == 192 and 192 % BLOCK
    assert all(".experts." in p and "192" in p for p in rep["sizes"][4])
    assert len(rep["sizes"][4]) == 48 * 128 * 3
    # the attention linears still split at 8: only experts stop TP, so expert parallelism helps
    assert not [m for m in expected_failures(cfg, lin, 8) if ".experts." not in m]
    line = summarize(rep)
    assert "TP in {1, 2}" in line and "TP=4 fails" in line and "192" in line
    assert "beyond TP=2 use expert parallelism" in line and "--enable-expert-parallel" in line


def test_235b_experts_fit_tp4_and_fail_tp8(reports):
    _, _, rep = reports["Qwen3-VL-235B-A22B"]
    assert 1536 // 4 % BLOCK == 0 and (1536 // 8) % BLOCK
    assert not rep["sizes"][4] and all(str(1536 // 8) in p for p in rep["sizes"][8])
    line = summarize(rep)
    assert "TP in {1, 2, 4}" in line and "TP=8 fails" in line and "beyond TP=4" in line


def test_4_kv_heads_are_replicated_beyond_tp4_not_split(reports):
    """235B has 4 KV heads: at TP 8 each rank holds one whole 128-row head, which fits the block."""
    _, _, rep = reports["Qwen3-VL-235B-A22B"]
    assert not [p for p in rep["sizes"][8] if "k_proj" in p or "v_proj" in p]


def test_dense_8b_fits_every_tp_size(reports):
    _, _, rep = reports["Qwen3-VL-8B"]
    assert all(not p for p in rep["sizes"].values())
    assert rep["max_tp"] == 8 and rep["expert_parallel_beyond"] is None
    line = summarize(rep)
    assert "TP in {1, 2, 4, 8}" in line and "fails" not in line and "expert" not in line


def test_9728_intermediate_fails_tp8_with_1216_per_rank(reports):
    cfg, lin, rep = reports["Qwen3-4B-like"]
    assert 9728 // 8 == 1216 and 1216 % BLOCK == 64
    failing = {p.split(":")[0] for p in rep["sizes"][8]}
    assert failing == {m for m in lin if m.endswith(("gate_proj", "up_proj", "down_proj"))}
    assert all("1216" in p for p in rep["sizes"][8])
    line = summarize(rep)
    assert "TP=8 fails" in line and "expert" not in line


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
