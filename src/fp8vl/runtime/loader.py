"""Load a checkpoint straight onto the device: FP8 weights stay FP8, nothing is built twice.

The model is built by Transformers on the meta device (parameters only: buffers such as rotary
frequencies are real), the linears that the checkpoint stores in FP8 become ``FP8Linear`` modules,
and every tensor is read from its shard and assigned where it belongs, one at a time (the
``load_state_dict(assign=True)`` pattern). No BF16 copy of an FP8 weight exists at any time, so the
peak device memory of a load is the checkpoint's own footprint. BF16 checkpoints go through the same
path, so FP8 and BF16 are compared in one engine.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import torch

from ..errors import FP8VLError
from ..checkpoint.formats import SCALE_SUFFIXES
from ..checkpoint.plan import VISION_PARTS
from .fp8_modules import EXPERT, FP8Experts, FP8Linear, fp8_mode, resolve_mode
from ..checkpoint.shards import TensorInfo, read_tensor
from ..checkpoint.source import local_folder, open_checkpoint

SCALE = re.compile(rf"^(?P<module>.+)\.(?P<kind>{'|'.join(SCALE_SUFFIXES)})$")


def _model_class(config: dict):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM


def _empty_model(path: Path, config_dict: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Transformers' model for ``path`` with every parameter on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")   # the plain model: fp8vl puts the FP8 modules in itself
    with init_empty_weights(include_buffers=False):
        model = _model_class(config_dict).from_config(config, dtype=dtype)
    return model.eval()


def model_module_name(names: set[str], ckpt_name: str, path: Path) -> str:
    """The model's module for a checkpoint module name.

    Checkpoints and module trees can name the same module differently (Transformers 5 keeps
    Qwen2.5-VL's legacy ``model.layers.`` names on disk, ``model.language_model.layers.`` in the
    model): take the longest trailing part of the name that modules end with; among several
    (Gemma 3's text and vision layers end alike), keep those sharing the checkpoint name's other
    parts (``language_model``), then those outside the vision tower.
    """
    if ckpt_name in names:
        return ckpt_name
    parts = ckpt_name.split(".")
    for i in range(len(parts)):
        tail = "." + ".".join(parts[i:])
        hits = [n for n in names if n.endswith(tail)]
        if len(hits) > 1:
            lead = set(parts[:i])
            hits = [n for n in hits if lead <= set(n.split("."))] or \
                [n for n in hits if not VISION_PARTS & set(n.split("."))]
        if len(hits) == 1:
            return hits[0]
        if hits:
            break
    raise FP8VLError(f"{path}: checkpoint module {ckpt_name} matches no single module of the model; "
                     f"the weights do not belong to the architecture its config.json names")


def _assign(module: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


def load_model(path: str | Path, device: str = "cpu", mode: str = "auto",
               dtype: torch.dtype = torch.bfloat16, progress=None) -> torch.nn.Module:
    """Any fp8vl / Qwen / compressed-tensors FP8 checkpoint, or a plain BF16/FP16/FP32 one, on ``device``.

    FP8 linears become ``FP8Linear`` (``mode`` as in fp8_modules.py; set on every module), split MoE
    experts ``FP8Experts``; every other tensor is cast to ``dtype``. ``fp8_modules.fp8_mode(model)`` says
    the mode (None for a checkpoint without FP8 weights). ``progress(bytes read, total bytes)`` is
    called as tensors arrive.
    """
    path = Path(path)
    ckpt = open_checkpoint(path, allow_quantized=True)
    total, done = sum(t.nbytes for t in ckpt.tensors.values()), 0
    quantized = bool(ckpt.config.get("quantization_config"))
    mode = resolve_mode(mode, device) if quantized else None
    model = _empty_model(path, ckpt.config, dtype)
    names = {n for n, _ in model.named_modules()}

    scales = {m["module"]: t.name for n, t in ckpt.tensors.items() if (m := SCALE.match(n))}
    weights = {module + ".weight": module for module in scales}
    experts: dict[str, dict[int, dict[str, FP8Linear]]] = defaultdict(lambda: defaultdict(dict))
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)   # FP8 module -> weight/scale on device

    def place(module_name: str) -> None:
        p = parts.pop(module_name)
        lin = FP8Linear(p["weight"], p["scale"].float(), None, mode)
        if m := EXPERT.match(module_name):
            experts[m["base"]][int(m["e"])][m["proj"]] = lin
            return
        target = model_module_name(names, module_name, path)
        parent, _, child = target.rpartition(".")
        model.get_submodule(parent).register_module(child, lin)

    for info, t in _read_ahead(list(ckpt.tensors.values())):
        done += info.nbytes
        if progress is not None:
            progress(done, total)
        name = info.name
        if name in weights or (m := SCALE.match(name)) and m["module"] in scales:
            module_name = weights.get(name) or m["module"]
            parts[module_name]["weight" if name in weights else "scale"] = t.to(device)
            if len(parts[module_name]) == 2:
                place(module_name)
            continue
        module_name, _, attr = name.rpartition(".")
        target = model_module_name(names, module_name, path) if module_name else ""
        module = model.get_submodule(target)
        _assign(module, attr, _tensor_for(module, attr, info, t, device, dtype))
    if parts:
        raise FP8VLError(f"{path}: FP8 weight or scale without its partner: {', '.join(sorted(parts)[:5])}")
    for base, per_expert in experts.items():
        target = model_module_name(names, base, path)
        parent, _, child = target.rpartition(".")
        act = model.get_submodule(target).act_fn
        model.get_submodule(parent).register_module(child, FP8Experts(per_expert, act))

    _tie_or_fail(model, path)
    model.to(device)   # the real buffers (rotary frequencies); parameters are there already
    return model


def _read_ahead(infos: list[TensorInfo], depth: int = 4) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """(info, tensor) in order, read by a few threads ahead of the caller (pread releases the GIL),
    at most ``depth`` tensors in memory: reads overlap the host-to-device copies."""
    with ThreadPoolExecutor(depth, thread_name_prefix="fp8vl-load") as pool:
        todo = iter(infos)
        queue = deque((i, pool.submit(read_tensor, i)) for i in islice(todo, depth))
        while queue:
            info, fut = queue.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(read_tensor, nxt)))
            yield info, fut.result()


def _tensor_for(module: torch.nn.Module, attr: str, info: TensorInfo, t: torch.Tensor, device: str,
                dtype: torch.dtype) -> torch.Tensor:
    """The checkpoint tensor as the module holds it: float cast to ``dtype``, 3-D fused experts in the
    module's own axis order (Transformers versions store [E, 2I, H] or [E, H, 2I])."""
    want = getattr(module, attr, None)
    if isinstance(want, torch.Tensor) and want.shape != t.shape:
        if t.ndim == 3 and want.shape == t.transpose(1, 2).shape:
            t = t.transpose(1, 2).contiguous()
        else:
            raise FP8VLError(f"{info.file}: tensor {info.name} has shape {tuple(t.shape)}, the model "
                             f"expects {tuple(want.shape)}; the config and the weights disagree")
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device)


def _tie_or_fail(model: torch.nn.Module, path: Path) -> None:
    """Tie lm_head to the embeddings where the config says so; any parameter still on meta is missing."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight.is_meta and not emb.weight.is_meta:
        if not getattr(model.config.get_text_config(), "tie_word_embeddings", False) and \
                not getattr(model.config, "tie_word_embeddings", False):
            raise FP8VLError(f"{path}: no lm_head weight in the checkpoint and the config does not tie it "
                             f"to the embeddings; the checkpoint is incomplete")
        head.weight = emb.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FP8VLError(f"{path}: the checkpoint has no tensor for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; it does not match its config.json")


def load_fp8_model(path: str | Path, device: str = "cpu", mode: str = "auto",
                   dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """``load_model`` for a checkpoint that must be FP8 (one with a quantization_config)."""
    path = Path(path)
    config = open_checkpoint(path, allow_quantized=True).config
    if not config.get("quantization_config"):
        raise FP8VLError(f"{path}: no quantization_config in config.json; load it as a normal model")
    return load_model(path, device, mode, dtype)


# ---------------------------------------------------------------- model + processor, and prompts as inputs

@dataclass
class Loaded:
    model: torch.nn.Module
    processor: object      # a multimodal processor, or a tokenizer for text-only models
    is_vlm: bool
    path: Path
    label: str = ""        # how it runs: "bf16", "fp8 w8a8", ...


def _config(path: Path) -> dict:
    local_folder(path)   # a missing folder is "no such folder", not "no config.json"
    if not (path / "config.json").is_file():
        raise FP8VLError(f"{path}: no config.json; pass a model folder")
    return json.loads((path / "config.json").read_text())


# Files one of which each part needs. Without a vocabulary Transformers builds an empty tokenizer
# that turns every text into no tokens, silently; so their presence is checked before loading.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


PROCESSOR_FIX = "copy the processor and tokenizer files from the model it was made from"


def check_processor(path: Path) -> None:
    """Before any model is loaded: the folder has a tokenizer (and, for a VLM, an image processor)."""
    missing = [f"a tokenizer ({' or '.join(VOCAB_FILES)})"] * (not any((path / f).is_file() for f in VOCAB_FILES))
    if "vision_config" in _config(path) and not any((path / f).is_file() for f in IMAGE_PROCESSOR_FILES):
        missing.append(f"an image processor ({' or '.join(IMAGE_PROCESSOR_FILES)})")
    if missing:
        raise FP8VLError(f"{path}: no {' and no '.join(missing)}; {PROCESSOR_FIX}")


def load_processor(path: str | Path, vlm: bool):
    """The model's processor (or tokenizer); one FP8VLError naming the folder and what is missing."""
    from transformers import AutoProcessor, AutoTokenizer

    path = Path(path)
    check_processor(path)
    fix = PROCESSOR_FIX
    try:
        return AutoProcessor.from_pretrained(path) if vlm else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FP8VLError(f"{path}: cannot load its processor ({first}); {fix}") from e


def load_hf_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> Loaded:
    """Load with Transformers as a user would (FP8 checkpoints are dequantized on load without a GPU)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    path = Path(path)
    vlm = "vision_config" in _config(path)
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    processor = load_processor(path, vlm)   # first: a missing file is reported before a long model load
    model = cls.from_pretrained(path, dtype=dtype, device_map=device).eval()
    return Loaded(model, processor, vlm, path, "transformers")


def load_any(path: str | Path, device: str = "cpu", mode: str = "auto", progress=None) -> Loaded:
    """Any checkpoint through fp8vl's loader: FP8 weights as FP8 linears, everything else as is;
    ``progress(bytes read, total bytes)`` as in load_model."""
    path = Path(path)
    vlm = "vision_config" in _config(path)
    processor = load_processor(path, vlm)   # first: a missing file is reported before a long model load
    model = load_model(path, device, mode, progress=progress)
    return Loaded(model, processor, vlm, path, f"fp8 {mode}" if (mode := fp8_mode(model)) else "bf16")


def model_device(loaded: Loaded) -> torch.device:
    return next(loaded.model.parameters()).device


def encode(loaded: Loaded, text: str, image=None, chat: bool = True, device=None) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt, through the chat template (image first, as Qwen's guides do),
    on ``device`` (default: the model's)."""
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
    return {k: v.to(device or model_device(loaded)) for k, v in batch.items()}


def eos_ids(loaded: Loaded) -> list[int]:
    tok = getattr(loaded.processor, "tokenizer", loaded.processor)
    gen = getattr(loaded.model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None) or tok.eos_token_id
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]
