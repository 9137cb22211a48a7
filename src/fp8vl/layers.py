"""fp8vl's view of a decoder: the Llama/Qwen decoder layer's weights as the engine runs them.

``_decoder_layers`` reads each layer of a Transformers model into a ``_Layer`` (RMSNorm weights,
fused qkv and gate_up linears, q/k norms, the MoE block as is); ``rms_norm`` and ``_rotate_half``
are Transformers' own math. Used by engine.py (decode) and prefill.py (prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .runtime import FP8Linear


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    qkv: torch.nn.Module
    o: torch.nn.Module
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    gate_up: torch.nn.Module | None      # dense MLP, fused
    down: torch.nn.Module | None
    act: object
    mlp: torch.nn.Module | None          # MoE block, called as is
    scaling: float


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' RMSNorm of the Llama/Qwen families: normalize in float32, scale in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def fuse_linears(mods: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)``; the originals become row views of it
    (no extra memory, and the model's own forward keeps working). None where the layouts differ or
    an FP8 part's rows are not whole 128-row scale blocks."""
    if all(isinstance(m, FP8Linear) for m in mods):
        if any(m.out_features % 128 for m in mods) or len({m.mode for m in mods}) > 1:
            return None
        fused = FP8Linear(torch.cat([m.weight for m in mods]), torch.cat([m.weight_scale_inv for m in mods]),
                          torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None, mods[0].mode)
        row = 0
        for m in mods:
            n = m.out_features
            m.weight, m.weight_scale_inv = fused.weight[row:row + n], fused.weight_scale_inv[row // 128:(row + n) // 128]
            if m.bias is not None:
                m.bias = torch.nn.Parameter(fused.bias.data[row:row + n], requires_grad=False)
            row += n
        return fused
    if all(type(m) is torch.nn.Linear for m in mods) and len({m.bias is None for m in mods}) == 1:
        w = torch.cat([m.weight.data for m in mods])
        fused = torch.nn.Linear(w.shape[1], w.shape[0], bias=mods[0].bias is not None, device="meta")
        fused.weight = torch.nn.Parameter(w, requires_grad=False)
        if mods[0].bias is not None:
            fused.bias = torch.nn.Parameter(torch.cat([m.bias.data for m in mods]), requires_grad=False)
        row = 0
        for m in mods:
            n = m.out_features
            m.weight = torch.nn.Parameter(w[row:row + n], requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(fused.bias.data[row:row + n], requires_grad=False)
            row += n
        return fused
    return None


def _text_parts(model: torch.nn.Module):
    base = model.model
    lm = getattr(base, "language_model", base)
    return base, lm


def _decoder_layers(model: torch.nn.Module) -> list[_Layer] | None:
    """fp8vl's view of each decoder layer, or None for a family the engine does not restate."""
    _, lm = _text_parts(model)
    out = []
    for layer in lm.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or hasattr(layer, "pre_feedforward_layernorm") or \
                getattr(attn, "sliding_window", None) or not hasattr(attn, "q_proj"):
            return None
        qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp = layer.mlp
        dense = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj]) if dense else None
        if qkv is None or (dense and gate_up is None):
            return None
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        out.append(_Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                          layer.input_layernorm.variance_epsilon, qkv, attn.o_proj,
                          qn.weight if qn is not None else None, kn.weight if kn is not None else None,
                          gate_up, mlp.down_proj if dense else None, mlp.act_fn if dense else None,
                          None if dense else mlp, attn.scaling))
    return out
