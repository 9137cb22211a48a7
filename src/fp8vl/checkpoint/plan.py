"""Which tensors become FP8 and which stay as they are, from names, shapes and the config alone.

The rule (docs/decisions.md, "Format and numerics"): quantize the 2-D linear weights inside the language model's decoder
layers; keep the vision tower, embeddings, ``lm_head``, norms, biases, MoE routers and anything
that is not a 2-D linear weight. Fused 3-D MoE experts are split into one 2-D linear per expert
and projection, the layout of Qwen's FP8 MoE releases.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from . import compat

from ..errors import FP8VLError
from .formats import BLOCK, cdiv, text_config
from ..options import QuantizeOptions

# Model families fp8vl knows; any other gets the generic rule and a warning.
KNOWN_MODEL_TYPES = {
    "qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl", "qwen3", "qwen3_moe", "qwen2",
    "qwen2_moe", "llama", "mistral", "gemma3", "gemma3_text",
}
VISION_PARTS = {"visual", "vision_tower", "vision_model", "multi_modal_projector", "vision_encoder",
                "mm_projector", "audio_tower", "embed_vision"}
LAYER = re.compile(r"(^|\.)layers\.\d+\.")
ROUTERS = (".gate", ".router", ".shared_expert_gate")
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

REASONS = {
    "language linears": "2-D linears of the decoder layers: most bytes and FLOPs",
    "moe experts": "fused 3-D experts, split per expert (Qwen's FP8 MoE layout)",
    "vision tower": "vision quantization breaks image understanding; 4304-wide MLPs can't run block kernels",
    "lm_head": "output head: most sensitive to error",
    "embeddings": "a lookup, not a matmul: FP8 saves no compute",
    "norms": "1-D, tiny and sensitive",
    "routers": "MoE routers pick the experts: small and sensitive",
    "biases": "added after the matmul, kept exact",
    "other": "not a 2-D linear weight",
    "ignored": "matched --ignore",
    "k not multiple of 128": "input width not a multiple of 128: FP8 kernels can't run it",
    "n not multiple of 128": "output width not a multiple of 128: a partial scale block, which Transformers "
                             "refuses and vLLM refuses in merged layers",
}


@dataclass(frozen=True)
class Entry:
    """One output tensor (FP8 weight, or a tensor copied unchanged) and where it comes from.

    For a split MoE expert, ``expert`` indexes axis 0 of the 3-D source; ``transpose`` says the
    source slice is stored [in, out]; ``rows`` is the row range of the [out, in] matrix.
    """

    name: str                     # output weight name, e.g. "...q_proj.weight"
    source: str                   # source tensor name
    quantize: bool
    group: str                    # key of REASONS
    shape: tuple[int, ...]        # output shape ([out, in] for quantized weights)
    expert: int | None = None
    transpose: bool = False
    rows: tuple[int, int] | None = None

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


@dataclass(frozen=True)
class Plan:
    entries: tuple[Entry, ...]
    not_converted: tuple[str, ...]   # full module names kept unquantized (modules_to_not_convert)
    warnings: tuple[str, ...]
    model_type: str
    # config.json fields the engines read and the source lacks ({"text_config.name": value}), see compat
    config_fields: dict = field(default_factory=dict)


def _matches(module: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], module):
                return True
        elif fnmatch.fnmatchcase(module, p) or module == p or module.startswith(p.rstrip(".") + "."):
            return True
    return False


def _classify(name: str, shape: tuple[int, ...], opts: QuantizeOptions) -> str:
    """Group of one 2-D-or-other source tensor (not a fused expert tensor)."""
    parts = name.split(".")
    module = name.removesuffix(".weight")
    if VISION_PARTS & set(parts):
        if opts.quantize_vision and len(shape) == 2 and name.endswith(".weight") and "embed" not in name:
            return "language linears"  # quantized like the text linears; K checked by the caller
        return "vision tower"
    if name.endswith(".bias"):
        return "biases"
    if "norm" in module.rsplit(".", 1)[-1] or len(shape) <= 1:
        return "norms" if "norm" in name else "other"
    if "lm_head" in parts or "output" == parts[0]:
        return "lm_head"
    if "embed_tokens" in parts or "embeddings" in name or "wte" in parts:
        return "embeddings"
    if module.endswith(ROUTERS):
        return "routers"
    if len(shape) == 2 and name.endswith(".weight") and LAYER.search(name):
        return "language linears"
    return "other"


def _moe_sizes(config: dict) -> tuple[int, int]:
    tc = text_config(config)
    hidden = tc.get("hidden_size")
    inter = tc.get("moe_intermediate_size") or tc.get("intermediate_size")
    if not hidden or not inter:
        raise FP8VLError("config.json: fused MoE experts found but hidden_size/moe_intermediate_size missing")
    return hidden, inter


def _split_experts(name: str, shape: tuple[int, ...], config: dict) -> list[Entry]:
    """[E, a, b] fused experts -> per-expert 2-D entries; axis order derived from config sizes."""
    hidden, inter = _moe_sizes(config)
    if len(shape) != 3:
        raise FP8VLError(f"tensor {name}: expected 3-D fused experts, got shape {shape}")
    n_exp, a, b = shape
    base = name.rsplit(".", 1)[0]  # "...mlp.experts"
    if name.endswith("gate_up_proj"):
        if (a, b) == (2 * inter, hidden):
            transpose = False      # [E, 2I, H]: rows are outputs
        elif (a, b) == (hidden, 2 * inter):
            transpose = True       # [E, H, 2I]: stored [in, out]
        else:
            raise FP8VLError(f"tensor {name}: shape {shape} fits neither [E, 2I, H] nor [E, H, 2I] "
                             f"with hidden {hidden}, moe_intermediate {inter} from config.json")
        out = []
        for e in range(n_exp):
            out.append(Entry(f"{base}.{e}.gate_proj.weight", name, True, "moe experts", (inter, hidden),
                             e, transpose, (0, inter)))
            out.append(Entry(f"{base}.{e}.up_proj.weight", name, True, "moe experts", (inter, hidden),
                             e, transpose, (inter, 2 * inter)))
        return out
    if (a, b) == (hidden, inter):
        transpose = False          # [E, H, I]: [out, in]
    elif (a, b) == (inter, hidden):
        transpose = True           # [E, I, H]: [in, out]
    else:
        raise FP8VLError(f"tensor {name}: shape {shape} fits neither [E, H, I] nor [E, I, H] "
                         f"with hidden {hidden}, moe_intermediate {inter} from config.json")
    return [Entry(f"{base}.{e}.down_proj.weight", name, True, "moe experts", (hidden, inter), e, transpose,
                  (0, hidden)) for e in range(n_exp)]


def make_plan(config: dict, shapes: dict[str, tuple[int, ...]], opts: QuantizeOptions) -> Plan:
    """Decide every tensor's fate. ``shapes`` maps source tensor names to shapes, in file order."""
    model_type = config.get("model_type", "?")
    warnings = []
    if model_type not in KNOWN_MODEL_TYPES:
        warnings.append(f"model_type {model_type!r} is not one fp8vl knows: using the generic rule "
                        f"(2-D linear weights inside decoder layers); check the plan with --dry-run")
    entries: list[Entry] = []
    for name, shape in shapes.items():
        shape = tuple(shape)
        if name.endswith(FUSED_EXPERTS) and len(shape) == 3:
            split = _split_experts(name, shape, config)
            # --ignore may name the fused module (...mlp.experts) or the per-expert modules written;
            # either way the experts stay fused and BF16: a loader needs all experts in one dtype.
            fused = name.rsplit(".", 1)[0]
            if _matches(fused, opts.ignore) or any(_matches(e.module, opts.ignore) for e in split):
                entries.append(Entry(name, name, False, "ignored", shape))
            else:
                entries.extend(split)
            continue
        group = _classify(name, shape, opts)
        quantize = group == "language linears"
        if quantize and _matches(name.removesuffix(".weight"), opts.ignore):
            group, quantize = "ignored", False
        if quantize and shape[1] % BLOCK:
            group, quantize = "k not multiple of 128", False
        elif quantize and shape[0] % BLOCK:   # docs/decisions.md, "Partial scale blocks"
            group, quantize = "n not multiple of 128", False
        entries.append(Entry(name, name, quantize, group, shape))
    if not any(e.quantize for e in entries):
        raise FP8VLError("nothing to quantize: no 2-D linear weights found inside decoder layers "
                         "(check the source, or the --ignore patterns)")
    kept_modules = [e.module if e.name.endswith(".weight") else e.name.rsplit(".", 1)[0] for e in entries
                    if not e.quantize and len(e.shape) >= 2
                    and (e.name.endswith(".weight") or e.name.endswith(FUSED_EXPERTS))]
    if "lm_head" not in kept_modules:
        kept_modules.insert(0, "lm_head")  # Transformers 5 stops adding it once a list is given
    kept_modules += compat.sglang_names(config, kept_modules)   # names SGLang checks for fused vision qkv
    warnings += compat.layout_warnings(config, list(shapes), opts.format)
    return Plan(tuple(entries), tuple(dict.fromkeys(kept_modules)), tuple(warnings), model_type,
                compat.config_fields(config))


def scale_shape(e: Entry) -> tuple[int, int]:
    return cdiv(e.shape[0], BLOCK), cdiv(e.shape[1], BLOCK)
