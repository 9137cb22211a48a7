"""What the serving engines need that a Transformers-5 checkpoint does not say, and what they cannot load.

Read from vLLM 0.33.0's and SGLang 0.5.23's model files and loaders, and checked with their own code
on CPU (``fp8vl verify --vllm`` / ``--sglang``, ``make test-vllm`` / ``make test-sglang``).
Plain functions of the config and tensor names: ``plan.make_plan`` calls them.
"""

from __future__ import annotations

import re

from .formats import SCALE_SUFFIXES

ENGINES = "vLLM 0.33.0 and SGLang 0.5.23"
LLAMA_LIKE = {"llama", "mistral"}        # SGLang serves both with its Llama model class
FUSED_VISION_QKV = re.compile(r"^(?P<parent>.*\.attn)\.qkv$")
# SGLang builds these models' vision attention quant-eligible (measured: qwen2_5_vl; qwen2_vl shares
# SGLang's VisionAttention and checkpoint names). Its Qwen3-VL builds the vision tower unquantized.
SGLANG_FUSED_VISION = {"qwen2_5_vl", "qwen2_vl"}


def config_fields(config: dict) -> dict[str, object]:
    """Fields to add to config.json, ``{"text_config.name": value}``, only those missing.

    Qwen3-VL-MoE: Transformers 5 dropped ``norm_topk_prob`` from the text config class (it always
    normalizes the top-k router weights), so a checkpoint it saves lacks the field; vLLM's Qwen3-MoE
    block reads it and fails to build without it (SGLang defaults to true). True is what the model computes.
    Other supported architectures: their Transformers-5 configs carry every field these engines read
    (an audit of the engines' model files, then a build with each engine).
    """
    out: dict[str, object] = {}
    if config.get("model_type") == "qwen3_vl_moe" and "norm_topk_prob" not in (config.get("text_config") or {}):
        out["text_config.norm_topk_prob"] = True
    return out


def config_lines(plan) -> list[str]:
    """One line per config.json field fp8vl adds for the engines (config_fields), as the summary and
    the card say it."""
    return [f"config.json: {k} = {str(v).lower() if isinstance(v, bool) else v} added (vLLM needs it; "
            f"Transformers 5 omits it)" for k, v in plan.config_fields.items()]


def with_fields(config: dict, fields: dict[str, object]) -> dict:
    """A copy of ``config`` with ``fields`` (dotted paths, one level of nesting) set."""
    out = {**config}
    for path, value in fields.items():
        head, _, leaf = path.rpartition(".")
        if head:
            out[head] = {**(out.get(head) or {}), leaf: value}
        else:
            out[leaf] = value
    return out


def sglang_names(config: dict, kept_modules: list[str]) -> list[str]:
    """Extra not-converted names SGLang needs for kept fused vision attention (Qwen2.5-VL's
    ``visual.blocks.N.attn.qkv``). SGLang builds that layer as ``...attn.qkv_proj`` and asks whether
    each of its shards ``...attn.q_proj``/``k_proj``/``v_proj`` is listed, never the fused name; it
    matches a listed name as a module-path prefix, so the parent ``...attn`` covers all three.
    vLLM matches names exactly (it builds ``...attn.qkv``, listed already) and ignores the parent."""
    if config.get("model_type") not in SGLANG_FUSED_VISION:
        return []
    return [m.group("parent") for m in map(FUSED_VISION_QKV.match, kept_modules) if m]


def layout_warnings(config: dict, names: list[str], fmt: str) -> list[str]:
    """Layouts an engine cannot load, with the way out."""
    out = []
    model_type = config.get("model_type")
    if model_type == "gemma3":
        tower = sorted({n.split(".vision_tower.")[0] + ".vision_tower." if ".vision_tower." in n else "vision_tower."
                        for n in names if re.search(r"(^|\.)vision_tower\.", n)})
        if tower and not any(".vision_tower.vision_model." in f".{n}" for n in names):
            out.append(
                "Gemma 3 saved by Transformers 5: the vision tower's tensors are named "
                f"{tower[0]}{{embeddings,encoder,post_layernorm,head}}.*, and vLLM 0.33 and SGLang 0.5.23 "
                f"expect {tower[0]}vision_model.* (the layout of Google's release): neither can load this "
                "checkpoint (nor its BF16 source). Transformers loads it.")
    if model_type in LLAMA_LIKE and fmt == "fp8":
        out.append(
            "SGLang 0.5.23 cannot load Llama's fp8 layout: its Llama load_weights renames "
            f"{SCALE_SUFFIXES[0]} to {SCALE_SUFFIXES[1]}, which block-FP8 layers do not have, and drops every block "
            "scale. vLLM and Transformers load it; for SGLang write --format compressed-tensors.")
    return out


def checkpoint_findings(config: dict, names: list[str], fmt: str) -> list[tuple[str, str]]:
    """(level, message) for ``fp8vl verify``: missing engine fields (error) and layout warnings."""
    out = [("error", f"config.json lacks {k} (Transformers 5 omits it): vLLM fails to build the model; "
                     f"add \"{k.rsplit('.', 1)[-1]}\": {str(v).lower()} to {k.rsplit('.', 1)[0] or 'the top level'}")
           for k, v in config_fields(config).items()]
    return out + [("warning", w) for w in layout_warnings(config, names, fmt)]
