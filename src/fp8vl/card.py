"""The output's README.md: a Hugging Face model card saying what was done and how to serve it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from . import __version__
from .options import QuantizeOptions
from .plan import REASONS
from .tp import summarize

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


def base_model_id(source: Path, hub_id: str | None) -> str:
    if hub_id:
        return hub_id
    # A hub snapshot folder: .../models--owner--name/snapshots/<rev>
    for part in source.parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return source.name


def _yaml(meta: dict[str, object]) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()


def render(res, opts: QuantizeOptions, command: str | None, hub_id: str | None = None) -> str:
    meta = source_front_matter(res.source)
    base = base_model_id(res.source, hub_id)
    tags = list(dict.fromkeys(list(meta.pop("tags", []) or []) + ["fp8", "quantized", "fp8vl"]))
    front = {"base_model": base, "base_model_relation": "quantized", **meta, "tags": tags}
    groups = Counter()
    kept = Counter()
    for e in res.plan.entries:
        (groups if e.quantize else kept)[e.group] += 1
    fmt = "Qwen/DeepSeek `fp8` (`weight_scale_inv`)" if opts.format == "fp8" else \
        "compressed-tensors FP8_BLOCK (`weight_scale`)"
    lines = [
        "---", _yaml(front), "---", "",
        f"# {Path(base).name}-FP8", "",
        f"FP8 copy of [{base}](https://huggingface.co/{base}) made with fp8vl {__version__}: "
        "language-model linear weights in FP8 E4M3 with one scale per 128x128 block, activations "
        "quantized at run time per token and per 128 channels (W8A8, dynamic). No calibration data.",
        "",
        "| | |", "|---|---|",
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
        "## Tensor parallelism", "",
        summarize(res.tp) + ".", "",
        "## Serve it", "",
        "```bash", f"vllm serve {Path(base).name}-FP8 --max-model-len 16384", "```", "",
        "FP8 tensor cores need compute capability 8.9 or newer (RTX 40xx, L4, H100, RTX 50xx); "
        "on 8.0/8.6 vLLM runs these weights through its weight-only FP8 path. "
        "`fp8vl plan` sizes `--max-model-len` for a given GPU.",
        "",
        "## How it was made", "",
        "```bash", command or f"fp8vl quantize {base} OUTPUT", "```", "",
    ]
    return "\n".join(lines)


def write_card(out: Path, res, opts: QuantizeOptions, command: str | None) -> None:
    (out / "README.md").write_text(render(res, opts, command))


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
