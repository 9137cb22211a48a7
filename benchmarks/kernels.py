"""GEMM table on the GPU: BF16 vs fp8vl's FP8 W8A8 linear at Qwen3-VL-8B's linear shapes.

For each (M, N, K): BF16 ``F.linear``, fp8vl ``fp8_linear`` (activation quantization included)
and, for M >= 8, ``scaled_mm`` alone; times by CUDA events (median of many, inputs rotated so
the weights are not served from L2), TFLOP/s, and GB/s of the bytes each must move, against
the card's ceilings measured in the same run (device-to-device copy, 8192^3 BF16 matmul).

    python benchmarks/kernels.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from fp8vl.gemm import decode_linear, fp8_linear, prefill_linear, quantize_activations_gpu
from fp8vl.kernel import quantize_weight

SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (12288, 4096),
          "down_proj": (4096, 12288), "qkv fused": (6144, 4096), "gate_up fused": (24576, 4096)}
MS = (1, 2, 4, 8, 16, 32, 64, 512, 2048)


def timed(fn, sets: int, calls: int = 20, reps: int = 15) -> float:
    """Median milliseconds per call: ``calls`` calls (rotating over ``sets`` input sets, so weights
    come from HBM, not L2) captured in one CUDA graph, so launch overhead is what a server sees."""
    for i in range(sets):
        fn(i)                      # compiles and autotunes outside the graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def ceilings() -> tuple[float, float]:
    """(GB/s of a 4 GiB device copy counting read + write, TFLOP/s of a BF16 8192^3 matmul)."""
    src = torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda i: dst.copy_(src), 1, 5, 5)
    bw = 2 * src.numel() * 2 / ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda i: a @ b, 1, 5, 5)
    return bw, 2 * 8192**3 / ms / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="*", default=list(MS))
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    bw, peak = ceilings()
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; measured ceilings: copy {bw:.0f} GB/s, "
          f"BF16 matmul {peak:.0f} TFLOP/s\n")
    print("| linear | M | BF16 ms | FP8 ms | FP8 speed-up | FP8 TFLOP/s | FP8 GB/s (% of copy) "
          "| decode kernel ms | act-quant + scaled_mm ms | scaled_mm alone ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, (n, k) in SHAPES.items():
        sets = 4  # 4 weight copies > L2, so every call streams its weight from HBM
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
        qs = [quantize_weight(w) for w in ws]
        for m in a.ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
            t_bf16 = timed(lambda i: F.linear(xs[i % sets], ws[i % sets]), sets)
            t_fp8 = timed(lambda i: fp8_linear(xs[i % sets], *qs[i % sets]), sets)
            t_dec = f"{timed(lambda i: decode_linear(xs[i % sets], *qs[i % sets]), sets):.4f}" if m <= 16 else "-"
            t_pre = f"{timed(lambda i: prefill_linear(xs[i % sets], *qs[i % sets]), sets):.4f}" if m >= 1 else "-"
            alone = "-"
            if m >= 8 and m % 4 == 0:
                xq = [quantize_activations_gpu(x) for x in xs]
                alone = f"{timed(lambda i: F.scaled_mm(xq[i % sets][0], qs[i % sets][0].t(), xq[i % sets][1], F.ScalingType.BlockWise1x128, qs[i % sets][1].t(), F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16), sets):.4f}"  # noqa: E501
            flops = 2 * m * n * k
            moved = n * k + m * k * 2 + m * n * 2 + (n // 128) * (k // 128) * 4
            print(f"| {label} {n}x{k} | {m} | {t_bf16:.4f} | {t_fp8:.4f} | {t_bf16 / t_fp8:.2f}x | "
                  f"{flops / t_fp8 / 1e9:.1f} | {moved / t_fp8 / 1e6:.0f} ({moved / t_fp8 / 1e6 / bw:.0%}) | "
                  f"{t_dec} | {t_pre} | {alone} |", flush=True)
        del ws, qs


if __name__ == "__main__":
    main()
