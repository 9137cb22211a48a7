"""fp8vl.quantize end to end on tiny Qwen3-VL checkpoints: bytes, files, config, Transformers, failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from fp8vl import FP8VLError, QuantizeOptions, quantize
from fp8vl.apps.tiny import build_tiny_qwen3_vl
from helpers import (BAD_CASES, FP8, INDEX, ROOT, astronaut, expand_scales, expert_slices, file_hashes,
                     language_linears, load_tensors, read_config, ref_block_quantize, same_bytes, tensor_files,
                     text_config, within_e4m3_bound)

REWRITTEN = {"config.json", "README.md", INDEX, "fp8vl-errors.json"}  # the only non-shard files fp8vl writes itself
KL_BOUND = 0.1          # mean next-token KL (nats), image+text prompt; measured 0.039 dense, 0.003 tied
PROMPT = "Describe this image concisely."


def assert_fp8_equals_reference(src_tensors, out_tensors, names, scale_dtype=torch.float32):
    for name in names:
        module = name.removesuffix(".weight")
        q, s = out_tensors[name], out_tensors[f"{module}.weight_scale_inv"]
        rq, rs = ref_block_quantize(src_tensors[name], scale_dtype)
        assert same_bytes(s, rs), f"{module}: scales differ from the reference"
        assert same_bytes(q, rq), f"{module}: FP8 codes differ from the reference"


def partial_dirs(parent):
    return [p.name for p in parent.iterdir() if "fp8vl-" in p.name] if parent.exists() else []


# ---------------------------------------------------------------- tensors

@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_fp8_weights_and_scales_equal_the_reference_bit_for_bit(converted, kind):
    c = converted[kind]
    src, out = load_tensors(c.src), load_tensors(c.out)
    assert_fp8_equals_reference(src, out, language_linears(read_config(c.src)))


@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_kept_tensors_are_byte_identical_to_the_source(converted, kind):
    c = converted[kind]
    src, out = load_tensors(c.src), load_tensors(c.out)
    kept = set(src) - language_linears(read_config(c.src))
    assert len(kept) > 50
    for name in kept:
        assert same_bytes(out[name], src[name]), name


@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_output_holds_every_source_tensor_plus_one_scale_per_fp8_weight(converted, kind):
    c = converted[kind]
    linears = language_linears(read_config(c.src))
    expect = set(load_tensors(c.src)) | {n.removesuffix(".weight") + ".weight_scale_inv" for n in linears}
    assert set(load_tensors(c.out)) == expect


def test_dtypes_are_e4m3_weights_and_float32_scales(dense_fp8):
    out = load_tensors(dense_fp8.out)
    linears = language_linears(read_config(dense_fp8.src))
    for name, t in out.items():
        if name in linears:
            assert t.dtype == FP8, name
            s = out[name.removesuffix(".weight") + ".weight_scale_inv"]
            assert s.dtype == torch.float32 and tuple(s.shape) == (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
        elif not name.endswith(".weight_scale_inv"):
            assert t.dtype == torch.bfloat16, name


def test_bfloat16_scales_are_stored_bf16_and_equal_the_reference(dense_src, tmp_path):
    quantize(dense_src, tmp_path / "out", QuantizeOptions(scale_dtype="bfloat16"))
    src, out = load_tensors(dense_src), load_tensors(tmp_path / "out")
    linears = language_linears(read_config(dense_src))
    assert {out[n.removesuffix(".weight") + ".weight_scale_inv"].dtype for n in linears} == {torch.bfloat16}
    assert_fp8_equals_reference(src, out, linears, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fp16_and_fp32_sources_convert_to_the_reference(tmp_path, dtype):
    src = build_tiny_qwen3_vl(tmp_path / "src", "dense", dtype=dtype)
    quantize(src, tmp_path / "out", QuantizeOptions())
    s, o = load_tensors(src), load_tensors(tmp_path / "out")
    linears = language_linears(read_config(src))
    assert {s[n].dtype for n in linears} == {dtype}
    assert_fp8_equals_reference(s, o, linears)
    for name in set(s) - linears:
        assert same_bytes(o[name], s[name]), name


def test_tensors_larger_than_one_job_are_quantized_chunk_by_chunk_exactly(tmp_path):
    """Row chunks (4 MB of source per job) must join seamlessly, the last chunk shorter than the others."""
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(7)
    tensors = {"model.layers.0.mlp.down_proj.weight": torch.randn(1152, 1024, generator=g),           # f32, 4.7 MB
               "model.layers.0.mlp.up_proj.weight": torch.randn(9088, 256, generator=g).bfloat16(),   # 4.7 MB
               "model.norm.weight": torch.ones(1024)}
    from safetensors.torch import save_file
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    quantize(src, tmp_path / "out", QuantizeOptions(workers=2))
    out = load_tensors(tmp_path / "out")
    assert_fp8_equals_reference(tensors, out, [n for n in tensors if "layers" in n])
    assert same_bytes(out["model.norm.weight"], tensors["model.norm.weight"])


# ---------------------------------------------------------------- files, config, index, card

@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_every_non_weight_file_is_copied_byte_for_byte(converted, kind):
    c = converted[kind]
    def others(folder):
        return {k: v for k, v in file_hashes(folder).items() if not k.endswith(".safetensors") and k not in REWRITTEN}
    src = others(c.src)
    assert {"tokenizer.json", "preprocessor_config.json", "video_preprocessor_config.json",
            "chat_template.jinja", "generation_config.json"} <= set(src)
    assert others(c.out) == src


@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_config_gains_exactly_the_fp8_quantization_config(converted, kind):
    c = converted[kind]
    cfg, src_cfg = read_config(c.out), read_config(c.src)
    qc = cfg.pop("quantization_config")
    assert cfg == src_cfg
    listed = qc["modules_to_not_convert"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128], "modules_to_not_convert": listed, "ignored_layers": listed}
    out = load_tensors(c.out)
    kept_matrices = {n.removesuffix(".weight") for n, t in out.items()
                     if n.endswith(".weight") and t.dtype != FP8 and t.ndim >= 2}
    assert "lm_head" in listed and len(listed) == len(set(listed))
    assert set(listed) == kept_matrices | {"lm_head"}


def test_index_covers_exactly_the_shard_tensors_and_their_bytes(dense_fp8):
    index = json.loads((dense_fp8.out / INDEX).read_text())
    on_disk = tensor_files(dense_fp8.out)
    assert index["weight_map"] == on_disk
    assert set(index["weight_map"].values()) == {p.name for p in dense_fp8.out.glob("*.safetensors")}
    total = sum(t.numel() * t.element_size() for t in load_tensors(dense_fp8.out).values())
    assert index["metadata"]["total_size"] == total


def test_model_card_front_matter_names_base_model_relation_and_source_license(dense_fp8):
    text = (dense_fp8.out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == dense_fp8.src.name
    assert meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"
    assert "license: apache-2.0" in (dense_fp8.src / "README.md").read_text()


def test_rerun_to_another_folder_is_byte_identical(dense_fp8, tmp_path):
    quantize(dense_fp8.src, tmp_path / "again", QuantizeOptions(workers=1))
    first, again = file_hashes(dense_fp8.out), file_hashes(tmp_path / "again")
    first.pop("README.md"), again.pop("README.md")
    assert again == first


def test_source_folder_is_unchanged(dense_src, tmp_path):
    before = file_hashes(dense_src)
    quantize(dense_src, tmp_path / "out", QuantizeOptions())
    assert file_hashes(dense_src) == before


def test_dry_run_writes_nothing_and_returns_the_plan(dense_src, tmp_path):
    res = quantize(dense_src, tmp_path / "out", QuantizeOptions(dry_run=True))
    assert list(tmp_path.iterdir()) == []
    assert {e.name for e in res.plan.entries if e.quantize} == language_linears(read_config(dense_src))
    assert res.bytes_out < res.bytes_in


def test_progress_reports_every_source_byte(dense_src, tmp_path):
    seen = []
    res = quantize(dense_src, tmp_path / "out", QuantizeOptions(), progress=lambda d, t: seen.append((d, t)))
    assert seen == sorted(seen) and seen[-1] == (res.bytes_in, res.bytes_in)
    assert res.bytes_in == sum(t.numel() * t.element_size() for t in load_tensors(dense_src).values())


# ---------------------------------------------------------------- several shards

@pytest.fixture(scope="module")
def dense_sharded(dense_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "out"
    quantize(dense_src, out, QuantizeOptions(max_shard_size=1_000_000))
    return out


def test_small_max_shard_size_gives_several_consistent_shards(dense_sharded, dense_fp8):
    shards = sorted(p.name for p in dense_sharded.glob("*.safetensors"))
    assert len(shards) >= 4
    index = json.loads((dense_sharded / INDEX).read_text())
    assert index["weight_map"] == tensor_files(dense_sharded)
    assert set(index["weight_map"].values()) == set(shards)
    tensors = load_tensors(dense_sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name in tensors:   # a weight and its scale share a shard
        if name.endswith(".weight_scale_inv"):
            assert index["weight_map"][name] == index["weight_map"][name.replace("_scale_inv", "")]
    single = load_tensors(dense_fp8.out)
    assert set(tensors) == set(single) and all(same_bytes(tensors[n], single[n]) for n in single)


def test_transformers_loads_sharded_output_like_the_single_shard_one(dense_sharded, hf_models):
    from fp8vl.check.evaluate import logits_for
    from fp8vl.runtime.loader import encode, load_hf_model

    one, many = hf_models("dense", "fp8"), load_hf_model(dense_sharded)
    batch = encode(one, PROMPT, astronaut())
    assert torch.equal(logits_for(many, batch), logits_for(one, batch))


# ---------------------------------------------------------------- Transformers

@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_transformers_next_token_kl_to_source_is_small_but_nonzero(hf_models, kind):
    from fp8vl.check.evaluate import compare_models

    m = compare_models(hf_models(kind, "src"), hf_models(kind, "fp8"), PROMPT, astronaut())
    print(f"{kind}: KL mean {m['kl_mean']:.4f} max {m['kl_max']:.4f} top-1 {m['top1']:.3f} over {m['tokens']}")
    assert m["tokens"] > 16          # the image's tokens are in the prompt
    assert 1e-4 < m["kl_mean"] < KL_BOUND
    assert m["top1"] >= 0.7


@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_transformers_vision_tower_equals_source_bit_for_bit(hf_models, kind):
    src = dict(hf_models(kind, "src").model.model.visual.named_parameters())
    fp8 = dict(hf_models(kind, "fp8").model.model.visual.named_parameters())
    assert len(src) > 40 and set(fp8) == set(src)
    for name, p in src.items():
        assert same_bytes(fp8[name].detach(), p.detach()), name


def test_transformers_reads_each_fp8_linear_as_codes_times_block_scale(hf_models, dense_fp8):
    model = hf_models("dense", "fp8").model
    out = load_tensors(dense_fp8.out)
    params = dict(model.named_parameters())
    for name in language_linears(read_config(dense_fp8.src)):
        q, s = out[name], out[name.replace(".weight", ".weight_scale_inv")]
        expect = (q.float() * expand_scales(s, tuple(q.shape))).to(torch.bfloat16)
        assert torch.equal(params[name].detach(), expect), name


def test_tied_output_writes_no_lm_head_and_keeps_the_tie(tied_fp8, hf_models):
    assert "lm_head.weight" not in load_tensors(tied_fp8.out)
    cfg = read_config(tied_fp8.out)
    assert cfg["tie_word_embeddings"] is True and text_config(cfg)["tie_word_embeddings"] is True
    model = hf_models("tied", "fp8").model
    embed = model.model.language_model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, embed)
    assert same_bytes(embed.detach(), load_tensors(tied_fp8.src)["model.language_model.embed_tokens.weight"])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_fp8vl_error_naming_it_and_writes_nothing(bad_inputs, case):
    bad = bad_inputs[case]
    before = sorted(p.name for p in bad.output.parent.iterdir()) if bad.output.parent.exists() else None
    with pytest.raises(FP8VLError) as ei:
        quantize(bad.source, bad.output, QuantizeOptions())
    for fragment in bad.fragments:
        assert fragment in str(ei.value)
    after = sorted(p.name for p in bad.output.parent.iterdir()) if bad.output.parent.exists() else None
    assert after == before
    if case == "output not empty":
        assert [p.name for p in bad.output.iterdir()] == ["keep-me.txt"]


def test_non_finite_source_weight_fails_naming_the_tensor_and_leaves_nothing(dense_src, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(dense_src, src)
    sd = load_file(src / "model.safetensors")
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    sd[name][3, 5] = float("inf")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out_parent = tmp_path / "parent"
    with pytest.raises(FP8VLError, match=name.replace(".", r"\.")):
        quantize(src, out_parent / "out", QuantizeOptions(workers=1))
    assert list(out_parent.iterdir()) == []


def test_overwrite_replaces_a_non_empty_output(dense_fp8, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")       # an earlier checkpoint: --overwrite replaces only those
    (out / "stale.txt").write_text("old")
    quantize(dense_fp8.src, out, QuantizeOptions(overwrite=True))
    got, first = file_hashes(out), file_hashes(dense_fp8.out)
    got.pop("README.md"), first.pop("README.md")
    assert got == first
    assert partial_dirs(tmp_path) == []


# ---------------------------------------------------------------- interruption

INTERRUPT = r"""
import sys
from fp8vl import QuantizeOptions, quantize
calls = []
def progress(done, total):
    calls.append(done)
    if len(calls) == 3:
        raise KeyboardInterrupt
try:
    quantize(sys.argv[1], sys.argv[2], QuantizeOptions(workers=int(sys.argv[3])), progress=progress)
except KeyboardInterrupt:
    print("INTERRUPTED")
else:
    print("RETURNED")
"""


@pytest.mark.parametrize("workers", [2, 1])
def test_keyboard_interrupt_from_progress_leaves_no_output(dense_src, tmp_path, workers):
    """Run in a child process: the failure mode being guarded against includes a hang."""
    out = tmp_path / "parent" / "out"
    try:
        r = subprocess.run([sys.executable, "-c", INTERRUPT, str(dense_src), str(out), str(workers)],
                           capture_output=True, text=True, timeout=20, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("quantize hung after KeyboardInterrupt in progress()")
    assert "INTERRUPTED" in r.stdout, r.stdout + r.stderr[-2000:]
    assert not out.exists()
    assert partial_dirs(out.parent) == []


# ---------------------------------------------------------------- MoE

def moe_sizes(src):
    tc = text_config(read_config(src))
    return tc["hidden_size"], tc["moe_intermediate_size"], tc["num_hidden_layers"]


def test_moe_experts_are_written_per_expert_with_block_scales(moe_fp8):
    h, i, layers = moe_sizes(moe_fp8.src)
    src, out = load_tensors(moe_fp8.src), load_tensors(moe_fp8.out)
    n_exp = src["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape[0]
    tc = text_config(read_config(moe_fp8.src))
    assert n_exp == tc.get("num_experts", tc.get("num_local_experts"))
    got = {n for n in out if ".mlp.experts." in n}
    expect = set()
    for n in range(layers):
        for e in range(n_exp):
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                base = f"model.language_model.layers.{n}.mlp.experts.{e}.{proj}"
                expect |= {f"{base}.weight", f"{base}.weight_scale_inv"}
                assert out[f"{base}.weight"].dtype == FP8 and tuple(out[f"{base}.weight"].shape) == shape
                assert out[f"{base}.weight_scale_inv"].dtype == torch.float32
                assert tuple(out[f"{base}.weight_scale_inv"].shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert got == expect


def test_moe_source_slices_are_what_transformers_computes_with(moe_src):
    """The independent slicing (helpers.expert_slices) agrees with Transformers' own expert forward."""
    from transformers import AutoModelForImageTextToText

    h, i, _ = moe_sizes(moe_src)
    model = AutoModelForImageTextToText.from_pretrained(moe_src, dtype=torch.float32)
    experts = model.model.language_model.layers[1].mlp.experts
    src = load_tensors(moe_src)
    gu = src["model.language_model.layers.1.mlp.experts.gate_up_proj"].float()
    dn = src["model.language_model.layers.1.mlp.experts.down_proj"].float()
    x = torch.randn(5, h, generator=torch.Generator().manual_seed(0))
    for e in range(gu.shape[0]):
        gate, up, down = expert_slices(gu, dn, h, i, e)
        want = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        with torch.no_grad():
            got = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_moe_expert_weights_dequantize_to_the_source_slice(moe_fp8):
    h, i, layers = moe_sizes(moe_fp8.src)
    src, out = load_tensors(moe_fp8.src), load_tensors(moe_fp8.out)
    for n in range(layers):
        base = f"model.language_model.layers.{n}.mlp.experts"
        gu, dn = src[f"{base}.gate_up_proj"], src[f"{base}.down_proj"]
        for e in range(gu.shape[0]):
            for proj, w in zip(("gate_proj", "up_proj", "down_proj"), expert_slices(gu, dn, h, i, e)):
                q, s = out[f"{base}.{e}.{proj}.weight"], out[f"{base}.{e}.{proj}.weight_scale_inv"]
                assert within_e4m3_bound(w, q, s).all(), f"{base}.{e}.{proj}"
                rq, rs = ref_block_quantize(w)
                assert same_bytes(q, rq) and same_bytes(s, rs), f"{base}.{e}.{proj}"


def test_moe_router_is_kept_bf16_and_listed(moe_fp8):
    src, out = load_tensors(moe_fp8.src), load_tensors(moe_fp8.out)
    listed = read_config(moe_fp8.out)["quantization_config"]["modules_to_not_convert"]
    routers = [n for n in src if n.endswith(".mlp.gate.weight")]
    assert len(routers) == moe_sizes(moe_fp8.src)[2]
    for r in routers:
        assert out[r].dtype == torch.bfloat16 and same_bytes(out[r], src[r])
        assert r.removesuffix(".weight") in listed


def test_moe_output_has_no_3d_tensor_and_no_fused_experts(moe_fp8):
    out = load_tensors(moe_fp8.out)
    assert [n for n, t in out.items() if t.ndim == 3] == []
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in out)


def test_moe_kept_tensors_are_byte_identical(moe_fp8):
    src, out = load_tensors(moe_fp8.src), load_tensors(moe_fp8.out)
    linears = language_linears(read_config(moe_fp8.src), moe=True)
    kept = [n for n in src if n not in linears and src[n].ndim != 3]
    assert_fp8_equals_reference(src, out, linears)
    for n in kept:
        assert same_bytes(out[n], src[n]), n


# ---------------------------------------------------------------- non-finite values and scale overflow

@pytest.mark.parametrize("kept", ["lm_head.weight", "model.visual.blocks.0.attn.qkv.weight",
                                  "model.language_model.norm.weight"])
def test_non_finite_kept_tensor_fails_naming_it_and_leaves_nothing(dense_src, tmp_path, kept):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(dense_src, src)
    sd = load_file(src / "model.safetensors")
    sd[kept].view(-1)[sd[kept].numel() // 2] = float("nan") if "visual" in kept else float("-inf")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out_parent = tmp_path / "parent"
    with pytest.raises(FP8VLError) as ei:
        quantize(src, out_parent / "out", QuantizeOptions(workers=2))
    assert kept in str(ei.value) and "NaN" in str(ei.value), ei.value
    assert list(out_parent.iterdir()) == []


def test_finite_weights_too_large_for_a_float16_scale_say_so(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    w = torch.randn(256, 256).bfloat16()
    w[7, 9] = 1e8                       # finite; 1e8 / 448 does not fit float16 (max 65504)
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({name: w}, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(FP8VLError) as ei:
        quantize(src, tmp_path / "out", QuantizeOptions(scale_dtype="float16"))
    msg = str(ei.value)
    assert name in msg and "float16" in msg and "overflow" in msg and "non-finite" not in msg, msg
    quantize(src, tmp_path / "out", QuantizeOptions(scale_dtype="bfloat16"))   # the fix the message gives


def test_error_file_only_where_asked(dense_src, tmp_path):
    """Measuring each tensor's error costs more than quantizing it, so a local conversion records it
    only with record_error (hub conversions always do: their source is gone afterwards)."""
    from fp8vl.check.verify import verify

    plain = tmp_path / "plain"
    res = quantize(dense_src, plain, QuantizeOptions(workers=1))
    assert not (plain / "fp8vl-errors.json").exists() and not res.errors
    assert not any(c.name == "recorded error" for c in verify(plain).checks)
    rec = tmp_path / "rec"
    res = quantize(dense_src, rec, QuantizeOptions(workers=1, record_error=True))
    assert (rec / "fp8vl-errors.json").is_file() and res.errors
    # the same FP8 bytes either way
    assert {p.name: p.read_bytes() for p in plain.glob("*.safetensors")} == \
        {p.name: p.read_bytes() for p in rec.glob("*.safetensors")}
