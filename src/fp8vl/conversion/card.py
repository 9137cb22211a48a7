"""The output's README.md: a Hugging Face model card saying what was done and how to serve it."""

from __future__ import annotations

import re
import shlex
from collections import Counter
from pathlib import Path

from ..version import __version__
from ..options import QuantizeOptions
from ..checkpoint.compat import config_lines
from ..checkpoint.formats import scale_suffix
from ..checkpoint.plan import REASONS
from ..checkpoint.tp import summarize

FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def source_front_matter(source: Path) -> dict[str, object]:
    """license and tags from the source card's YAML front matter (read with PyYAML if present)."""
    card = source / "README.md"
    if not card.is_file():
        return {}
    m = FRONT.match(card.read_text(errors="replace"))
    if not m:
        return {}
    try:
        import yaml

        data = yaml.safe_load(m.group(1)) or {}
    except Exception:
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link", "tags", "language",
                                 "pipeline_tag", "library_name") if k in data}


def hub_id(source: Path) -> str | None:
    """``owner/name`` of a hub snapshot folder (``.../models--owner--name/snapshots/<rev>``), else None."""
    for part in source.parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


def base_model_id(source: Path, hub: str | None = None) -> str:
    """The hub id when there is one; for a local folder its name (not a hub id: never linked)."""
    return hub or hub_id(source) or source.name


def quantize_command(source: str, output: str, opts: QuantizeOptions, commit: str | None = None) -> str:
    """The command that makes this output again, with the options that shape it (not --workers or
    --device: the output is byte-identical either way) and no local paths."""
    args = ["fp8vl", "quantize", source, output]
    if opts.format != "fp8":
        args += ["--format", opts.format]
    if opts.scale_dtype:
        args += ["--scale-dtype", opts.scale_dtype]
    for pattern in opts.ignore:
        args += ["--ignore", pattern]
    if opts.quantize_vision:
        args.append("--quantize-vision")
    if opts.max_shard_size != QuantizeOptions().max_shard_size:
        args += ["--max-shard-size", str(opts.max_shard_size)]
    if commit or opts.revision:
        args += ["--revision", commit or opts.revision]
    return " ".join(shlex.quote(a) for a in args)


def _yaml(meta: dict[str, object]) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()


def render(res, opts: QuantizeOptions, hub: str | None = None) -> str:
    meta = source_front_matter(res.source)
    hub = hub or getattr(res, "hub", None) or hub_id(res.source)
    commit = getattr(res, "commit", None)
    base = base_model_id(res.source, hub)
    name = res.output.name if res.output is not None else f"{Path(base).name}-FP8"
    made_from = f"[{base}](https://huggingface.co/{base})" if hub else \
        f"the local model `{base}` (not a hub repo: set `base_model` above to its hub id before uploading)"
    tags = list(dict.fromkeys(list(meta.pop("tags", []) or []) + ["fp8", "quantized", "fp8vl"]))
    front = {"base_model": base, "base_model_relation": "quantized", **meta, "tags": tags}
    groups = Counter()
    kept = Counter()
    for e in res.plan.entries:
        (groups if e.quantize else kept)[e.group] += 1
    fmt = ("Qwen/DeepSeek `fp8`" if opts.format == "fp8" else "compressed-tensors FP8_BLOCK") + \
        f" (`{scale_suffix(opts.format)}`)"
    lines = [
        "---", _yaml(front), "---", "",
        f"# {name}", "",
        f"FP8 copy of {made_from} made with fp8vl {__version__}: "
        "language-model linear weights in FP8 E4M3 with one scale per 128x128 block, activations "
        "quantized at run time per token and per 128 channels (W8A8, dynamic). No calibration data.",
        "",
        "| | |", "|---|---|",
        *([f"| source revision | `{commit}` |"] if commit else []),
        f"| format | {fmt} |",
        f"| scale dtype | {res.scale_dtype} |",
        f"| weights before | {res.bytes_in / 1e9:.2f} GB |",
        f"| weights after | {res.bytes_out / 1e9:.2f} GB ({res.bytes_out / max(res.bytes_in, 1):.2f}x) |",
        f"| tensors quantized | {sum(groups.values())} |",
        f"| tensors kept as in the source | {sum(kept.values())} |",
        "",
        "## Kept in the source precision, and why", "",
        "| group | tensors | reason |", "|---|---|---|",
        *[f"| {g} | {n} | {REASONS[g]} |" for g, n in kept.items()],
        "",
        "Every non-weight file (processor, tokenizer, chat template, generation config) is the "
        "source's, byte for byte.",
        "",
        *(["MoE experts are stored per expert (`mlp.experts.{e}.{gate,up,down}_proj`, Qwen's FP8 MoE "
           "layout): vLLM loads this layout; Transformers does not (it leaves the experts "
           "uninitialized); fp8vl's own runtime (`fp8vl eval`, `fp8vl caption --model`) does.", ""]
          if groups.get("moe experts") else []),
        *error_lines(getattr(res, "errors", None) or {}),
        "## Tensor parallelism", "",
        summarize(res.tp) + ".", "",
        *(["## Engines", "",
           *[f"- {line}." for line in config_lines(res.plan)],
           *[f"- {w}" for w in res.plan.warnings], ""] if res.plan.config_fields or res.plan.warnings else []),
        "## Serve it", "",
        "```bash", f"vllm serve {shlex.quote(name)} --max-model-len 16384", "```", "",
        "FP8 tensor cores need compute capability 8.9 or newer (RTX 40xx, L4, H100, RTX 50xx); "
        "on 8.0/8.6 vLLM runs these weights through its weight-only FP8 path. "
        "`fp8vl plan` sizes `--max-model-len` for a given GPU.",
        "",
        "## How it was made", "",
        "```bash", quantize_command(base, name, opts, commit), "```", "",
    ]
    return "\n".join(lines)


def error_lines(errors: dict[str, dict]) -> list[str]:
    """The error measured while converting (fp8vl-errors.json), in a few lines."""
    from .drift import FILE, summary

    s = summary(errors)
    if s is None:
        return []
    mean, (worst, worst_db), (worst_max, max_rel) = s
    return ["## Error against the source", "",
            f"Measured on every FP8 tensor while converting (per tensor in `{FILE}`; `fp8vl verify` reports it):",
            "", "| | |", "|---|---|",
            f"| FP8 tensors | {len(errors)} |",
            f"| mean SQNR | {mean:.1f} dB |",
            f"| worst SQNR | {worst_db:.1f} dB (`{worst}`) |",
            f"| worst max relative error | {max_rel:.3g} of the tensor's largest weight (`{worst_max}`) |", ""]


def write_card(out: Path, res, opts: QuantizeOptions) -> None:
    (out / "README.md").write_text(render(res, opts))


def write_dequantized_card(tmp: Path, source: Path, out: Path, dtype: str) -> None:
    """A short card for ``fp8vl dequantize``'s output (the FP8 card would describe the wrong model)."""
    meta = source_front_matter(source)
    tags = [t for t in meta.pop("tags", []) or [] if t not in ("fp8", "quantized")]
    front: dict[str, object] = {}
    card = source / "README.md"
    m = FRONT.match(card.read_text(errors="replace")) if card.is_file() else None
    try:
        import yaml

        base = (yaml.safe_load(m.group(1)) or {}).get("base_model") if m else None
    except Exception:
        base = None
    if isinstance(base, str) and "/" in base:      # a hub id: the original model
        front["base_model"] = base
    front.update({**meta, "tags": list(dict.fromkeys(tags + ["fp8vl", "dequantized"]))})
    src = hub_id(source) or source.name
    cmd = ["fp8vl", "dequantize", src, out.name] + (["--dtype", dtype] if dtype != "bfloat16" else [])
    text = "\n".join([
        "---", _yaml(front), "---", "",
        f"# {out.name}", "",
        f"{dtype} copy of the FP8 block-quantized checkpoint `{src}`, made with fp8vl {__version__}: every FP8 "
        "weight is its codes times its block scale, exactly; every other tensor and file is unchanged and "
        "`quantization_config` is removed. The FP8 rounding stays in the weights: this is not the model the "
        "FP8 copy was made from.", "",
        "```bash", " ".join(shlex.quote(a) for a in cmd), "```", ""])
    (tmp / "README.md").write_text(text)


def update_card(path: Path, section: str) -> None:
    """Insert or replace one fp8vl section of OUTPUT/README.md. A section's first and last lines
    are its markers (``<!-- fp8vl:verify -->`` ... ``<!-- /fp8vl:verify -->``): a rerun replaces it."""
    lines = section.strip("\n").splitlines()
    begin, end = lines[0], lines[-1]
    card = path / "README.md"
    text = card.read_text() if card.is_file() else ""
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text)
