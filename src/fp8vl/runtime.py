"""Run FP8 block checkpoints in plain PyTorch/Transformers: one Linear module and a loader.

``FP8Linear`` holds the checkpoint's own FP8 weight and block scales and computes, by ``mode``:
- ``"scaled_mm"``: real FP8 tensor-core GEMM (GPU with compute capability >= 8.9; see gemm.py);
- ``"triton"``: the same with fp8vl's Triton kernels for every M (what non-SM90 cards run anyway;
  on SM90 it replaces cuBLAS for prefill, to prove that path);
- ``"w8a8"``: what a W8A8 server computes, simulated: activations quantized per token and per 128
  channels and dequantized, times the dequantized weight, accumulated in float32 (any device);
- ``"dequant"``: weight-only, x @ dequant(W) (any device).
``load_fp8_model`` builds the Transformers model for any fp8vl / Qwen / compressed-tensors FP8
checkpoint without Transformers' own FP8 path (which fetches kernels from the hub) and swaps in
``FP8Linear`` for every FP8 weight.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import FP8VLError
from .kernel import FP8, dequantize_weight, fake_quantize_activations
from .plan import VISION_PARTS
from .shards import read_tensor
from .source import open_checkpoint

MODES = ("auto", "scaled_mm", "triton", "w8a8", "dequant")
EXPERT = re.compile(r"^(?P<base>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(torch.nn.Module):
    """y = x W^T + b with W = weight (e4m3 [N, K]) * weight_scale_inv (float32 [N/128, K/128] tiles)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 mode: str = "w8a8"):
        super().__init__()
        if weight.dtype != FP8:
            raise ValueError(f"FP8Linear needs an e4m3 weight, got {weight.dtype}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", scale.float())
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("scaled_mm", "triton"):
            from .gemm import fp8_linear

            backend = "triton" if self.mode == "triton" else "auto"
            return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, backend)
        w = dequantize_weight(self.weight, self.weight_scale_inv, torch.float32)
        xf = fake_quantize_activations(x.float()) if self.mode == "w8a8" else x.float()
        b = self.bias.float() if self.bias is not None else None
        return F.linear(xf, w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def _model_class(config: dict):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM


def resolve_mode(mode: str, device: str) -> str:
    if mode not in MODES:
        raise FP8VLError(f"unknown runtime mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "scaled_mm" if has_fp8_tensor_cores(device) else "w8a8"
    if mode in ("scaled_mm", "triton") and not has_fp8_tensor_cores(device):
        raise FP8VLError(f"{mode} needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                         "use mode w8a8 or dequant")
    return mode


def load_fp8_model(path: str | Path, device: str = "cpu", mode: str = "auto",
                   dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Load an FP8 block checkpoint with Transformers and FP8Linear modules; offline, any GPU or CPU.

    Transformers loads the FP8 weights cast to ``dtype`` (exact: every e4m3 value is a bf16 value)
    with the config's quantization section removed; each FP8 linear is then replaced by an
    FP8Linear holding the checkpoint's own bytes and scales. Split MoE experts
    (``experts.{e}.{gate,up,down}_proj``) replace the model's fused experts module with
    ``FP8Experts`` (one FP8Linear per expert projection) where its call signature is Transformers
    5's; older fused modules get the dequantized weights instead.
    """
    from transformers import AutoConfig

    path = Path(path)
    mode = resolve_mode(mode, device)
    ckpt = open_checkpoint(path, allow_quantized=True)
    if not ckpt.config.get("quantization_config"):
        raise FP8VLError(f"{path}: no quantization_config in config.json; load it as a normal model")
    config = AutoConfig.from_pretrained(path)
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the scale tensors are "unexpected" to the plain model
    try:
        model = _model_class(ckpt.config).from_pretrained(path, config=config, dtype=dtype, device_map=device)
    finally:
        transformers.logging.set_verbosity(verbosity)
    names = {n for n, _ in model.named_modules()}
    scales = {n.rsplit(".", 1)[0]: t for n, t in ckpt.tensors.items()
              if n.endswith(("weight_scale_inv", "weight_scale"))}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for module_name, st in scales.items():
        q = read_tensor(ckpt.tensors[module_name + ".weight"]).to(device)
        s = read_tensor(st).float().to(device)
        m = EXPERT.match(module_name)
        if m:
            experts.setdefault(m["base"], {}).setdefault(int(m["e"]), {})[m["proj"]] = FP8Linear(q, s, None, mode)
            continue
        target = model_module_name(names, module_name, path)
        old = model.get_submodule(target)
        parent_name, _, child = target.rpartition(".")
        bias = old.bias.data if getattr(old, "bias", None) is not None else None
        model.get_submodule(parent_name).register_module(child, FP8Linear(q, s, bias, mode))
    for base, per_expert in experts.items():
        target = model_module_name(names, base, path)
        fused = model.get_submodule(target)
        if list(inspect.signature(fused.forward).parameters)[:3] == ["hidden_states", "top_k_index", "top_k_weights"]:
            parent_name, _, child = target.rpartition(".")
            model.get_submodule(parent_name).register_module(child, FP8Experts(per_expert, fused.act_fn))
        else:
            _fill_fused_experts(fused, per_expert, base, mode, dtype)
    model.fp8_mode = mode
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
    for i in range(1, len(parts) - 1):
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
    raise FP8VLError(f"{path}: FP8 weight {ckpt_name} matches no single module of the model")


class FP8Experts(torch.nn.Module):
    """Routed experts as FP8Linear modules, called like Transformers 5's fused experts module:
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. Every expert
    projection, down_proj included, sees quantized activations, as on a W8A8 server."""

    def __init__(self, per_expert: dict[int, dict[str, FP8Linear]], act_fn):
        super().__init__()
        n = max(per_expert) + 1
        self.gate_proj = torch.nn.ModuleList(per_expert[e]["gate_proj"] for e in range(n))
        self.up_proj = torch.nn.ModuleList(per_expert[e]["up_proj"] for e in range(n))
        self.down_proj = torch.nn.ModuleList(per_expert[e]["down_proj"] for e in range(n))
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if e >= len(self.gate_proj):
                continue
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            h = self.act_fn(self.gate_proj[e](x)) * self.up_proj[e](x)
            y = self.down_proj[e](h) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _fill_fused_experts(mod: torch.nn.Module, per_expert: dict[int, dict[str, FP8Linear]], base: str,
                        mode: str, dtype: torch.dtype) -> None:
    """Older fused modules: write dequantized per-expert [out, in] weights into the fused
    [E, 2I, H] / [E, H, I] parameters (or their transposed layout); in W8A8 modes the experts'
    input is quantized too (their second GEMM's input is not reachable from outside)."""
    gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not isinstance(gate_up, torch.nn.Parameter) or not isinstance(down, torch.nn.Parameter):
        raise FP8VLError(f"{base}: per-expert FP8 weights, but the model's experts module has no fused "
                         f"gate_up_proj/down_proj parameters to fill")

    def deq(lin: FP8Linear) -> torch.Tensor:
        return dequantize_weight(lin.weight, lin.weight_scale_inv, dtype)

    with torch.no_grad():
        for e, p in per_expert.items():
            gu = torch.cat([deq(p["gate_proj"]), deq(p["up_proj"])], 0)   # [2I, H]
            gate_up[e].copy_(gu if gate_up.shape[1:] == gu.shape else gu.t())
            d = deq(p["down_proj"])                                        # [H, I]
            down[e].copy_(d if down.shape[1:] == d.shape else d.t())
    if mode in ("w8a8", "scaled_mm", "triton"):
        mod.register_forward_pre_hook(lambda _m, args: (fake_quantize_activations(args[0]), *args[1:]))


def fp8_modules(model: torch.nn.Module) -> dict[str, FP8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
