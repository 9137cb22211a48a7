"""``fp8vl plan``: the vLLM memory arithmetic on a full-size Qwen3-VL-8B FP8 header, recomputed here.

The checkpoint is header-only: the FP8 plan of Qwen3-VL-8B's real tensor names and shapes is laid
out into one safetensors header, and the file is truncated to its full size (sparse: no disk used).
Everything the planner reads (config and header) is real; the weight bytes are holes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from fp8vl import FP8VLError
from fp8vl.serving.gpus import GIB, GPU, KNOWN, bf16_verdict, fp8_verdict, lookup
from fp8vl.apps.tiny import qwen3_vl_8b_config_dict, qwen3_vl_8b_shapes, write_header_only
from fp8vl.serving.vram import plan_vram
from helpers import run_cli


MAX_POS = 262144          # Qwen3-VL-8B's max_position_embeddings
BLOCK_TOKENS = 16         # vLLM's KV block
ITEM = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


# ---------------------------------------------------------------- header-only checkpoints

def qwen3_vl_8b_config() -> dict:
    cfg = qwen3_vl_8b_config_dict(36)
    assert cfg["text_config"]["max_position_embeddings"] == MAX_POS
    return cfg


def text_shapes(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                vocab: int) -> dict[str, tuple[int, ...]]:
    """Qwen3-VL-8B's vision tower plus a text model of other sizes (e.g. Qwen3-VL-4B's)."""
    s = {n: shp for n, shp in qwen3_vl_8b_shapes(1).items() if n.startswith("model.visual.")}
    t = "model.language_model."
    s[t + "embed_tokens.weight"] = (vocab, hidden)
    for n in range(layers):
        p = f"{t}layers.{n}."
        s[p + "input_layernorm.weight"] = s[p + "post_attention_layernorm.weight"] = (hidden,)
        s[p + "self_attn.q_norm.weight"] = s[p + "self_attn.k_norm.weight"] = (head_dim,)
        for name, shp in (("self_attn.q_proj", (heads * head_dim, hidden)),
                          ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
                          ("self_attn.v_proj", (kv_heads * head_dim, hidden)),
                          ("self_attn.o_proj", (hidden, heads * head_dim)),
                          ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                          ("mlp.down_proj", (hidden, inter))):
            s[p + name + ".weight"] = shp
    s[t + "norm.weight"] = (hidden,)
    return s


@pytest.fixture(scope="module")
def ckpt_8b(tmp_path_factory) -> Path:
    return write_header_only(tmp_path_factory.mktemp("hdr") / "Qwen3-VL-8B-FP8", qwen3_vl_8b_config(),
                             qwen3_vl_8b_shapes(36))


@pytest.fixture(scope="module")
def ckpt_4b_like(tmp_path_factory) -> Path:
    """Qwen3-VL-4B's text sizes (intermediate 9728): TP 8 leaves 1216 per rank."""
    cfg = qwen3_vl_8b_config()
    cfg["tie_word_embeddings"] = True
    cfg["text_config"].update(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    return write_header_only(tmp_path_factory.mktemp("hdr4") / "Qwen3-VL-4B-like-FP8", cfg,
                             text_shapes(2560, 9728, 36, 32, 8, 128, 151936))


def header_bytes(folder: Path) -> tuple[int, int]:
    """(FP8 bytes, all other bytes), read from the header with plain struct + json."""
    fp8 = other = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as h:
            (n,) = struct.unpack("<Q", h.read(8))
            header = json.loads(h.read(n))
        header.pop("__metadata__", None)
        for t in header.values():
            size = t["data_offsets"][1] - t["data_offsets"][0]
            assert size == math.prod(t["shape"]) * ITEM[t["dtype"]]
            if t["dtype"] == "F8_E4M3":
                fp8 += size
            else:
                other += size
    return fp8, other


def kv_per_token(cfg: dict, tp: int, item: int) -> int:
    tc = cfg["text_config"]
    return tc["num_hidden_layers"] * max(1, tc["num_key_value_heads"] // tp) * tc["head_dim"] * 2 * item


# ---------------------------------------------------------------- the fixture itself

def test_header_only_checkpoint_is_full_size_sparse_and_fp8(ckpt_8b):
    f = ckpt_8b / "model.safetensors"
    fp8, other = header_bytes(ckpt_8b)
    assert f.stat().st_size > fp8 + other                   # header + data
    assert f.stat().st_blocks * 512 < 1 << 20               # holes: no disk used
    shapes = qwen3_vl_8b_shapes(36)
    linears = [n for n in shapes if ".layers." in n and n.endswith("_proj.weight")]
    assert len(linears) == 36 * 7
    assert fp8 == sum(math.prod(shapes[n]) for n in linears)
    assert 6.4 * GIB < fp8 < 6.6 * GIB                     # ~7B parameters of decoder linears


# ---------------------------------------------------------------- the arithmetic, recomputed

@pytest.mark.parametrize("tp,kv_dtype", [(1, "auto"), (1, "fp8"), (2, "auto"), (2, "fp8")])
def test_rtx_4080_plan_recomputed_from_config_and_header(ckpt_8b, tp, kv_dtype):
    cfg = json.loads((ckpt_8b / "config.json").read_text())
    gpu = lookup("RTX 4080")
    assert gpu.memory == 16 * GIB
    p = plan_vram(ckpt_8b, gpu, tp=tp, utilization=0.9, kv_cache_dtype=kv_dtype)

    fp8, other = header_bytes(ckpt_8b)
    budget = int(16 * GIB * 0.9)
    rows = {name: n for name, _, n in p.rows}
    assert p.rows[0][0] == "budget" and p.rows[0][2] == budget
    assert abs(rows["FP8 weights"] + fp8 / tp) < 1
    assert abs(rows["BF16 weights"] + other / tp) < 1
    for name in ("LM activations", "vision encoder", "sampler logits", "non-torch memory", "CUDA graphs"):
        assert rows[name] < 0, name
    others = sum(n for _, _, n in p.rows[1:-1])
    assert p.rows[-1][0] == "KV cache" and p.rows[-1][2] == budget + others == p.kv_budget

    kv_bytes = kv_per_token(cfg, tp, 1 if kv_dtype == "fp8" else 2)
    assert p.kv_bytes_per_token == kv_bytes
    assert kv_bytes == 36 * (8 // tp) * 128 * 2 * (1 if kv_dtype == "fp8" else 2)
    kv_tokens = (budget + others) // kv_bytes // BLOCK_TOKENS * BLOCK_TOKENS
    assert p.kv_tokens == kv_tokens > 0
    limit = min(kv_tokens, MAX_POS)
    assert p.context_limit == MAX_POS
    assert limit - 1024 < p.max_model_len <= limit
    assert p.max_model_len >= 1024
    assert 1 <= p.max_num_seqs <= 256 and p.max_num_seqs * 1024 <= kv_tokens


def test_tp2_halves_weights_and_kv_heads_per_gpu(ckpt_8b):
    gpu = lookup("RTX 4080")
    one, two = plan_vram(ckpt_8b, gpu, tp=1), plan_vram(ckpt_8b, gpu, tp=2)
    r1, r2 = ({n: b for n, _, b in p.rows} for p in (one, two))
    assert abs(r2["FP8 weights"] * 2 - r1["FP8 weights"]) <= 2
    assert abs(r2["BF16 weights"] * 2 - r1["BF16 weights"]) <= 2
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    assert two.kv_tokens > 2 * one.kv_tokens      # more room per GPU and half the bytes per token


def test_fp8_kv_cache_doubles_the_tokens_that_fit(ckpt_8b):
    gpu = lookup("RTX 4080")
    bf16, fp8 = plan_vram(ckpt_8b, gpu), plan_vram(ckpt_8b, gpu, kv_cache_dtype="fp8")
    assert fp8.kv_budget == bf16.kv_budget
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    assert abs(fp8.kv_tokens - 2 * bf16.kv_tokens) <= BLOCK_TOKENS


def test_big_gpu_is_capped_by_max_position_embeddings(ckpt_8b):
    p = plan_vram(ckpt_8b, lookup("H200"))
    assert p.kv_tokens > MAX_POS
    assert p.max_model_len == MAX_POS


def test_enforce_eager_frees_the_cuda_graph_memory_for_the_kv_cache(ckpt_8b):
    gpu = lookup("RTX 4080")
    graphs, eager = plan_vram(ckpt_8b, gpu), plan_vram(ckpt_8b, gpu, enforce_eager=True)
    g = {n: b for n, _, b in graphs.rows}["CUDA graphs"]
    assert {n: b for n, _, b in eager.rows}["CUDA graphs"] == 0
    assert eager.kv_budget == graphs.kv_budget - g > graphs.kv_budget


def test_12_gib_card_does_not_fit_with_a_clear_error(ckpt_8b):
    with pytest.raises(FP8VLError) as e:
        plan_vram(ckpt_8b, lookup("RTX 3060"))
    msg = str(e.value)
    assert "does not fit" in msg and "RTX 3060" in msg and "12 GiB" in msg and ckpt_8b.name in msg
    assert "--kv-cache-dtype fp8" in msg and "--tp 2" in msg


def test_tp_that_splits_a_block_fails(ckpt_4b_like):
    gpu = lookup("H100")
    assert plan_vram(ckpt_4b_like, gpu, tp=4).max_model_len > 0      # 9728 / 4 = 2432 = 19 x 128
    per_rank = 9728 // 8
    assert per_rank % 128
    with pytest.raises(FP8VLError) as e:
        plan_vram(ckpt_4b_like, gpu, tp=8)
    assert "--tp 8" in str(e.value) and str(per_rank) in str(e.value)


def test_tiny_model_tp2_splits_a_64_row_kv_block(dense_fp8):
    """The tiny Qwen3-VL has 2 KV heads of 64: TP 2 gives 64 rows per rank, not a block."""
    cfg = json.loads((dense_fp8.out / "config.json").read_text())["text_config"]
    assert cfg["num_key_value_heads"] * cfg["head_dim"] // 2 == 64
    with pytest.raises(FP8VLError, match="--tp 2"):
        plan_vram(dense_fp8.out, lookup("RTX 4080"), tp=2)


def test_too_small_gpu_suggests_only_tp_sizes_that_start(dense_fp8, ckpt_8b, tmp_path):
    """The tiny model fits no TP but 1: the fix list must not offer --tp 2; the 8B one fits TP 2."""
    r = run_cli("plan", dense_fp8.out, "--vram", "1GiB", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not fit" in r.stderr and "--tp " not in r.stderr and "TP=2 fails" in r.stderr
    with pytest.raises(FP8VLError) as e:
        plan_vram(ckpt_8b, GPU("4 GiB", 4 * GIB, (8, 9)), tp=2)
    assert "--tp 4" in str(e.value) and "--tp 2" not in str(e.value)      # the next size up, not the current
    with pytest.raises(FP8VLError) as e:
        plan_vram(ckpt_8b, GPU("4 GiB", 4 * GIB, (8, 9)), kv_cache_dtype="fp8")
    assert "--tp 2" in str(e.value) and "--kv-cache-dtype" not in str(e.value)   # already fp8


def test_bf16_checkpoint_gets_a_bf16_verdict_not_fp8(dense_src, tmp_path):
    p = plan_vram(dense_src, lookup("L4"))
    assert p.verdict == bf16_verdict((8, 9)) and "FP8 tensor cores" not in p.verdict[1]
    rows = {name: (how, n) for name, how, n in p.rows}
    assert "FP8 weights" not in rows and "BF16" in rows["weights"][0]
    assert plan_vram(dense_src, lookup("T4")).verdict[0] == "no bf16"
    r = run_cli("plan", dense_src, "--gpu", "RTX 4080", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert bf16_verdict((8, 9))[1] in out and fp8_verdict((8, 9))[1] not in out and "FP8 weights" not in out


def test_tp_outside_the_checked_sizes_that_does_not_divide_fails(ckpt_8b):
    assert 4096 % 3 and 32 % 3
    with pytest.raises(FP8VLError, match="--tp 3"):
        plan_vram(ckpt_8b, lookup("H100"), tp=3)


@pytest.mark.parametrize("util", [0.05, 1.0])
def test_utilization_out_of_range_is_refused(ckpt_8b, util):
    with pytest.raises(FP8VLError, match="gpu-memory-utilization"):
        plan_vram(ckpt_8b, lookup("RTX 4080"), utilization=util)


# ---------------------------------------------------------------- GPUs

@pytest.mark.parametrize("name,cc,verdict", [("RTX 4080", (8, 9), "fp8 w8a8"), ("RTX 3090", (8, 6), "fp8 weight-only"),
                                             ("T4", (7, 5), "unsupported")])
def test_gpu_verdict_by_compute_capability(ckpt_8b, name, cc, verdict):
    gpu = lookup(name)
    assert gpu.cc == cc
    p = plan_vram(ckpt_8b, gpu)
    assert p.verdict == fp8_verdict(cc)
    assert p.verdict[0] == verdict and f"{cc[0]}.{cc[1]}" in p.verdict[1]


def test_unknown_compute_capability_says_unknown():
    short, why = fp8_verdict(None)
    assert short == "unknown" and "8.9" in why


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA GeForce RTX 4080 SUPER", "RTX 4080 SUPER"),
    ("NVIDIA GeForce RTX 4080", "RTX 4080"),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", "RTX 4070 Ti SUPER"),
    ("NVIDIA GeForce RTX 4070 Ti", "RTX 4070 Ti"),
    ("NVIDIA H100 80GB HBM3", "H100 80GB"),
    ("Tesla T4", "T4"),
])
def test_lookup_takes_the_driver_name_and_picks_the_most_specific_card(name, expected):
    assert lookup(name).name == expected


def test_lookup_a100_40gb_driver_name_gets_40_gib():
    assert lookup("NVIDIA A100-SXM4-40GB").memory == 40 * GIB


def test_lookup_does_not_take_an_l40_for_an_l4():
    try:
        g = lookup("NVIDIA L40")
    except FP8VLError:
        return                              # unknown card: acceptable, the user gives --vram
    assert g.memory == 48 * GIB


def test_lookup_unknown_gpu_lists_the_known_ones():
    with pytest.raises(FP8VLError) as e:
        lookup("Voodoo 5 6000")
    assert "Voodoo 5 6000" in str(e.value) and "--vram" in str(e.value)
    assert all(g.name in str(e.value) for g in KNOWN.values())


# ---------------------------------------------------------------- the command

def test_plan_command_prints_the_table_verdict_and_serve_command(ckpt_8b, tmp_path):
    r = run_cli("plan", ckpt_8b, "--gpu", "RTX 4080", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = plan_vram(ckpt_8b, lookup("RTX 4080"))
    out = " ".join(r.stdout.split())        # undo rich's line wrapping
    for item in ("budget", "FP8 weights", "BF16 weights", "KV cache"):
        assert item in out
    assert f"{p.kv_budget / GIB:.2f}" in out
    assert f"-> {p.kv_tokens} tokens fit" in out
    assert f"--max-model-len {p.max_model_len} (model limit {MAX_POS})" in out
    assert fp8_verdict((8, 9))[1] in out
    assert "vllm serve" in out


def test_plan_command_on_a_12_gib_card_exits_2_with_one_line(ckpt_8b, tmp_path):
    r = run_cli("plan", ckpt_8b, "--gpu", "RTX 3060", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not fit" in lines[0]
    assert "Traceback" not in r.stderr
