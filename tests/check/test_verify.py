"""``fp8vl verify``: good outputs pass with the right figures, each kind of broken checkpoint fails.

The figures of the report (per-tensor relative error and SQNR, kept tensors bit-identical, FP8
share) are recomputed here from the safetensors files with plain torch: each FP8 weight is
dequantized tile by tile (helpers.ref_dequantize) and compared with the source tensor, fused MoE
experts sliced with the axis order read off the config. Broken checkpoints are copies of a good
output edited with safetensors/json; the command is run as a user runs it (a subprocess), and must
exit 1 with a message naming the tensor or file at fault.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8vl import QuantizeOptions, quantize
from fp8vl.check.verify import verify
from helpers import (FP8, INDEX, expert_slices, load_tensors, popen_cli, read_config, ref_dequantize, run_cli,
                     same_bytes, tensor_files, text_config)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", FP8: "F8_E4M3"}
Q_PROJ = "model.language_model.layers.0.self_attn.q_proj"
VERIFY_BEGIN, VERIFY_END = "<!-- fp8vl:verify -->", "<!-- /fp8vl:verify -->"


# ---------------------------------------------------------------- independent figures

def source_weight(src: dict[str, torch.Tensor], cfg: dict, name: str) -> torch.Tensor:
    """The source [out, in] matrix of an FP8 weight; per-expert names are sliced from fused 3-D experts."""
    if name in src:
        return src[name]
    m = re.fullmatch(r"(?P<base>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight", name)
    assert m, f"{name}: neither in the source nor a per-expert name"
    tc = text_config(cfg)
    gate, up, down = expert_slices(src[m["base"] + ".gate_up_proj"], src[m["base"] + ".down_proj"],
                                   tc["hidden_size"], tc["moe_intermediate_size"], int(m["e"]))
    return {"gate_proj": gate, "up_proj": up, "down_proj": down}[m["proj"]]


def scale_of(out: dict[str, torch.Tensor], weight_name: str) -> torch.Tensor:
    module = weight_name.removesuffix(".weight")
    for suffix in ("weight_scale_inv", "weight_scale"):
        if f"{module}.{suffix}" in out:
            return out[f"{module}.{suffix}"]
    raise AssertionError(f"{weight_name}: no scale")


def expected_figures(out_dir: Path, src_dir: Path) -> tuple[dict[str, tuple[float, float]], int]:
    """{fp8 weight: (relative error, SQNR dB)} in float64, and the number of kept tensors whose bytes
    equal the source's."""
    out, src, cfg = load_tensors(out_dir), load_tensors(src_dir), read_config(src_dir)
    figures, kept = {}, 0
    for name, t in out.items():
        if t.dtype == FP8:
            x = source_weight(src, cfg, name).to(torch.float64)
            dq = ref_dequantize(t, scale_of(out, name)).to(torch.float64)
            err2, sig2 = float(((x - dq) ** 2).sum()), float((x ** 2).sum())
            figures[name] = (math.sqrt(err2 / sig2), 10 * math.log10(sig2 / err2))
        elif not name.endswith(("weight_scale_inv", "weight_scale")):
            kept += name in src and same_bytes(src[name], t)
    return figures, kept


def assert_figures_match(tensors: list, out_dir: Path, src_dir: Path, kept_identical: int) -> None:
    """``tensors``: the report's per-tensor list (dataclasses or JSON dicts)."""
    figures, kept = expected_figures(out_dir, src_dir)
    got = {(t["name"] if isinstance(t, dict) else t.name):
           ((t["rel_error"], t["sqnr_db"]) if isinstance(t, dict) else (t.rel_error, t.sqnr_db)) for t in tensors}
    assert set(got) == set(figures)
    for name, (rel, sqnr) in figures.items():
        assert got[name][0] == pytest.approx(rel, rel=1e-6), name
        assert got[name][1] == pytest.approx(sqnr, rel=1e-6), name
    n_kept = sum(1 for n, t in load_tensors(out_dir).items()
                 if t.dtype != FP8 and not n.endswith(("weight_scale_inv", "weight_scale")))
    assert kept == n_kept > 0          # every kept tensor of a good output equals the source's
    assert kept_identical == kept


def decoder_fp8_share(folder: Path) -> float:
    """FP8 elements among the decoder layers' linear weights (2-D, not norms, routers or vision), fused
    3-D experts counted as linear weights too."""
    t = load_tensors(folder)
    fp8 = sum(x.numel() for x in t.values() if x.dtype == FP8)
    linear = sum(x.numel() for n, x in t.items() if re.search(r"\.layers\.\d+\.", n) and n.endswith(".weight")
                 and x.ndim == 2 and "norm" not in n and not n.endswith("mlp.gate.weight")
                 and not n.startswith("model.visual."))
    fused = sum(x.numel() for n, x in t.items() if x.ndim == 3 and ".experts." in n)
    return fp8 / (linear + fused)


def errors(report) -> list[str]:
    return [c.message for c in report.checks if c.level == "error"]


# ---------------------------------------------------------------- editing checkpoints

def copy_output(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def replace_tensors(folder: Path, new: dict[str, torch.Tensor], fix_total: bool = True) -> None:
    """Rewrite the shards holding ``new``'s tensors; keep the index's total_size right unless told not to."""
    where = tensor_files(folder)
    for shard in sorted({where[n] for n in new}):
        sd = load_file(folder / shard)
        sd.update({n: t for n, t in new.items() if where[n] == shard})
        save_file(sd, folder / shard, metadata={"format": "pt"})
    if fix_total and (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in load_tensors(folder).values())
        (folder / INDEX).write_text(json.dumps(index, indent=2))


def edit_config(folder: Path, edit) -> None:
    cfg = read_config(folder)
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def first_vision_linear(cfg: dict) -> str:
    return next(n for n in cfg["quantization_config"]["modules_to_not_convert"]
                if n.startswith("model.visual.blocks."))


# ---------------------------------------------------------------- good outputs (API)

@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
def test_good_output_passes_with_figures_recomputed_from_the_files(request, kind):
    conv = request.getfixturevalue(f"{kind}_fp8")
    r = verify(conv.out, conv.src)
    assert r.ok, errors(r)
    assert r.format == "fp8"
    assert_figures_match(r.tensors, conv.out, conv.src, r.kept_identical)
    # FP8 share of the decoder's linear weights (experts split per expert: all FP8 in fp8vl's output)
    assert r.fp8_share == pytest.approx(decoder_fp8_share(conv.out), rel=1e-12)
    assert r.fp8_share > 0.5
    # bytes by dtype, recomputed from the files
    by_dtype: dict[str, int] = {}
    for t in load_tensors(conv.out).values():
        key = SAFETENSORS_DTYPES[t.dtype]
        by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    assert r.bytes_by_dtype == by_dtype


def test_good_output_passes_without_a_source_and_reports_the_figures_recorded_while_converting(tied_fp8, tmp_path):
    r = verify(tied_fp8.out)
    assert r.ok, errors(r)
    assert r.kept_identical is None and not any(c.name == "source" for c in r.checks)
    assert [t.name for t in r.tensors] == [e.name for e in tied_fp8.result.plan.entries if e.quantize]
    assert any(c.name == "recorded error" and c.level == "ok" for c in r.checks)
    bare = tmp_path / "bare"                       # an FP8 checkpoint without fp8vl's error file
    shutil.copytree(tied_fp8.out, bare)
    (bare / "fp8vl-errors.json").unlink()
    r = verify(bare)
    assert r.ok and r.tensors == [] and not any(c.name == "recorded error" for c in r.checks)


def test_multi_shard_output_passes_and_failures_name_the_right_shard(dense_src, tmp_path):
    out = tmp_path / "sharded"
    quantize(dense_src, out, QuantizeOptions(max_shard_size=1_500_000, workers=1))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2
    r = verify(out, dense_src)
    assert r.ok, errors(r)
    assert_figures_match(r.tensors, out, dense_src, r.kept_identical)

    # (3) in a later shard: a BF16 tensor under an FP8 name (it still has its weight_scale_inv)
    bad = copy_output(out, tmp_path / "bad")
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    shard = tensor_files(bad)[name]
    replace_tensors(bad, {name: load_tensors(dense_src)[name]})
    msgs = errors(verify(bad))
    hit = [m for m in msgs if name in m and "BF16" in m]
    assert hit, msgs
    assert shard in hit[0] and not any(s in hit[0] for s in shards if s != shard)


def test_compressed_tensors_output_passes(dense_src, tmp_path):
    out = tmp_path / "ct"
    quantize(dense_src, out, QuantizeOptions(format="compressed-tensors", workers=1))
    assert read_config(out)["quantization_config"]["quant_method"] == "compressed-tensors"
    assert any(n.endswith(".weight_scale") for n in load_tensors(out))
    r = verify(out, dense_src)
    assert r.ok, errors(r)
    assert r.format == "compressed-tensors"
    assert_figures_match(r.tensors, out, dense_src, r.kept_identical)


def test_compressed_tensors_output_with_a_vision_linear_missing_from_ignore_fails(dense_src, tmp_path):
    out = tmp_path / "ct"
    quantize(dense_src, out, QuantizeOptions(format="compressed-tensors", workers=1))
    gone = next(n for n in read_config(out)["quantization_config"]["ignore"] if n.startswith("model.visual.blocks."))
    edit_config(out, lambda c: c["quantization_config"]["ignore"].remove(gone))
    msgs = errors(verify(out))
    assert any(gone in m and "ignore" in m for m in msgs), msgs


def test_qwen_release_layout_passes(moe_src, tmp_path):
    """Qwen's FP8 releases: bfloat16 weight_scale_inv, only modules_to_not_convert (no ignored_layers)."""
    out = tmp_path / "qwen-layout"
    quantize(moe_src, out, QuantizeOptions(scale_dtype="bfloat16", workers=1))
    edit_config(out, lambda c: c["quantization_config"].pop("ignored_layers"))
    qc = read_config(out)["quantization_config"]
    assert "ignored_layers" not in qc and qc["modules_to_not_convert"]
    scales = [t for n, t in load_tensors(out).items() if n.endswith("weight_scale_inv")]
    assert scales and all(t.dtype == torch.bfloat16 for t in scales)
    r = verify(out, moe_src)
    assert r.ok, errors(r)
    assert_figures_match(r.tensors, out, moe_src, r.kept_identical)


def test_moe_with_fused_bf16_experts_is_mostly_bf16_and_flagged(moe_src, tmp_path):
    """The experts left fused and BF16 (listed, so no loader mistake): most decoder bytes are not FP8."""
    out = tmp_path / "experts-bf16"
    quantize(moe_src, out, QuantizeOptions(ignore=("re:.*mlp\\.experts",), workers=1))
    assert any(x.ndim == 3 and x.dtype == torch.bfloat16 for n, x in load_tensors(out).items() if ".experts." in n)
    share = decoder_fp8_share(out)
    assert 0 < share < 0.5
    r = verify(out)
    assert r.fp8_share == pytest.approx(share, rel=1e-12)
    assert any("mostly BF16" in m and f"{share:.0%}" in m for m in errors(r)), errors(r)


def test_damaged_fp8_values_are_caught_by_the_source_comparison(dense_fp8, tmp_path):
    """A scale doubled: structurally valid, numerically wrong; only --source sees it (SQNR ~0 dB)."""
    bad = copy_output(dense_fp8.out, tmp_path / "bad")
    name = f"{Q_PROJ}.weight_scale_inv"
    replace_tensors(bad, {name: load_tensors(bad)[name] * 2})
    assert verify(bad).ok
    r = verify(bad, dense_fp8.src)
    figures, _ = expected_figures(bad, dense_fp8.src)
    assert figures[f"{Q_PROJ}.weight"][1] < 20
    assert any(f"{Q_PROJ}.weight" in m and "SQNR" in m for m in errors(r)), errors(r)
    got = {t.name: t for t in r.tensors}[f"{Q_PROJ}.weight"]
    assert got.rel_error == pytest.approx(figures[f"{Q_PROJ}.weight"][0], rel=1e-6)
    assert got.sqnr_db == pytest.approx(figures[f"{Q_PROJ}.weight"][1], abs=1e-5)


def test_a_changed_vision_tensor_passes_the_structure_checks_alone(dense_fp8, tmp_path):
    """Case (2) needs --source: without it the checkpoint is structurally fine."""
    bad = copy_output(dense_fp8.out, tmp_path / "bad")
    name = "model.visual.blocks.0.attn.qkv.weight"
    w = load_tensors(bad)[name].clone()
    w[0, 0] += 1
    replace_tensors(bad, {name: w})
    assert verify(bad).ok
    assert any(name in m and "differs" in m for m in errors(verify(bad, dense_fp8.src)))


# ---------------------------------------------------------------- broken checkpoints through the CLI

def _broken(root: Path, good: Path, src: Path) -> dict[str, tuple[Path, list[str], tuple[str, ...]]]:
    """case -> (checkpoint, extra CLI args, fragments the failing check's message must contain)."""
    cases = {}
    shard = tensor_files(good)[f"{Q_PROJ}.weight"]

    p = copy_output(good, root / "zero-scale")                     # (1)
    s = load_tensors(p)[f"{Q_PROJ}.weight_scale_inv"].clone()
    s[0, 0] = 0
    s[1, 1] = 0
    replace_tensors(p, {f"{Q_PROJ}.weight_scale_inv": s})
    cases["scale zeroed"] = (p, [], (f"{Q_PROJ}.weight_scale_inv", "2 scale(s) zero"))

    p = copy_output(good, root / "vision-changed")                 # (2)
    name = "model.visual.blocks.1.mlp.linear_fc1.weight"
    w = load_tensors(p)[name].clone()
    w[3, 7] = -w[3, 7] + 0.5
    replace_tensors(p, {name: w})
    cases["vision tensor changed"] = (p, ["--source", str(src)], (name, "differs from the source", shard))

    p = copy_output(good, root / "bf16-under-fp8-name")            # (3)
    replace_tensors(p, {f"{Q_PROJ}.weight": load_tensors(src)[f"{Q_PROJ}.weight"]})
    cases["bf16 under an fp8 name"] = (p, [], (f"{Q_PROJ}.weight", shard, "BF16", "not F8_E4M3"))

    p = copy_output(good, root / "no-processor")                   # (4)
    (p / "preprocessor_config.json").unlink()
    (p / "processor_config.json").unlink()
    cases["processor files missing"] = (p, [], (str(p), "no processor file"))

    p = copy_output(good, root / "unlisted-vision")                # (5)
    gone = first_vision_linear(read_config(p))
    kept = load_tensors(p)[gone + ".weight"]
    assert kept.ndim == 2 and kept.dtype == torch.bfloat16     # a BF16 linear vLLM would now load as FP8

    def drop(c):
        for key in ("modules_to_not_convert", "ignored_layers"):
            c["quantization_config"][key].remove(gone)
    edit_config(p, drop)
    cases["name missing from modules_to_not_convert"] = (
        p, [], (gone, gone.replace("model.visual.", "visual.", 1), "modules_to_not_convert"))

    p = copy_output(good, root / "nan")                            # (6)
    q = load_tensors(p)[f"{Q_PROJ}.weight"].clone()
    q.view(torch.uint8)[2, 3] = 0x7F
    q.view(torch.uint8)[100, 200] = 0x7F
    q.view(torch.uint8)[200, 5] = 0xFF
    replace_tensors(p, {f"{Q_PROJ}.weight": q})
    cases["nan in an fp8 weight"] = (p, [], (f"{Q_PROJ}.weight", "3 NaN"))

    p = copy_output(good, root / "total-size")                     # (7)
    index = json.loads((p / INDEX).read_text())
    actual = sum(t.numel() * t.element_size() for t in load_tensors(p).values())
    assert index["metadata"]["total_size"] == actual
    index["metadata"]["total_size"] = actual + 4096
    (p / INDEX).write_text(json.dumps(index, indent=2))
    cases["index total_size wrong"] = (p, [], ("total_size", str(actual + 4096), str(actual)))

    p = root / "bf16-with-quantization-config"                     # (8)
    shutil.copytree(src, p)
    edit_config(p, lambda c: c.update(quantization_config=read_config(good)["quantization_config"]))
    cases["mostly bf16"] = (p, [], ("0%", "mostly BF16"))
    return cases


BROKEN = ("scale zeroed", "vision tensor changed", "bf16 under an fp8 name", "processor files missing",
          "name missing from modules_to_not_convert", "nan in an fp8 weight", "index total_size wrong",
          "mostly bf16")


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory, dense_fp8):
    """Every broken checkpoint verified by the real command, the subprocesses run side by side."""
    root = tmp_path_factory.mktemp("broken")
    cases = _broken(root, dense_fp8.out, dense_fp8.src)
    assert set(cases) == set(BROKEN)
    procs = {}
    for case, (path, extra, _) in cases.items():
        js = root / f"{path.name}.json"
        procs[case] = (popen_cli("verify", path, *extra, "--json", js, cwd=root), js)
    runs = {}
    for case, (proc, js) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[case] = (proc.returncode, stdout, stderr, js)
    return cases, runs


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_fails_with_exit_1_and_names_the_fault(broken_runs, case):
    cases, runs = broken_runs
    _, _, fragments = cases[case]
    rc, stdout, stderr, js = runs[case]
    assert rc == 1, (rc, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stdout + stderr
    assert "FAILED" in stdout and "PASSED" not in stdout
    report = json.loads(js.read_text())
    assert report["ok"] is False
    msgs = [c["message"] for c in report["checks"] if c["level"] == "error"]
    assert any(all(f in m for f in fragments) for m in msgs), (fragments, msgs)


def test_mostly_bf16_checkpoint_reports_its_fp8_share(broken_runs):
    cases, runs = broken_runs
    assert json.loads(runs["mostly bf16"][3].read_text())["fp8_share"] == 0.0
    assert not any(t.dtype == FP8 for t in load_tensors(cases["mostly bf16"][0]).values())


# ---------------------------------------------------------------- the command on a good output

def test_cli_json_chart_and_model_card_on_a_good_output(dense_fp8, tmp_path):
    out = tmp_path / "out"                 # converted with the error file, as hub conversions are
    quantize(dense_fp8.src, out, QuantizeOptions(workers=1, record_error=True))
    card_before = (out / "README.md").read_text()
    assert VERIFY_BEGIN not in card_before

    # first run: structure only, JSON on stdout, card section added
    r1 = run_cli("verify", out, "--json", "-", "--update-card", cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr
    j1 = json.loads(r1.stdout)
    assert j1["ok"] is True and j1["format"] == "fp8"
    fp8 = [e.name for e in dense_fp8.result.plan.entries if e.quantize]
    assert [t["name"] for t in j1["tensors"]] == fp8                 # recorded while converting
    assert all(t["max_rel_error"] > 0 for t in j1["tensors"])
    card1 = (out / "README.md").read_text()
    assert card1.startswith(card_before.rstrip("\n"))
    assert card1.count(VERIFY_BEGIN) == 1 and card1.count(VERIFY_END) == 1
    section1 = card1.split(VERIFY_BEGIN, 1)[1].split(VERIFY_END, 1)[0]
    assert "Per-tensor SQNR vs source, measured while converting" in section1
    for c in j1["checks"]:
        assert f"| {c['name']} | {c['level']}: {c['message']} |" in section1

    # second run: with the source, JSON file, chart; the section is replaced, not added again
    png, js = tmp_path / "sqnr.png", tmp_path / "report.json"
    r2 = run_cli("verify", out, "--source", dense_fp8.src, "--json", js, "--plot", png, "--update-card",
                 cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert "PASSED" in r2.stdout
    j2 = json.loads(js.read_text())
    assert j2["ok"] is True
    assert_figures_match(j2["tensors"], out, dense_fp8.src, j2["kept_identical"])
    card2 = (out / "README.md").read_text()
    assert card2.count(VERIFY_BEGIN) == 1 and card2.count(VERIFY_END) == 1
    assert card2.startswith(card_before.rstrip("\n"))
    section2 = card2.split(VERIFY_BEGIN, 1)[1].split(VERIFY_END, 1)[0]
    figures, _ = expected_figures(out, dense_fp8.src)
    worst = min(s for _, s in figures.values())
    mean = sum(s for _, s in figures.values()) / len(figures)
    assert f"mean {mean:.1f} dB, worst {worst:.1f} dB over {len(figures)} FP8 tensors" in section2

    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        # not a blank canvas: the chart has drawn pixels of several colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 10


def test_cli_json_on_stdout_stays_parseable_with_plot(dense_fp8, tmp_path):
    png = tmp_path / "sqnr.png"
    r = run_cli("verify", dense_fp8.out, "--source", dense_fp8.src, "--json", "-", "--plot", png, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert json.loads(r.stdout)["ok"] is True


# ---------------------------------------------------------------- NaN/Inf anywhere, tiny tiles, --plot

@pytest.mark.parametrize("name", ["lm_head.weight", "model.visual.blocks.0.attn.qkv.weight"])
def test_nan_or_inf_in_a_kept_tensor_fails_with_and_without_the_source(dense_fp8, tmp_path, name):
    """Source and output both damaged the same way (made by a tool that let it through): still an error."""
    src, out = copy_output(dense_fp8.src, tmp_path / "src"), copy_output(dense_fp8.out, tmp_path / "out")
    for folder, value in ((src, float("nan")), (out, float("nan"))):
        w = load_tensors(folder)[name].clone()
        w[1, 2] = value
        w[3, 4] = float("inf")
        replace_tensors(folder, {name: w})
    for r in (verify(out), verify(out, src)):
        assert not r.ok
        assert any(name in m and "2 NaN/Inf" in m for m in errors(r)), errors(r)


def test_sqnr_of_tiny_weights_is_finite_and_exact(tmp_path):
    """Weights of ~1e-39: their float32 squares underflow to 0; the SQNR must not come out infinite."""
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(3)
    tiny = "model.layers.0.mlp.down_proj.weight"
    tensors = {tiny: (torch.randn(256, 256, generator=g) * 1e-39).bfloat16(),
               "model.layers.0.mlp.up_proj.weight": torch.randn(256, 256, generator=g).bfloat16()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (src / "tokenizer.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    quantize(src, tmp_path / "out", QuantizeOptions())
    r = verify(tmp_path / "out", src)
    figures, _ = expected_figures(tmp_path / "out", src)
    got = {t.name: t for t in r.tensors}
    assert math.isfinite(got[tiny].sqnr_db) and math.isfinite(figures[tiny][1])
    assert got[tiny].sqnr_db == pytest.approx(figures[tiny][1], rel=1e-6)
    assert got[tiny].rel_error == pytest.approx(figures[tiny][0], rel=1e-6)


def test_plot_without_source_fails_before_any_check(dense_fp8, tmp_path):
    png = tmp_path / "sqnr.png"
    r = run_cli("verify", dense_fp8.out, "--plot", png, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--source" in lines[0]
    assert r.stdout.strip() == "" and not png.exists()           # no report printed: nothing was checked
