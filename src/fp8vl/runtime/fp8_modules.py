"""Run FP8 block checkpoints in plain PyTorch/Transformers: one Linear module and a loader.

``FP8Linear`` holds the checkpoint's own FP8 weight and block scales and computes, by ``mode``:
- ``"scaled_mm"``: real FP8 tensor-core GEMM (GPU with compute capability >= 8.9; see kernels/gemm.py);
- ``"triton"``: the same with fp8vl's Triton kernels for every M (what non-SM90 cards run anyway;
  on SM90 it replaces cuBLAS for prefill, to prove that path);
- ``"w8a8"``: what a W8A8 server computes, simulated (``numerics.w8a8_matmul``): activations quantized
  per token and per 128 channels, products summed per 128-wide K block and scaled, float32
  accumulate; each row's result independent of the other rows in the call (any device);
- ``"dequant"``: weight-only, x @ dequant(W) (any device).
loader.py puts them into Transformers' models (without Transformers' own FP8 path, which fetches
kernels from the hub); engine.py runs them.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..errors import FP8VLError
from ..kernels.numerics import FP8, dequantize_weight, w8a8_matmul

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
        # the decode GEMV's split-K arrival counters (gemm.gemv_counters: int32 [4 * N/16], kept zero
        # by the kernel), owned here so no call pays a zero-fill launch; not part of the checkpoint
        self.register_buffer("counters", torch.zeros(4 * -(-self.out_features // 16), dtype=torch.int32,
                                                     device=weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("scaled_mm", "triton"):
            from ..kernels.gemm import fp8_linear

            backend = "triton" if self.mode == "triton" else "auto"
            return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, backend, self.counters)
        b = self.bias.float() if self.bias is not None else None
        if self.mode == "w8a8":
            y = w8a8_matmul(x, self.weight, self.weight_scale_inv)
            return (y if b is None else y + b).to(x.dtype)
        w = dequantize_weight(self.weight, self.weight_scale_inv, torch.float32)
        return F.linear(x.float(), w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def resolve_mode(mode: str, device: str) -> str:
    if mode not in MODES:
        raise FP8VLError(f"unknown runtime mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "scaled_mm" if has_fp8_tensor_cores(device) else "w8a8"
    if mode in ("scaled_mm", "triton") and not has_fp8_tensor_cores(device):
        raise FP8VLError(f"{mode} needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                         "use mode w8a8 or dequant")
    return mode


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
        self.stacked = self._stack()

    def _stack(self) -> tuple[torch.Tensor, ...] | None:
        """The experts as two stacked FP8 tensors, gate_up [E, 2I, H] and down [E, H, I] with their
        scales, for the grouped GEMV (one launch for all experts, no host sync: CUDA-graph safe); the
        per-expert modules become views of them (no extra memory). None where rows are not whole
        128-row scale blocks or the activation is not SiLU."""
        g0 = self.gate_proj[0]
        if g0.out_features % 128 or "silu" not in type(self.act_fn).__name__.lower():
            return None
        gu = torch.stack([torch.cat([g.weight, u.weight]) for g, u in zip(self.gate_proj, self.up_proj)])
        gus = torch.stack([torch.cat([g.weight_scale_inv, u.weight_scale_inv])
                           for g, u in zip(self.gate_proj, self.up_proj)])
        dn = torch.stack([d.weight for d in self.down_proj])
        dns = torch.stack([d.weight_scale_inv for d in self.down_proj])
        i, si = g0.out_features, g0.out_features // 128
        for e, (g, u, d) in enumerate(zip(self.gate_proj, self.up_proj, self.down_proj)):
            g.weight, u.weight, d.weight = gu[e, :i], gu[e, i:], dn[e]
            g.weight_scale_inv, u.weight_scale_inv, d.weight_scale_inv = gus[e, :si], gus[e, si:], dns[e]
        return gu, gus, dn, dns

    def _grouped(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """W8A8 on the GPU in four launches: x [T, H] quantized once, each (token, expert) pair a row of
        the grouped GEMV for gate_up, SiLU-and-mul quantized in one kernel, grouped down, weighted sum."""
        from ..kernels.gemm import fp8_grouped_gemm, quantize_activations_gpu, silu_mul_quant

        gu, gus, dn, dns = self.stacked
        t, k = top_k_index.shape
        xq, xs = quantize_activations_gpu(x)
        ids = top_k_index.reshape(-1).to(torch.int32)
        rows = torch.arange(t, device=x.device).repeat_interleave(k)     # [T*k] token of each pair
        h = fp8_grouped_gemm(xq[rows], xs[rows], gu, gus, ids, x.dtype)    # [T*k, 2I]
        y = fp8_grouped_gemm(*silu_mul_quant(h), dn, dns, ids, torch.float32)  # [T*k, H]
        return (y.view(t, k, -1) * top_k_weights[..., None].float()).sum(1).to(x.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None and hidden_states.is_cuda and self.gate_proj[0].mode in ("scaled_mm", "triton") \
                and top_k_index.numel() <= 256:
            return self._grouped(hidden_states, top_k_index, top_k_weights)
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


def fp8_mode(model: torch.nn.Module) -> str | None:
    """How the model's FP8 linears compute (scaled_mm, triton, w8a8, dequant), or None without any."""
    return next((m.mode for m in model.modules() if isinstance(m, FP8Linear)), None)


def fp8_modules(model: torch.nn.Module) -> dict[str, FP8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
