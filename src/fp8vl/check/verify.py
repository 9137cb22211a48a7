"""``fp8vl verify``: is an FP8 checkpoint what the loaders expect, and how far is it from its source?

Works on fp8vl's output, on compressed-tensors FP8_BLOCK output and on Qwen's/DeepSeek's released
layout. Structure checks need only the checkpoint; with a source, every FP8 tensor is dequantized
and compared (relative error, SQNR) and every kept tensor compared byte for byte.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint.compat import checkpoint_findings
from ..checkpoint.formats import SCALE_SUFFIXES, scale_suffix
from ..kernels.numerics import BLOCK, all_finite, cdiv, dequantize_weight, non_finite_count
from ..options import QuantizeOptions
from ..checkpoint.plan import LAYER, VISION_PARTS, make_plan
from ..checkpoint.shards import TensorInfo, read_bytes, read_matrix, read_rows
from ..checkpoint.source import Checkpoint, local_folder, locate, open_checkpoint, resolve
from ..checkpoint.tp import SIZES, summarize, tp_report

SCALE_NAMES = SCALE_SUFFIXES
SCAN_BYTES = 64 << 20
# vLLM's renaming of Qwen3-VL / Qwen2.5-VL checkpoint names (its hf_to_vllm_mapper).
VLLM_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "language_model.model."),
                 ("lm_head.", "language_model.lm_head."))


@dataclass
class Check:
    level: str      # "ok", "warning" or "error"
    name: str
    message: str


@dataclass
class TensorError:
    name: str
    rel_error: float
    sqnr_db: float
    max_rel_error: float | None = None      # recorded while converting (fp8vl-errors.json)


@dataclass
class Report:
    path: str
    format: str
    checks: list[Check] = field(default_factory=list)
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    fp8_share: float = 0.0          # share of decoder-linear elements stored as FP8
    tp: dict = field(default_factory=dict)
    tensors: list[TensorError] = field(default_factory=list)   # with a source only
    kept_identical: int | None = None
    skipped: list[str] = field(default_factory=list)   # requested checks that did not run ("vllm": no engine)

    @property
    def ok(self) -> bool:
        return not any(c.level == "error" for c in self.checks)

    def add(self, level: str, name: str, message: str) -> None:
        self.checks.append(Check(level, name, message))

    def to_json(self) -> str:
        d = asdict(self)
        d["ok"] = self.ok
        d["tp"] = {"max_tp": self.tp.get("max_tp"), "summary": summarize(self.tp)} if self.tp else {}
        return json.dumps(d, indent=2)


def vllm_name(name: str) -> str:
    for hf, vl in VLLM_PREFIXES:
        if name.startswith(hf):
            return vl + name[len(hf):]
    return name


def _fmt(qc: dict) -> str:
    return "fp8" if qc.get("quant_method") == "fp8" else qc.get("quant_method", "none")


def _check_config(r: Report, qc: dict) -> tuple[list[str], str]:
    """quantization_config as the loaders read it; returns (not-converted list, scale suffix)."""
    if r.format == "fp8":
        if qc.get("weight_block_size") != [BLOCK, BLOCK]:
            r.add("error", "config", f"weight_block_size is {qc.get('weight_block_size')}, expected [128, 128]")
        if qc.get("activation_scheme") != "dynamic":
            r.add("error", "config", f"activation_scheme is {qc.get('activation_scheme')!r}, expected 'dynamic'")
        if qc.get("fmt", "e4m3") != "e4m3":
            r.add("error", "config", f"fmt is {qc.get('fmt')!r}, expected 'e4m3'")
        skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
        if qc.get("ignored_layers") and qc.get("modules_to_not_convert") and \
                qc["ignored_layers"] != qc["modules_to_not_convert"]:
            r.add("warning", "config", "ignored_layers and modules_to_not_convert differ")
        return skip, scale_suffix("fp8")
    if r.format == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        w = groups[0].get("weights", {}) if groups else {}
        a = groups[0].get("input_activations") or {} if groups else {}
        if qc.get("format") != "float-quantized" or w.get("strategy") != "block" or \
                w.get("block_structure") != [BLOCK, BLOCK] or w.get("num_bits") != 8:
            r.add("error", "config", "compressed-tensors config is not FP8_BLOCK 128x128 float-quantized")
        if not a.get("dynamic") or a.get("strategy") != "group" or a.get("group_size") != BLOCK:
            r.add("error", "config", "input activations are not dynamic per-token groups of 128")
        return qc.get("ignore") or [], scale_suffix("compressed-tensors")
    r.add("error", "config", f"config.json: quantization_config quant_method {qc.get('quant_method')!r} is "
                             f"neither 'fp8' nor 'compressed-tensors' (is this an FP8 checkpoint?)")
    return [], scale_suffix("fp8")


def _listed(module: str, skip: list[str]) -> bool:
    names = set(skip) | {vllm_name(s) for s in skip}
    if module in names or vllm_name(module) in names:
        return True
    return any(s.startswith("re:") and re.match(s[3:], module) for s in skip)


def _is_decoder_linear(name: str, shape: tuple[int, ...]) -> bool:
    parts = set(name.split("."))
    return (len(shape) == 2 and name.endswith(".weight") and bool(LAYER.search(name))
            and not (parts & VISION_PARTS) and "norm" not in name and not name.endswith("mlp.gate.weight"))


def _non_finite(t: TensorInfo) -> int:
    """NaN/Inf values in a tensor of any floating dtype (0 for integer tensors), 64 MB at a time."""
    if not t.torch_dtype.is_floating_point:
        return 0
    bad = 0
    for at in range(0, t.nbytes, SCAN_BYTES):
        chunk = read_bytes(t.file, t.offset + at, min(SCAN_BYTES, t.nbytes - at)).view(t.torch_dtype)
        if not all_finite(chunk):
            bad += non_finite_count(chunk)
    return bad


def check_structure(ckpt: Checkpoint, r: Report) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """All structure checks; returns {weight name: (fp8 weight, scale)}."""
    qc = ckpt.config.get("quantization_config")
    if not qc:
        r.add("error", "config", f"{ckpt.path / 'config.json'}: no quantization_config: not a quantized "
                                 f"checkpoint (a BF16 model under an FP8 name?)")
        qc = {}
    skip, suffix = _check_config(r, qc) if qc else ([], scale_suffix("fp8"))
    t = ckpt.tensors
    pairs: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    for name, info in t.items():
        r.bytes_by_dtype[info.dtype] = r.bytes_by_dtype.get(info.dtype, 0) + info.nbytes
        if not name.endswith(SCALE_NAMES):
            continue
        wname = name.rsplit(".", 1)[0] + ".weight"
        w = t.get(wname)
        if w is None:
            r.add("error", "tensors", f"{name}: scale without a weight {wname}")
            continue
        if w.dtype != "F8_E4M3":
            r.add("error", "tensors", f"{wname} ({w.file.name}) has a scale but is {w.dtype}, not F8_E4M3: "
                                      f"a non-FP8 tensor under an FP8 name")
            continue
        if not name.endswith(suffix):
            r.add("error", "tensors", f"{name}: scale name does not fit format {r.format} (expects *.{suffix})")
        expect = (cdiv(w.shape[0], BLOCK), cdiv(w.shape[1], BLOCK))
        if info.shape != expect:
            r.add("error", "tensors", f"{name}: shape {list(info.shape)}, expected {list(expect)} for "
                                      f"weight {list(w.shape)}")
        elif info.dtype not in ("F32", "BF16", "F16"):
            r.add("error", "tensors", f"{name}: scale dtype {info.dtype}; loaders take F32, BF16 or F16")
        else:
            s = read_rows(info, 0, info.shape[0]).float()
            bad = int((~torch.isfinite(s) | (s <= 0)).sum())
            if bad:
                r.add("error", "tensors", f"{name}: {bad} scale(s) zero, negative or not finite")
            pairs[wname] = (w, info)
    for name, info in t.items():
        module = name.rsplit(".", 1)[0]
        if info.dtype.startswith("F8") and not any(f"{module}.{s}" in t for s in SCALE_NAMES):
            r.add("error", "tensors", f"{name}: {info.dtype} tensor without a weight scale")
    # Every tensor, kept or quantized: a kept lm_head or vision tensor with NaN is as broken as an FP8 one.
    for n, info in t.items():
        if n.endswith(SCALE_NAMES):
            continue                  # checked above: finite and > 0
        k = _non_finite(info)
        if k:
            r.add("error", "tensors", f"{n}: {k} NaN/Inf value(s) ({info.dtype}, {info.file.name})")
    if pairs and not any(c.name == "tensors" and c.level == "error" for c in r.checks):
        r.add("ok", "tensors", f"{len(pairs)} FP8 weights with scales of the right shape; no NaN or Inf in any "
                               f"tensor, no zero scale")

    # modules_to_not_convert: every listed name exists, every BF16 linear is listed.
    modules = {n.rsplit(".", 1)[0] for n in t}
    for s in skip:
        if not s.startswith("re:") and s not in modules and s != "lm_head" and \
                not any(m.startswith(s + ".") for m in modules) and vllm_name(s) == s:
            r.add("warning", "not-converted list", f"{s!r} names no module of this checkpoint")
    unlisted = [n.removesuffix(".weight") for n, i in t.items()
                if n.endswith(".weight") and len(i.shape) == 2 and not i.dtype.startswith("F8")
                and "embed" not in n and "norm" not in n and not _listed(n.removesuffix(".weight"), skip)]
    if unlisted and qc:
        key = "ignore" if r.format == "compressed-tensors" else "modules_to_not_convert"
        r.add("error", "not-converted list",
              f"{len(unlisted)} BF16 linear(s) missing from {key}, e.g. {unlisted[0]} (vLLM: "
              f"{vllm_name(unlisted[0])}): vLLM would load them as FP8")
    elif qc:
        r.add("ok", "not-converted list", f"{len(skip)} names; every BF16 linear is listed")

    # Mostly-BF16 "FP8" checkpoints: count decoder-linear elements by storage.
    lin = {n: i for n, i in t.items() if _is_decoder_linear(n, i.shape)}
    fused = {n: i for n, i in t.items() if len(i.shape) == 3 and ".experts." in n}
    total = sum(math.prod(i.shape) for i in (*lin.values(), *fused.values()))
    fp8 = sum(math.prod(i.shape) for i in lin.values() if i.dtype == "F8_E4M3")
    r.fp8_share = fp8 / total if total else 0.0
    if total and r.fp8_share < 0.5:
        r.add("error", "bytes", f"only {r.fp8_share:.0%} of the decoder's linear weights are FP8: "
                                f"mostly BF16 under an FP8 name")
    else:
        r.add("ok", "bytes", f"{r.fp8_share:.0%} of the decoder's linear weights are FP8")
    r.tp = tp_report(ckpt.config, {n.removesuffix(".weight"): (w.shape[0], w.shape[1])
                                   for n, (w, _) in pairs.items()})
    return pairs


def check_files(ckpt: Checkpoint, r: Report, source: Path | None) -> None:
    p = ckpt.path
    vlm = "vision_config" in ckpt.config
    tok_cfg = p / "tokenizer_config.json"
    has = {f.name for f in p.iterdir()}
    template = bool({"chat_template.jinja", "chat_template.json"} & has) or (
        tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text())) or (
        (p / "processor_config.json").is_file() and "chat_template" in (p / "processor_config.json").read_text())
    need = [("tokenizer", bool({"tokenizer.json", "tokenizer_config.json", "vocab.json"} & has)),
            ("chat template", template)]
    if vlm:
        need.insert(0, ("processor", bool({"preprocessor_config.json", "processor_config.json"} & has)))
    for what, present in need:
        if not present:
            r.add("error", "files", f"{p}: no {what} file: "
                                    + ("a VLM without it loads as text-only; " if what == "processor" else "")
                                    + "copy it from the source model")
    if "generation_config.json" not in has:
        r.add("warning", "files", f"{p}: no generation_config.json: servers fall back to their own "
                                  "sampling defaults instead of the model's")
    if source is not None:
        for f in sorted(source.iterdir()):
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json")) and \
                    f.name not in ("config.json", "README.md") and f.suffix not in (".bin", ".pt", ".pth"):
                out = p / f.name
                if not out.is_file():
                    r.add("error", "files", f"{f.name}: in the source but missing from the output")
                elif out.read_bytes() != f.read_bytes():
                    r.add("error", "files", f"{f.name}: differs from the source's")
    if not any(c.name == "files" and c.level == "error" for c in r.checks):
        r.add("ok", "files", "processor, tokenizer and chat template present"
                             + (", identical to the source's" if source else ""))


def compare_source(ckpt: Checkpoint, src: Checkpoint, pairs: dict[str, tuple[TensorInfo, TensorInfo]],
                   r: Report) -> None:
    """Dequantized FP8 vs source (relative error, SQNR); kept tensors byte-identical."""
    plan = make_plan(src.config, {n: i.shape for n, i in src.tensors.items()}, QuantizeOptions(quantize_vision=True))
    entries = {e.name: e for e in plan.entries}
    for name, (w, s) in pairs.items():
        e = entries.get(name)
        if e is None or e.source not in src.tensors:
            r.add("error", "source", f"{name}: no matching tensor in the source")
            continue
        ref = read_matrix(src.tensors[e.source], e.expert, e.rows, e.transpose)
        if tuple(ref.shape) != w.shape:
            r.add("error", "source", f"{name}: shape {list(w.shape)} but source has {list(ref.shape)}")
            continue
        err2 = sig2 = 0.0
        scale = read_rows(s, 0, s.shape[0])
        step = 8 * BLOCK
        for r0 in range(0, w.shape[0], step):
            r1 = min(r0 + step, w.shape[0])
            # float64: squares of float32 values below ~1e-19 underflow to 0 in float32 (SQNR "inf")
            dq = dequantize_weight(read_rows(w, r0, r1), scale[r0 // BLOCK: cdiv(r1, BLOCK)], torch.float64)
            x = ref[r0:r1].double()
            err2 += float(((x - dq) ** 2).sum())
            sig2 += float((x ** 2).sum())
        rel = math.sqrt(err2 / sig2) if sig2 else 0.0
        sqnr = 10 * math.log10(sig2 / err2) if err2 else float("inf")
        r.tensors.append(TensorError(name, rel, sqnr))
    same = 0
    for name, info in ckpt.tensors.items():
        if name in pairs or name.endswith(SCALE_NAMES):
            continue
        si = src.tensors.get(name)
        if si is None:
            r.add("error", "source", f"{name}: not in the source")
        elif (si.dtype, si.shape) != (info.dtype, info.shape) or not _same_bytes(si, info):
            r.add("error", "source", f"{name}: kept tensor differs from the source's "
                                     f"({ckpt.tensors[name].file.name} vs {si.file.name})")
        else:
            same += 1
    r.kept_identical = same
    worst = min(r.tensors, key=lambda x: x.sqnr_db, default=None)
    if worst is not None and not any(c.name == "source" for c in r.checks):
        r.add("ok", "source", f"{same} kept tensors bit-identical; FP8 SQNR {worst.sqnr_db:.1f} dB at worst "
                              f"({worst.name})")
    if worst is not None and worst.sqnr_db < 20:
        r.add("error", "source", f"{worst.name}: SQNR {worst.sqnr_db:.1f} dB, far below FP8's ~30 dB: damaged")


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    for at in range(0, a.nbytes, SCAN_BYTES):
        n = min(SCAN_BYTES, a.nbytes - at)
        if not torch.equal(read_bytes(a.file, a.offset + at, n), read_bytes(b.file, b.offset + at, n)):
            return False
    return True


def verify(output: str | Path, source: str | Path | None = None, engines: tuple[str, ...] = (),
           engine_python: tuple[str, ...] = (), engine_tp: tuple[int, ...] = SIZES) -> Report:
    """``engines``: "vllm", "sglang": also run that engine's own loader on the checkpoint (engines/),
    in the first of ``engine_python`` (or this interpreter) that has it; vLLM at ``engine_tp`` sizes."""
    out = Path(output)
    local_folder(output)
    if source is not None:
        locate(source)   # a missing SOURCE is said before the checks, which take a while on a large model
    ckpt = open_checkpoint(out, allow_quantized=True)
    r = Report(str(out), _fmt(ckpt.config.get("quantization_config") or {}))
    _check_index(ckpt, r)
    pairs = check_structure(ckpt, r)
    src = None
    if source is not None:
        src = open_checkpoint(resolve(source))
    check_files(ckpt, r, src.path if src else None)
    if src is not None:
        compare_source(ckpt, src, pairs, r)
    else:
        recorded_errors(out, pairs, r)
    for level, message in checkpoint_findings(ckpt.config, list(ckpt.tensors), r.format):
        r.add(level, "engines", message)
    for engine in engines:
        from .engines import check_engine

        check_engine(r, out, engine, tuple(engine_python), tuple(engine_tp))
    return r


def recorded_errors(out: Path, pairs: dict, r: Report) -> None:
    """Without a source: the per-tensor error ``quantize`` measured and kept in the output, if any."""
    from ..conversion.drift import FILE, read_errors

    errors = read_errors(out)
    if errors is None:
        return
    r.tensors = [TensorError(n, e.get("rel_error", 0.0), e["sqnr_db"] if e.get("sqnr_db") is not None
                             else float("inf"), e.get("max_rel_error")) for n, e in errors.items()]
    missing = sorted(set(pairs) - set(errors))
    if missing:
        r.add("warning", "recorded error", f"{FILE} has no figures for {len(missing)} FP8 tensor(s), e.g. "
                                           f"{missing[0]}: written by another conversion?")
    worst = min(r.tensors, key=lambda x: x.sqnr_db, default=None)
    if worst is None:
        return
    level = "error" if worst.sqnr_db < 20 else "ok"
    r.add(level, "recorded error", f"measured while converting ({FILE}): FP8 SQNR {worst.sqnr_db:.1f} dB at "
                                   f"worst ({worst.name})" + (", far below FP8's ~30 dB: damaged" if level == "error"
                                                              else ""))


def _check_index(ckpt: Checkpoint, r: Report) -> None:
    """open_checkpoint already checked that every indexed tensor is where the index says."""
    index = ckpt.path / "model.safetensors.index.json"
    if not index.is_file():
        r.add("warning", "index", "no model.safetensors.index.json (fine for a single shard)")
        return
    data = json.loads(index.read_text())
    wmap, total = data.get("weight_map", {}), data.get("metadata", {}).get("total_size")
    extra = set(ckpt.tensors) - set(wmap)
    actual = sum(t.nbytes for t in ckpt.tensors.values())
    if extra:
        r.add("error", "index", f"{len(extra)} tensor(s) in the shards but not in the index, e.g. {min(extra)}")
    if total is not None and total != actual:
        r.add("error", "index", f"metadata.total_size {total} != {actual} bytes of tensors in the shards")
    if not extra and (total is None or total == actual):
        r.add("ok", "index", f"{len(wmap)} tensors in {len(set(wmap.values()))} shard(s), total_size matches")
