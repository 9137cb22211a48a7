"""Decode attention block on the GPU: the engine's torch sequence against attention.py's kernels.

Per decoder layer, from the qkv projection's output to the o projection's quantized input, at the
Qwen3-VL-8B shapes (H=32, KV=8, D=128, q/k norms): the torch reference is what Engine._decode
runs without the kernels, layers.torch_attention_block (split, q/k RMSNorm, rotate_half rotary, two
index_put cache writes, SDPA with a boolean mask over the static cache), then
gemm.quantize_activations_gpu; the fused one is
``qk_norm_rope_cache`` + ``decode_attention(quantize=True)``. Every row's length is L - 1 (a full
cache: the kernels' worst case; the reference reads the whole cache at any length). Timings are
CUDA-graph replays of back-to-back calls rotating over enough layers' caches to exceed 4x L2
(at most 36, the 8B's layer count); median of a few replays. Launch counts come from the profiler.

    python benchmarks/attention.py            # Markdown tables, < 60 s on an H200
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return ap.parse_args()


if __name__ == "__main__":
    arguments()   # --help and a bad argument answer here, before torch and fp8vl load (seconds)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linears import timed  # noqa: E402  (the CUDA-graph timer the linear tables use)

from fp8vl.kernels import attention, gemm  # noqa: E402
from fp8vl.runtime.layers import torch_attention_block  # noqa: E402

H, KV, D, HIDDEN, LAYERS, EPS = 32, 8, 128, 4096, 36, 1e-6


def reference(qkv, qn, kn, cos, sin, kc, vc, lens, rows, mask):
    """engine._decode's attention block, fused (FP8) mode: -> (out_q, out_s) for the o projection."""
    a = torch_attention_block(qkv, qn, kn, EPS, cos, sin, kc, vc, lens, D ** -0.5, rows, mask)
    return gemm.quantize_activations_gpu(a)


def fused(qkv, qn, kn, cos, sin, kc, vc, lens):
    q = attention.qk_norm_rope_cache(qkv, qn, kn, EPS, cos, sin, kc, vc, lens)
    return attention.decode_attention(q, kc, vc, lens, D ** -0.5, quantize=True)


def launches(fn) -> int:
    """GPU kernels one eager call launches (profiler)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def rows(L: int, b: int, l2: int) -> None:
    dev = "cuda"
    cache_bytes = 2 * b * KV * L * D * 2
    copies = min(LAYERS, max(2, math.ceil(4 * l2 / cache_bytes)))
    caches = [(torch.randn(b, KV, L, D, device=dev, dtype=torch.bfloat16),
               torch.randn(b, KV, L, D, device=dev, dtype=torch.bfloat16)) for _ in range(copies)]
    qkv = torch.randn(b, (H + 2 * KV) * D, device=dev, dtype=torch.bfloat16)
    qn, kn = (torch.rand(D, device=dev) + 0.5).to(torch.bfloat16), (torch.rand(D, device=dev) + 0.5).to(torch.bfloat16)
    ang = torch.rand(b, D // 2, device=dev) * 100
    cos = torch.cat([ang.cos()] * 2, -1).to(torch.bfloat16)
    sin = torch.cat([ang.sin()] * 2, -1).to(torch.bfloat16)
    lens = torch.full((b,), L - 1, device=dev, dtype=torch.long)
    rws = torch.arange(b, device=dev)
    mask = (torch.arange(L, device=dev)[None, :] <= lens[:, None])[:, None, None, :]   # once per step, untimed
    t_ref = timed(lambda i: reference(qkv, qn, kn, cos, sin, *caches[i], lens, rws, mask), copies)
    t_new = timed(lambda i: fused(qkv, qn, kn, cos, sin, *caches[i], lens), copies)
    q = attention.qk_norm_rope_cache(qkv, qn, kn, EPS, cos, sin, *caches[0], lens)
    t_rope = timed(lambda i: attention.qk_norm_rope_cache(qkv, qn, kn, EPS, cos, sin, *caches[i], lens), copies)
    t_att = timed(lambda i: attention.decode_attention(q, *caches[i], lens, D ** -0.5, quantize=True), copies)
    n_ref = launches(lambda: reference(qkv, qn, kn, cos, sin, *caches[0], lens, rws, mask))
    n_new = launches(lambda: fused(qkv, qn, kn, cos, sin, *caches[0], lens))
    gbs = cache_bytes / t_att / 1e6
    splits = attention.attention_splits(b, KV, L, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"| {L} | {b} | {t_ref * 1e3:.1f} | {t_new * 1e3:.1f} | {t_ref / t_new:.1f}x | {n_ref} | {n_new} | "
          f"{t_rope * 1e3:.1f} | {t_att * 1e3:.1f} | {splits} | {gbs:.0f} | {(t_ref - t_new) * LAYERS:.2f} |",
          flush=True)
    del caches


def norm_rows(b: int) -> None:
    x = torch.randn(b, HIDDEN, device="cuda", dtype=torch.bfloat16)
    dx = torch.randn(b, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(HIDDEN, device="cuda").to(torch.bfloat16)
    t_ref = timed(lambda i: gemm.rmsnorm_quant(x + dx, w, EPS), 1)
    t_new = timed(lambda i: attention.add_rmsnorm_quant(x, dx, w, EPS), 1)
    print(f"| {b} | {t_ref * 1e3:.1f} | {t_new * 1e3:.1f} | {t_ref / t_new:.1f}x |", flush=True)


def main() -> None:
    arguments()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB; "
          f"torch {torch.__version__}\n")
    print(f"Attention block per layer (qkv output -> o projection's quantized input), 8B shapes H={H} KV={KV} "
          f"D={D}, every row at length L - 1:\n")
    print("| L | b | torch us | fused us | speed-up | torch launches | fused launches | rope+cache us "
          f"| attention us | splits | attention KV GB/s | saved ms per step ({LAYERS} layers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for L in (512, 2048):
        for b in (1, 8, 32, 64):
            rows(L, b, props.L2_cache_size)
    print(f"\nResidual add + RMSNorm + act-quant, K={HIDDEN}:\n")
    print("| b | x + delta, rmsnorm_quant us | add_rmsnorm_quant us | speed-up |\n|---|---|---|---|")
    for b in (1, 8, 64):
        norm_rows(b)


if __name__ == "__main__":
    main()
