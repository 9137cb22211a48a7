"""``fp8vl dequantize``: FP8 block checkpoints (both formats) back to BF16, and round trips through it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8vl import FP8VLError, QuantizeOptions, quantize
from fp8vl.conversion.dequantize import dequantize
from fp8vl.options import DequantizeOptions
from helpers import (FP8, INDEX, expand_scales, file_hashes, load_tensors, read_config, run_cli, same_bytes,
                     text_config)

SCALES = (".weight_scale_inv", ".weight_scale")
NON_WEIGHT = {"chat_template.jinja", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "video_preprocessor_config.json"}


def scale_of(tensors: dict, name: str) -> torch.Tensor:
    module = name.removesuffix(".weight")
    return next(tensors[module + s] for s in SCALES if module + s in tensors)


def assert_same_checkpoint(a: dict, b: dict) -> None:
    """Every tensor present in both, with the same dtype, shape and bytes."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    bad = [n for n in a if not same_bytes(a[n], b[n])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory, dense_src, dense_fp8, moe_fp8):
    """kind -> (first FP8 copy, its dequantized copy, the FP8 copy of that)."""
    root = tmp_path_factory.mktemp("dequant")
    out = {}
    firsts = {"dense": (dense_fp8.out, {}), "moe": (moe_fp8.out, {})}
    for kind, opts in (("bf16-scales", {"scale_dtype": "bfloat16"}), ("compressed-tensors",
                                                                      {"format": "compressed-tensors"})):
        first = root / f"{kind}-fp8"
        quantize(dense_src, first, QuantizeOptions(**opts))
        firsts[kind] = (first, opts)
    for kind, (first, opts) in firsts.items():
        bf16 = dequantize(first, root / f"{kind}-bf16")
        again = root / f"{kind}-fp8-again"
        quantize(bf16, again, QuantizeOptions(**opts))
        out[kind] = (first, bf16, again)
    return out


KINDS = ["dense", "moe", "bf16-scales", "compressed-tensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_dequantize_quantize_gives_identical_fp8_bytes(round_trips, kind):
    first, _, again = round_trips[kind]
    a, b = load_tensors(first), load_tensors(again)
    fp8 = [n for n, t in a.items() if t.dtype == FP8]
    assert len(fp8) >= 14
    for name in fp8:
        assert same_bytes(b[name], a[name]), name
    assert_same_checkpoint(a, b)           # scales and kept tensors too
    assert read_config(again)["quantization_config"] == read_config(first)["quantization_config"]


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_values_are_codes_times_scale(round_trips, kind):
    first, bf16, _ = round_trips[kind]
    q, d = load_tensors(first), load_tensors(bf16)
    for name, t in q.items():
        if name.endswith(SCALES):
            assert name not in d
        elif t.dtype == FP8:
            s = scale_of(q, name)
            expect = (t.float() * expand_scales(s, tuple(t.shape))).to(torch.bfloat16)
            assert torch.equal(d[name], expect), name
        else:
            assert same_bytes(d[name], t), name      # kept tensors copied unchanged
    assert set(d) == {n for n in q if not n.endswith(SCALES)}


@pytest.mark.parametrize("kind", KINDS)
def test_output_has_no_quantization_config_and_no_fp8(round_trips, kind):
    first, bf16, _ = round_trips[kind]
    cfg, qcfg = read_config(bf16), read_config(first)
    assert "quantization_config" not in cfg and "quantization_config" not in text_config(cfg)
    assert cfg == {k: v for k, v in qcfg.items() if k != "quantization_config"}
    index = json.loads((bf16 / INDEX).read_text())
    tensors = load_tensors(bf16)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not [n for n, t in tensors.items() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]


def test_non_weight_files_survive_byte_for_byte(round_trips):
    first, bf16, _ = round_trips["dense"]
    a, b = file_hashes(first), file_hashes(bf16)
    assert NON_WEIGHT <= set(a)
    assert {f: b.get(f) for f in NON_WEIGHT} == {f: a[f] for f in NON_WEIGHT}


def test_moe_experts_stay_split_per_expert(round_trips):
    first, bf16, _ = round_trips["moe"]
    d = load_tensors(bf16)
    assert not [n for n, t in d.items() if t.ndim == 3]
    experts = [n for n in d if ".mlp.experts." in n]
    cfg = text_config(read_config(first))
    assert len(experts) == cfg["num_hidden_layers"] * cfg.get("num_experts", cfg.get("num_local_experts")) * 3
    assert all(d[n].dtype == torch.bfloat16 and d[n].ndim == 2 for n in experts)


def test_transformers_loads_the_dequantized_model_like_the_fp8_one(round_trips, hf_models):
    from fp8vl.check.evaluate import logits_for
    from fp8vl.runtime.loader import encode, load_hf_model
    from helpers import astronaut

    _, bf16, _ = round_trips["dense"]
    plain = load_hf_model(bf16)
    fp8 = hf_models("dense", "fp8")              # Transformers dequantizes FP8 on a CPU: the same weights
    params, ref = dict(plain.model.named_parameters()), dict(fp8.model.named_parameters())
    assert set(params) == set(ref) and all(torch.equal(params[n], ref[n]) for n in ref)
    batch = encode(plain, "Describe this image concisely.", astronaut())
    assert torch.equal(logits_for(plain, batch), logits_for(fp8, batch))


def test_float32_output_is_exactly_codes_times_scale(dense_fp8, tmp_path):
    out = dequantize(dense_fp8.out, tmp_path / "f32", DequantizeOptions(dtype="float32"))
    q, d = load_tensors(dense_fp8.out), load_tensors(out)
    fp8 = [n for n, t in q.items() if t.dtype == FP8]
    for name in fp8:
        assert d[name].dtype == torch.float32
        assert torch.equal(d[name], q[name].float() * expand_scales(scale_of(q, name), tuple(q[name].shape)))
    assert all(same_bytes(d[n], t) for n, t in q.items() if t.dtype != FP8 and not n.endswith(SCALES))


def test_cli_writes_what_the_api_writes(round_trips, tmp_path):
    first, api, _ = round_trips["dense"]
    out = tmp_path / "cli-bf16"
    r = run_cli("dequantize", first, out, "--workers", "1", "--max-shard-size", "1MB", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "bfloat16" in r.stdout
    assert len(list(out.glob("*.safetensors"))) > 1             # sharded by --max-shard-size
    assert_same_checkpoint(load_tensors(out), load_tensors(api))
    assert read_config(out) == read_config(api)


def test_source_that_is_not_quantized_is_refused(dense_src, tmp_path):
    with pytest.raises(FP8VLError, match="not quantized"):
        dequantize(dense_src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_dtype_is_refused(dense_fp8, tmp_path):
    with pytest.raises(FP8VLError, match="float8"):
        dequantize(dense_fp8.out, tmp_path / "out", DequantizeOptions(dtype="float8"))


def test_fp8_tensor_without_scale_fails_naming_it_and_writes_nothing(dense_fp8, tmp_path):
    src = tmp_path / "no-scale"
    shutil.copytree(dense_fp8.out, src)
    shard = next(src.glob("*.safetensors"))
    sd = load_file(shard)
    victim = "model.language_model.layers.1.self_attn.o_proj"
    del sd[victim + ".weight_scale_inv"]
    save_file(sd, shard, metadata={"format": "pt"})
    index = json.loads((src / INDEX).read_text())
    del index["weight_map"][victim + ".weight_scale_inv"]
    (src / INDEX).write_text(json.dumps(index))
    with pytest.raises(FP8VLError, match=victim + ".weight"):
        dequantize(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dequantized_output_has_a_card_of_its_own(round_trips):
    first, bf16, _ = round_trips["dense"]
    text = (bf16 / "README.md").read_text()
    import yaml

    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and "dequantized" in meta["tags"] and "fp8" not in meta["tags"]
    assert "fp8vl dequantize" in text and f"{first.name}" in text and "bfloat16" in text
    assert str(first.parent) not in text and str(bf16.parent) not in text
    assert "FP8 copy of" not in text           # not the FP8 card carried over


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_reaches_its_total(dense_fp8, tmp_path, workers):
    """Every byte the total counts is reported by a job (scales are read with their weights, not
    counted), so a progress bar ends at 100%: in the plain loop (one worker) and on the pool."""
    seen = []
    dequantize(dense_fp8.out, tmp_path / "bf16", DequantizeOptions(workers=workers),
               progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)
