"""Prefill through fp8vl's own decoder layers: what Transformers hands its language model, then
the layer loop, tensor in, tensor out.

- ``decoder_inputs`` runs the model's own embedding, vision tower, DeepStack and M-RoPE position
  logic (Transformers' code, whose signatures change between releases) and stops where the
  language model would start: the base model is called with its ``language_model`` replaced, for
  that one call, by a stand-in that records its keyword arguments.
- ``run_layers`` is the decoder stack (before the final norm) over whole prompts starting at
  position 0: RMSNorm, fused qkv, q/k norm, rotary, the keys/values written into the engine's
  static cache, causal grouped-query SDPA over the prompt's own keys, o, the MLP (fused gate_up;
  an MoE block is called as is), DeepStack features added after the first layers. BF16 and FP8
  run this same loop; with ``fused`` the FP8 linears take activations quantized inside their
  producers (gemm.rmsnorm_quant, silu_mul_quant, attention.add_rmsnorm_quant), as decode does.
  No host syncs and no data-dependent shapes: engine.py captures it in CUDA graphs.

Families: every one ``layers._decoder_layers`` restates whose rotary module returns one
[b, n, hd] table (Qwen3-VL dense and MoE, Qwen3, Llama). Qwen2.5-VL's rotary returns per-axis
tables [3, b, n, hd] (its M-RoPE sections are mixed inside the attention), so it keeps
Transformers' forward for prefill (engine.py decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import _Layer, _text_parts, qk_norm_rope, rms_norm


@dataclass
class DecoderInputs:
    embeds: torch.Tensor                   # [b, n, H] in the model's dtype, image features scattered in
    position_ids: torch.Tensor             # [3, b, n] (M-RoPE: temporal, height, width) or [b, n]
    visual_mask: torch.Tensor | None       # [b, n] bool: image / video positions (DeepStack)
    deepstack: list[torch.Tensor] | None   # per DeepStack layer [v, H], v = visual_mask.sum()
    deltas: list[int]                      # per prompt: M-RoPE position minus sequence index


class _Recorder(torch.nn.Module):
    """Stands in for a VL model's language model for one call: keeps the keyword arguments and
    returns the input embeddings as the last hidden state (the base model's forward only unpacks
    that output into its own)."""

    def __init__(self, embed: torch.nn.Module):
        super().__init__()
        self.kwargs: dict = {}
        self._embed = (embed,)          # a tuple, so that it is not registered as a submodule

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._embed[0]           # the base model embeds input_ids through this

    def forward(self, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        self.kwargs = kwargs
        return BaseModelOutputWithPast(last_hidden_state=kwargs["inputs_embeds"])


@torch.no_grad()
def decoder_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> DecoderInputs:
    """What ``model``'s own forward hands its language model for ``inputs`` (processor output, b
    prompts of n tokens, no padding). Resets ``rope_deltas`` first (Transformers keeps the last
    prompt's there) and leaves this call's deltas in it, as a forward does."""
    base, lm = _text_parts(model)
    ids = inputs["input_ids"]
    b, n = ids.shape
    if lm is base:                      # text-only model: token embeddings, positions 0..n-1
        pos = torch.arange(n, device=ids.device).expand(b, n)
        return DecoderInputs(lm.embed_tokens(ids), pos, None, None, [0] * b)
    mrope = hasattr(base, "rope_deltas")
    if mrope:
        base.rope_deltas = None
    rec = _Recorder(lm.embed_tokens)
    base.language_model = rec
    try:
        base(**inputs, use_cache=False)
    finally:
        base.language_model = lm
    kw = rec.kwargs
    embeds = kw["inputs_embeds"]
    pos = kw.get("position_ids")
    if pos is None:                     # no image: Transformers' language model counts 0..n-1
        pos = torch.arange(n, device=embeds.device).expand(b, n)
    if mrope:
        if pos.ndim == 2:
            pos = pos[None].expand(3, b, n)
        elif pos.shape[0] == 4:         # text positions first (newer Transformers): the rotary reads 1..3
            pos = pos[1:]
    deltas = base.rope_deltas.flatten().tolist() if mrope and base.rope_deltas is not None else [0] * b
    ds = kw.get("deepstack_visual_embeds")
    if ds is not None:                  # some releases hand per-image tuples
        ds = [torch.cat(list(t)) if isinstance(t, (list, tuple)) else t for t in ds]
    return DecoderInputs(embeds, pos, kw.get("visual_pos_masks"), ds or None, [int(x) for x in deltas])


def dense_deepstack(d: DecoderInputs) -> torch.Tensor | None:
    """DeepStack features as [D, b, n, H] in the embeddings' dtype, zeros off the visual positions:
    adding it equals Transformers' masked add (x + 0 == x), and the add inside the layer loop needs
    no data-dependent indexing (a CUDA graph cannot take one); the scatter here runs eagerly."""
    if not d.deepstack:
        return None
    out = d.embeds.new_zeros((len(d.deepstack), *d.embeds.shape))
    out[:, d.visual_mask.to(out.device)] = torch.stack(d.deepstack).to(out)
    return out


def run_layers(layers: list[_Layer], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               deepstack: torch.Tensor | None, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
               slots: torch.Tensor, fused: str | None = None) -> torch.Tensor:
    """The decoder stack over prompts starting at position 0: x [b, n, H] embeddings, cos, sin
    [b, n, hd] rotary tables, deepstack [D, b, n, H] (``dense_deepstack``) or None -> [b, n, H]
    hidden states before the final norm. Writes layer i's roped keys and values into
    ``k_caches[i]``, ``v_caches[i]`` [B, KV, L, hd] at [slots[j], :, :n] for prompt j (slots [b]
    long). ``fused``: the FP8 GEMM backend when every linear is an FP8Linear running real kernels
    (engine._fused_mode), else None (the modules are called)."""
    b, n, width = x.shape
    hd, kv = cos.shape[-1], k_caches[0].shape[1]
    cos, sin = cos[:, None], sin[:, None]                              # [b, 1, n, hd]
    if fused:
        from ..kernels.attention import add_rmsnorm_quant
        from ..kernels.gemm import fp8_gemm, quantize_activations_gpu, rmsnorm_quant, silu_mul_quant

        def lin(m, xq_xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:      # [b*n, N]
            return fp8_gemm(*xq_xs, m.weight, m.weight_scale_inv, x.dtype, m.bias, fused, m.counters)
        x = x.reshape(b * n, width)                                    # the residual stream, [b*n, H]
        h = rmsnorm_quant(x, layers[0].ln1, layers[0].eps)
    for i, L in enumerate(layers):
        qkv = lin(L.qkv, h).view(b, n, -1) if fused else L.qkv(rms_norm(x, L.ln1, L.eps))
        q, k, v = qk_norm_rope(qkv, L.q_norm, L.k_norm, L.eps, cos, sin, kv, hd)   # [b, heads, n, hd]
        nh = q.shape[1]
        k_caches[i][slots, :, :n] = k
        v_caches[i][slots, :, :n] = v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=L.scaling, enable_gqa=True)
        a = a.transpose(1, 2).reshape(b, n, nh * hd)
        ds = deepstack[i] if deepstack is not None and i < deepstack.shape[0] else None
        if fused:
            x, *h = add_rmsnorm_quant(x, lin(L.o, quantize_activations_gpu(a.view(b * n, -1))), L.ln2, L.eps)
            delta = lin(L.down, silu_mul_quant(lin(L.gate_up, h)))
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if ds is None and nxt is not None:
                x, *h = add_rmsnorm_quant(x, delta, nxt.ln1, nxt.eps)
                continue
            x = x + delta
            if ds is not None:
                x = x + ds.reshape(b * n, width)
            if nxt is not None:
                h = rmsnorm_quant(x, nxt.ln1, nxt.eps)
            continue
        x = x + L.o(a)
        h = rms_norm(x, L.ln2, L.eps)
        if L.mlp is not None:           # MoE block: router + experts, as the model defines them
            x = x + L.mlp(h)
        else:
            g, u = L.gate_up(h).chunk(2, -1)
            x = x + L.down(L.act(g) * u)
        if ds is not None:
            x = x + ds
    return x.view(b, n, width)
