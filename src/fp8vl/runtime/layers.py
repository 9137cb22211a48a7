"""fp8vl's view of a decoder: the Llama/Qwen decoder layer's weights as the engine runs them.

``_decoder_layers`` reads each layer of a Transformers model into a ``_Layer`` (RMSNorm weights,
fused qkv and gate_up linears, q/k norms, the MoE block as is); ``rms_norm`` and ``_rotate_half``
are Transformers' own math, ``qk_norm_rope`` the q/k norm and rotary both prefill and decode
apply; ``torch_attention_block`` (and its two halves) is the decode attention
block in torch ops, what ``Engine._decode`` runs where the Triton kernels do not apply and what
those kernels are tested against. Used by engine.py (decode) and prefill.py (prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fp8_modules import FP8Linear


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


def qk_norm_rope(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor, kv: int, d: int):
    """qkv [b, n, (H + 2 KV) D] -> q [b, H, n, D], k, v [b, KV, n, D]: q and k RMSNormed per head
    (q_norm, k_norm [D], or both None) and rotated (cos, sin broadcastable to [b, 1, n, D])."""
    b, n = qkv.shape[:2]
    h = qkv.shape[-1] // d - 2 * kv
    q, k, v = qkv.split([h * d, kv * d, kv * d], -1)
    q, k, v = q.view(b, n, h, d), k.view(b, n, kv, d), v.view(b, n, kv, d)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def torch_qk_norm_rope_cache(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                             cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                             lens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [b, (H + 2 KV) D] -> q [b, H, 1, D], RMSNormed per head (q_norm, k_norm [D], or both None)
    and rotated (cos, sin [b, D]); k (normed, rotated) and v are written in place at position lens[r]
    of cache row r (kc, vc [>= b, KV, L, D]). ``rows``: arange(b), when the caller keeps one."""
    b = qkv.shape[0]
    q, k, v = qk_norm_rope(qkv[:, None], q_norm, k_norm, eps, cos[:, None, None], sin[:, None, None],
                           kc.shape[1], kc.shape[3])
    rows = torch.arange(b, device=qkv.device) if rows is None else rows
    kc[rows, :, lens] = k[:, :, 0]
    vc[rows, :, lens] = v[:, :, 0]
    return q


def torch_decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, lens: torch.Tensor, scale: float,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query SDPA of q [b, H, 1, D] over cache rows [0, b) of kc, vc [>= b, KV, L, D], positions
    0..lens[r] of row r -> [b, H * D]. ``mask``: the boolean [b, 1, 1, L] of those positions, when the
    caller builds it once for all layers."""
    b, h, _, d = q.shape
    if mask is None:
        mask = (torch.arange(kc.shape[2], device=q.device)[None, :] <= lens[:, None])[:, None, None, :]
    a = F.scaled_dot_product_attention(q, kc[:b], vc[:b], attn_mask=mask, scale=scale, enable_gqa=True)
    return a.transpose(1, 2).reshape(b, h * d)


def torch_attention_block(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                          cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, lens: torch.Tensor,
                          scale: float, rows: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer's decode attention: qkv [b, (H + 2 KV) D] -> [b, H * D], the o projection's
    input; writes this step's k, v into the cache (see the two functions above for shapes)."""
    q = torch_qk_norm_rope_cache(qkv, q_norm, k_norm, eps, cos, sin, kc, vc, lens, rows)
    return torch_decode_attention(q, kc, vc, lens, scale, mask)
