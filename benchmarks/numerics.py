"""The CPU's W8A8 product: ``numerics.w8a8_matmul`` (exact per-128 group sums in float64, each row its
own: batch-invariant) against the float32 GEMM of the dequantized operands it replaced (a row's
rounding depends on the rows beside it), side by side in one run, and whether each is batch-invariant.

    python benchmarks/numerics.py                 # the tiny test model's and a Qwen3-VL-8B layer's shapes
"""

from __future__ import annotations

import argparse
import time

SHAPES = {"tiny (256 -> 512)": (512, 256), "8B o_proj (4096 -> 4096)": (4096, 4096),
          "8B gate_up (4096 -> 24576)": (24576, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8", help="M values (tokens in one call)")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    import torch

    from fp8vl.kernels.numerics import dequantize_weight, fake_quantize_activations, quantize_weight, w8a8_matmul

    def float32_gemm(x, q, s):
        return fake_quantize_activations(x.float()) @ dequantize_weight(q, s, torch.float32).t()

    def ms(fn, *args) -> float:
        fn(*args)
        t = time.perf_counter()
        for _ in range(a.reps):
            fn(*args)
        return (time.perf_counter() - t) / a.reps * 1e3

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape | M | float32 GEMM ms | w8a8_matmul ms | ratio | float32 rows invariant | w8a8_matmul rows invariant |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        q, s = quantize_weight(torch.randn(n, k, generator=g) * 0.02)
        for m in (int(v) for v in a.rows.split(",")):
            x = torch.randn(max(m, 8), k, generator=g)[:m]
            same = {f.__name__: all(torch.equal(f(x, q, s)[r:r + 1], f(x[r:r + 1], q, s)) for r in range(m))
                    for f in (float32_gemm, w8a8_matmul)}
            t32, t64 = ms(float32_gemm, x, q, s), ms(w8a8_matmul, x, q, s)
            print(f"| {name} | {m} | {t32:.2f} | {t64:.2f} | {t64 / t32:.2f}x | {same['float32_gemm']} | "
                  f"{same['w8a8_matmul']} |", flush=True)


if __name__ == "__main__":
    main()
