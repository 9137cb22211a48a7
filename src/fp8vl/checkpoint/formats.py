"""The two on-disk formats: what the scale tensor is called and what ``quantization_config`` says.

"fp8" is the layout of Qwen's and DeepSeek-V3's FP8 releases; "compressed-tensors" is the
FP8_BLOCK scheme llm-compressor writes. Both store W ~= fp8 * scale per 128x128 tile.
"""

from __future__ import annotations

BLOCK = 128  # weight tile side: one scale per BLOCK x BLOCK tile, activations per 1 x BLOCK group


def cdiv(a: int, b: int) -> int:
    """Ceiling division: tiles of ``b`` needed to cover ``a``."""
    return -(-a // b)


SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")   # "fp8", "compressed-tensors": the same multiplier


def scale_suffix(fmt: str) -> str:
    return SCALE_SUFFIXES[0] if fmt == "fp8" else SCALE_SUFFIXES[1]


def text_config(config: dict) -> dict:
    """The language model's part of a config.json (VLMs nest it; text-only models are flat)."""
    return config.get("text_config") or config


def quantization_config(fmt: str, not_converted: list[str]) -> dict:
    if fmt == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
            # Full module names: vLLM matches them exactly (after its own renaming), Transformers by
            # prefix. Older vLLM reads only "ignored_layers"; both keys hold the same list.
            "modules_to_not_convert": list(not_converted),
            "ignored_layers": list(not_converted),
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                            "block_structure": [BLOCK, BLOCK], "dynamic": False, "group_size": None,
                            "actorder": None, "observer": "static_minmax", "observer_kwargs": {}},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                      "strategy": "group", "group_size": BLOCK, "dynamic": True,
                                      "block_structure": None, "actorder": None, "observer": None,
                                      "observer_kwargs": {}},
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": list(not_converted),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
