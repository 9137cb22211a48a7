"""Drift between a source model and its FP8 copy: next-token KL, top-1 and greedy agreement."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FP8VLError

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina",
          "camera")


@dataclass
class Loaded:
    model: torch.nn.Module
    processor: object      # a multimodal processor, or a tokenizer for text-only models
    is_vlm: bool
    path: Path


def photo(name: str):
    """A real photograph that ships with scikit-image (no download), as an RGB PIL image."""
    from PIL import Image
    from skimage import data

    arr = getattr(data, name)()
    img = Image.fromarray(arr)
    return img.convert("RGB")


def _is_vlm(path: Path) -> bool:
    cfg = json.loads((path / "config.json").read_text())
    return "vision_config" in cfg


def load_hf_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> Loaded:
    """Load with Transformers as a user would (FP8 checkpoints are dequantized on load without a GPU)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FP8VLError(f"{path}: no config.json; pass a model folder")
    vlm = _is_vlm(path)
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, device_map=device).eval()
    proc = AutoProcessor.from_pretrained(path) if vlm else AutoTokenizer.from_pretrained(path)
    return Loaded(model, proc, vlm, path)


def encode(loaded: Loaded, text: str, image=None, chat: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt, through the chat template (image first, as Qwen's guides do)."""
    proc = loaded.processor
    if image is not None and not loaded.is_vlm:
        raise FP8VLError(f"{loaded.path}: text-only model, cannot take an image prompt")
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    if chat and getattr(proc, "chat_template", None):
        msgs = [{"role": "user", "content": content if loaded.is_vlm else text}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if loaded.is_vlm:
        batch = proc(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    else:
        batch = proc([text], return_tensors="pt")
    device = next(loaded.model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def logits_for(loaded: Loaded, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[T, vocab] float32 logits of one prompt."""
    return loaded.model(**batch).logits[0].float()


def kl_stats(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> dict[str, float]:
    """Per-position KL(ref || q) in nats, and top-1 agreement, over [T, vocab] logits."""
    lp, lq = ref_logits.log_softmax(-1), q_logits.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    top1 = (ref_logits.argmax(-1) == q_logits.argmax(-1)).float()
    return {"tokens": int(kl.numel()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float(top1.mean()), "kl": kl.tolist()}


def compare_models(ref: Loaded, q: Loaded, text: str, image=None) -> dict:
    batch = encode(ref, text, image)
    return kl_stats(logits_for(ref, batch), logits_for(q, {k: v.to(next(q.model.parameters()).device)
                                                          for k, v in batch.items()}))
