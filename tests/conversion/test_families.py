"""Model families besides Qwen3-VL: tiny Qwen2.5-VL, Gemma 3, Qwen3, Llama (and tied Qwen3-VL) built with
Transformers, converted, and loaded back by Transformers and by fp8vl's runtime."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fp8vl import QuantizeOptions, quantize
from fp8vl.checkpoint.plan import make_plan
from fp8vl.apps.tiny import build_tiny
from helpers import FP8, TILE, load_tensors, read_config, ref_block_quantize, same_bytes, text_config

ARCHS = ["qwen2_5_vl", "gemma3", "qwen3", "llama", "qwen3_vl_tied"]
VISION_PARTS = {"visual", "vision_tower", "multi_modal_projector"}
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. "
        "A cup of coffee with latte art on a wooden table in a cafe.")
# Mean next-token KL (nats) to the BF16 source on TEXT (30 tokens). Measured, Transformers (FP8 dequantized
# to BF16 on CPU): qwen2_5_vl 0.048, gemma3 0.015, qwen3 0.062, llama 0.056, qwen3_vl_tied 0.005.
HF_KL_BOUND = 0.15
# fp8vl's runtime in its CPU mode (simulated W8A8: activations quantized too): qwen2_5_vl 0.077, qwen3 0.104,
# llama 0.096, qwen3_vl_tied 0.009.
RUNTIME_KL_BOUND = 0.2


@dataclass
class Family:
    arch: str
    src: Path
    out: Path
    result: object
    shapes: dict[str, tuple[int, ...]]


def vision(name: str) -> bool:
    return bool(VISION_PARTS & set(name.split(".")))


def header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in load_tensors(folder).items()}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for arch in ARCHS:
        src = build_tiny(root / arch, arch)
        res = quantize(src, root / f"{arch}-fp8", QuantizeOptions())
        out[arch] = Family(arch, src, root / f"{arch}-fp8", res, header_shapes(src))
    return out


def text_prefix(shapes: dict) -> str:
    """The one prefix P with P + 'layers.0.self_attn.q_proj.weight' outside the vision tower."""
    hits = [n.removesuffix("layers.0.self_attn.q_proj.weight") for n in shapes
            if n.endswith("layers.0.self_attn.q_proj.weight") and not vision(n)]
    assert len(hits) == 1, hits
    return hits[0]


def decoder_linears(f: Family) -> set[str]:
    p = text_prefix(f.shapes)
    n_layers = text_config(read_config(f.src))["num_hidden_layers"]
    names = {f"{p}layers.{n}.{proj}.weight" for n in range(n_layers) for proj in PROJS}
    assert names <= set(f.shapes)
    return names


# ---------------------------------------------------------------- the plan on each family

@pytest.mark.parametrize("arch", ARCHS)
def test_plan_quantizes_exactly_the_decoder_layer_linears(families, arch):
    f = families[arch]
    expected = decoder_linears(f)
    assert len(expected) == 14
    assert {e.name for e in f.result.plan.entries if e.quantize} == expected
    # known families: no "unknown architecture" warning; only what an engine cannot load (compat.py)
    engine_warning = {"gemma3": "vision_tower.vision_model", "llama": "SGLang"}.get(arch)
    warnings = f.result.plan.warnings
    assert (len(warnings) == 1 and engine_warning in warnings[0]) if engine_warning else warnings == ()
    out = load_tensors(f.out)
    assert {n for n, t in out.items() if t.dtype == FP8} == expected
    for name in expected:
        q, s = out[name], out[name.replace(".weight", ".weight_scale_inv")]
        rq, rs = ref_block_quantize(load_tensors(f.src)[name])
        assert same_bytes(q, rq) and same_bytes(s, rs), name


@pytest.mark.parametrize("arch,prefix,vision_roots", [
    ("qwen2_5_vl", "model.layers.", ("visual.",)),                          # legacy names on disk
    ("gemma3", None, ("vision_tower.", "multi_modal_projector.")),
    ("qwen3", "model.layers.", ()),
    ("llama", "model.layers.", ()),
    ("qwen3_vl_tied", "model.language_model.layers.", ("model.visual.",)),
])
def test_checkpoint_names_on_disk(families, arch, prefix, vision_roots):
    shapes = families[arch].shapes
    if prefix:
        assert text_prefix(shapes) + "layers." == prefix
    for root in vision_roots:   # Gemma 3 may save its towers with or without the "model." prefix
        assert any(n.startswith(root) or n.startswith("model." + root) for n in shapes), root
    assert bool(vision_roots) == any(vision(n) for n in shapes)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3", "qwen3_vl_tied"])
def test_vision_tower_is_kept_byte_for_byte_and_listed(families, arch):
    f = families[arch]
    src, out = load_tensors(f.src), load_tensors(f.out)
    vis = [n for n in src if vision(n)]
    assert len(vis) > 20
    assert all(same_bytes(out[n], src[n]) for n in vis)
    listed = set(read_config(f.out)["quantization_config"]["modules_to_not_convert"])
    matrices = {n.removesuffix(".weight") for n in vis if n.endswith(".weight") and src[n].ndim >= 2}
    assert matrices and matrices <= listed
    assert not listed & {n.removesuffix(".weight") for n in decoder_linears(f)}


# ---------------------------------------------------------------- Transformers and fp8vl's runtime load them

def model_class(folder: Path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if "vision_config" in read_config(folder) else AutoModelForCausalLM


def kl(ref: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    lp, lq = ref.float().log_softmax(-1), q.float().log_softmax(-1)
    per_pos = (lp.exp() * (lp - lq)).sum(-1)
    return float(per_pos.mean()), float((ref.argmax(-1) == q.argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def source_logits(families):
    """Per arch: (input_ids from the output's saved tokenizer, source logits, source model)."""
    from transformers import AutoTokenizer

    cache = {}

    def get(arch):
        if arch not in cache:
            f = families[arch]
            ids = AutoTokenizer.from_pretrained(f.out)(TEXT, return_tensors="pt")["input_ids"]
            model = model_class(f.src).from_pretrained(f.src, dtype=torch.bfloat16).eval()
            with torch.no_grad():
                cache[arch] = (ids, model(input_ids=ids).logits[0], model)
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_the_fp8_output_and_kl_to_source_is_small(families, source_logits, arch):
    f = families[arch]
    ids, ref, src_model = source_logits(arch)
    assert ids.shape[1] > 16
    model = model_class(f.out).from_pretrained(f.out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    mean, top1 = kl(ref, logits)
    print(f"{arch}: Transformers KL {mean:.4f} top-1 {top1:.2f}")
    assert 1e-4 < mean < HF_KL_BOUND and top1 >= 0.7
    src_params, params = dict(src_model.named_parameters()), dict(model.named_parameters())
    assert set(params) == set(src_params)
    vis = [n for n in params if vision(n)]
    assert bool(vis) == ("vision_config" in read_config(f.src))
    assert all(torch.equal(params[n], src_params[n]) for n in vis)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8vl_runtime_loads_each_family_with_its_fp8_bytes(families, source_logits, arch):
    from fp8vl.runtime.loader import load_fp8_model
    from fp8vl.runtime.fp8_modules import fp8_mode, fp8_modules

    f = families[arch]
    ids, ref, _ = source_logits(arch)
    model = load_fp8_model(f.out)
    mods = fp8_modules(model)
    out = load_tensors(f.out)
    fp8 = [n for n, t in out.items() if t.dtype == FP8]
    assert len(mods) == len(fp8) == 14
    # every FP8Linear holds one of the checkpoint's FP8 weights, each exactly once
    assert sorted(digest(m.weight) for m in mods.values()) == sorted(digest(out[n]) for n in fp8)
    assert all(".layers." in n and not vision(n) for n in mods)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    mean, top1 = kl(ref, logits)
    print(f"{arch}: runtime ({fp8_mode(model)}) KL {mean:.4f} top-1 {top1:.2f}")
    assert 1e-4 < mean < RUNTIME_KL_BOUND


# ---------------------------------------------------------------- the generic rule

def test_unknown_model_type_warns_and_uses_the_generic_rule(families, tmp_path):
    f = families["llama"]
    src = tmp_path / "mystery"
    shutil.copytree(f.src, src)
    cfg = read_config(src)
    cfg["model_type"] = "mystery_lm"
    (src / "config.json").write_text(json.dumps(cfg))
    plan = make_plan(cfg, f.shapes, QuantizeOptions())
    assert len(plan.warnings) == 1 and "mystery_lm" in plan.warnings[0] and "generic" in plan.warnings[0]
    assert {e.name for e in plan.entries if e.quantize} == decoder_linears(f)
    res = quantize(src, tmp_path / "mystery-fp8", QuantizeOptions())
    assert res.plan.warnings == plan.warnings
    a, b = load_tensors(tmp_path / "mystery-fp8"), load_tensors(f.out)
    assert set(a) == set(b) and all(same_bytes(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- --quantize-vision

def test_quantize_vision_takes_vision_linears_whose_k_is_a_block_multiple(dense_src, tmp_path):
    shapes = header_shapes(dense_src)
    out = tmp_path / "vision-fp8"
    res = quantize(dense_src, out, QuantizeOptions(quantize_vision=True))
    entries = {e.name: e for e in res.plan.entries}
    vis_linears = {n: s for n, s in shapes.items()
                   if vision(n) and n.endswith(".weight") and len(s) == 2 and "embed" not in n}
    k_ok = {n for n, s in vis_linears.items() if s[1] % TILE == 0}
    k_bad = {n for n, s in vis_linears.items() if s[1] % TILE}
    assert k_ok and k_bad
    assert {n for n in k_bad if n.endswith("mlp.linear_fc2.weight")} == {
        f"model.visual.blocks.{b}.mlp.linear_fc2.weight" for b in range(2)}
    assert all(shapes[n][1] == 344 for n in k_bad if ".blocks." in n)
    n_bad = {n for n in k_ok if shapes[n][0] % TILE}          # linear_fc1 [344, 128]: a partial scale block
    assert n_bad
    for n in k_ok - n_bad:
        assert entries[n].quantize, n
    for n in n_bad:
        assert not entries[n].quantize and entries[n].group == "n not multiple of 128", n
    for n in k_bad:
        assert not entries[n].quantize and entries[n].group == "k not multiple of 128", n
    k_bad |= n_bad
    k_ok -= n_bad
    # everything else in the tower (patch embedding, position embedding, norms, biases) is kept
    for n in shapes:
        if vision(n) and n not in vis_linears:
            assert not entries[n].quantize, n
    t = load_tensors(out)
    text = {n for n in shapes if re.search(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", n)}
    assert {n for n, x in t.items() if x.dtype == FP8} == k_ok | text
    listed = set(read_config(out)["quantization_config"]["modules_to_not_convert"])
    assert {n.removesuffix(".weight") for n in k_bad} <= listed
    assert not {n.removesuffix(".weight") for n in k_ok} & listed


def test_quantize_vision_output_loads_in_fp8vl_runtime_with_codes_times_scale(dense_src, tmp_path):
    """The FP8 vision linears, through fp8vl's runtime, compute codes times their tile's scale."""
    from fp8vl.runtime.loader import load_fp8_model
    from helpers import expand_scales

    out = tmp_path / "vision-fp8"
    quantize(dense_src, out, QuantizeOptions(quantize_vision=True))
    t = load_tensors(out)
    model = load_fp8_model(out, mode="dequant")
    mods = dict(model.named_modules())
    vis = [n for n, x in t.items() if x.dtype == FP8 and vision(n)]
    assert vis
    for n in vis:
        m = mods[n.removesuffix(".weight")]
        assert torch.equal(m.weight.view(torch.uint8), t[n].view(torch.uint8)), n
        bias = m.bias.float() if m.bias is not None else 0.0
        w = (m(torch.eye(t[n].shape[1], dtype=torch.float32)) - bias).t()    # the dequantized weight
        expect = t[n].float() * expand_scales(t[n.replace(".weight", ".weight_scale_inv")], tuple(t[n].shape))
        assert torch.allclose(w, expect, rtol=0, atol=0), n


def test_linears_with_a_partial_output_block_stay_bf16_and_transformers_loads_the_output(tmp_path):
    """An output width that is not a multiple of 128 (SmolLM2's MLP, here gate/up [576, 256]) would
    need a partial last scale block, which Transformers refuses to load ("not divisible by scale
    grid") and vLLM refuses in merged layers: such linears stay BF16, listed, and the plan says why."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from fp8vl.apps.tiny import TEXT, train_tokenizer

    src = tmp_path / "smol"
    tok = train_tokenizer()
    cfg = tf.LlamaConfig(**dict(TEXT, intermediate_size=576), vocab_size=len(tok), tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    res = quantize(src, tmp_path / "smol-fp8", QuantizeOptions())
    groups = {e.name: e.group for e in res.plan.entries}
    for i in range(2):
        for p in ("gate_proj", "up_proj"):
            assert groups[f"model.layers.{i}.mlp.{p}.weight"] == "n not multiple of 128"
        assert groups[f"model.layers.{i}.mlp.down_proj.weight"] == "k not multiple of 128"
        assert groups[f"model.layers.{i}.self_attn.q_proj.weight"] == "language linears"
    listed = read_config(tmp_path / "smol-fp8")["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.mlp.gate_proj" in listed
    t = load_tensors(tmp_path / "smol-fp8")
    assert not any(x.dtype == FP8 and x.shape[0] % TILE for x in t.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol-fp8", dtype=torch.bfloat16)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


# ---------------------------------------------------------------- other source dtypes

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_sources_convert_to_the_reference(tmp_path, dtype):
    src = build_tiny(tmp_path / "src", "qwen3", dtype=dtype)
    out = tmp_path / "fp8"
    res = quantize(src, out, QuantizeOptions())
    s, o = load_tensors(src), load_tensors(out)
    linears = {e.name for e in res.plan.entries if e.quantize}
    assert len(linears) == 14 and all(s[n].dtype == dtype for n in linears)
    for n in linears:
        rq, rs = ref_block_quantize(s[n])
        assert same_bytes(o[n], rq) and same_bytes(o[n.replace(".weight", ".weight_scale_inv")], rs), n
    assert all(same_bytes(o[n], t) for n, t in s.items() if n not in linears)


@pytest.mark.parametrize("dtype", [
    torch.float32,
    torch.float16,
])
def test_compressed_tensors_scales_default_to_the_model_dtype(tmp_path, dtype):
    src = build_tiny(tmp_path / "src", "llama", dtype=dtype)
    out = tmp_path / "ct"
    quantize(src, out, QuantizeOptions(format="compressed-tensors"))
    scales = [t for n, t in load_tensors(out).items() if n.endswith(".weight_scale")]
    assert len(scales) == 14
    assert {t.dtype for t in scales} == {dtype}
