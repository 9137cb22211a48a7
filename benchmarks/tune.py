"""Launch-config sweep on this GPU for fp8vl's Triton linears, at the Qwen3-VL decoder shapes.

For each linear (q/k/v and gate/up fused, as the engine runs them) and M, every config of the
decode GEMV (M = 1, 8) or of the Triton block GEMM (M = 512, 2048) is timed the way
benchmarks/linears.py times (a CUDA graph of back-to-back calls over enough weight copies to
exceed 4x L2), next to BF16 cuBLAS and a floor measured in the same run: a pure-read kernel over
the same number of bytes, rotated over the same number of copies (the least any kernel reading
this weight can take, launch and tail included). Prints the best configs as a Markdown table
and, with ``--all``, every config. What gemm.py's tables and autotune space are built from.

    python benchmarks/tune.py                   # 8B shapes
    python benchmarks/tune.py --models 2B 8B --all
    python benchmarks/tune.py --partials --prefill-m   # the decode GEMV as the engine runs it
"""

from __future__ import annotations

import argparse
import itertools


def arguments(models: list[str] | None = None) -> argparse.Namespace:
    """``models``: linears.py's MODELS, the choices of --models once it is imported (it imports torch)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["8B"], choices=models,
                    help="shapes of benchmarks/linears.py's MODELS (8B, 2B, 4B, 32B)")
    ap.add_argument("--decode-m", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--prefill-m", nargs="*", type=int, default=[512, 2048])
    ap.add_argument("--all", action="store_true", help="print every config, not just the best")
    ap.add_argument("--partials", action="store_true",
                    help="sweep the GEMV as the engine's decode step runs it: launched plainly, split-K partials "
                         "left to the consumer (the 'PDL' columns then mean that mode)")
    return ap.parse_args()


if __name__ == "__main__":
    arguments()   # --help and a bad argument answer here, before torch, Triton and fp8vl load (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from fp8vl.kernels import gemm  # noqa: E402
from linears import MODELS, read_floor, shapes, timed, weight_copies  # noqa: E402  (benchmarks/linears.py)


def gemv_configs(n: int, k: int, prefetch=(0, 4, 16)):
    """120 GEMV configs (40 with ``prefetch`` (0,)), weight loads unmasked in N where the tiles
    cover it (``EVEN_N``, as the table has them). 64- and 128-row tiles: the weight is the tensor
    cores' A operand (64 rows at least for Hopper's wgmma); earlier sweeps of the untransposed
    kernel (16-32 rows, 8 warps, 8 K blocks per step) never picked 8 warps or 8 K blocks.
    PREFETCH (K blocks pulled into L2 before waiting for the producer) pays only launched with PDL."""
    for bn, split, (unroll, stages), prefetch in itertools.product(
            (64, 128), (1, 2, 4, 8), ((1, 4), (1, 6), (2, 3), (2, 4), (4, 3)), prefetch):
        if split == 1 or (k // 128) // split >= unroll:
            yield gemm.LaunchConfig({"BLOCK_N": bn, "SPLIT_K": split, "UNROLL": unroll, "PREFETCH": prefetch,
                                     "EVEN_N": n % bn == 0}, 4, stages)


def tma_configs():
    for bm, warps, stages, group in itertools.product((64, 128), (4, 8), (3, 4, 5), (8, 32)):
        if bm == 128 and warps == 4:
            continue   # too many accumulator registers per thread
        yield gemm.LaunchConfig({"BLOCK_M": bm, "GROUP_M": group}, warps, stages)


def gemm_configs():
    for bm, bn, warps, stages, group, pairs in itertools.product((64, 128), (128, 256), (4, 8), (3, 4), (8, 32),
                                                                 (False, True)):
        if bm * bn >= 128 * 256 and warps == 4:
            continue   # too many accumulator registers per thread
        yield gemm.LaunchConfig({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group, "PAIRS": pairs}, warps, stages)


def name(cfg: gemm.LaunchConfig) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w={cfg.num_warps} s={cfg.num_stages}"


def sweep(run, configs, copies: int) -> list[tuple[float, gemm.LaunchConfig]]:
    out = []
    for cfg in configs:
        try:
            out.append((timed(lambda i: run(i, cfg), copies, reps=5), cfg))
        except Exception as e:   # out of shared memory or registers for this config: skip it
            if "OutOfResources" not in type(e).__name__ and "out of resource" not in str(e).lower():
                raise
    return sorted(out, key=lambda t: t[0])


def main() -> None:
    a = arguments(list(MODELS))
    props = torch.cuda.get_device_properties(0)
    l2, sms = props.L2_cache_size, props.multi_processor_count
    print(f"device: {props.name}, {sms} SMs, L2 {l2 / 2**20:.0f} MiB; torch {torch.__version__}, "
          f"triton {triton.__version__}\n", flush=True)
    print("| linear (N x K) | M | BF16 ms | read floor ms | read floor, PDL ms | table config, plain launch ms "
          "| table config, PDL ms | best GEMV, PDL ms | best config | table PDL/BF16 | best/BF16 | PDL floor/best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    prefill_header = False
    for model in a.models:
        for lname, (n, k) in shapes(model).items():
            s, c16, c8, ws16, qs = weight_copies(n, k, l2)
            floor = read_floor(n * k + s.numel() * 4, l2)
            floor_pdl = read_floor(n * k + s.numel() * 4, l2, pdl=True)
            counters = gemm.gemv_counters(n, "cuda")
            for m in a.decode_m:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xq, xs = gemm.quantize_activations_gpu(x)
                t16 = timed(lambda i: F.linear(x, ws16[i]), c16)
                mode = dict(partials=True) if a.partials else dict(use_pdl=True)
                configs = gemv_configs(n, k, (0,) if a.partials else (0, 4, 16))
                res = sweep(lambda i, cfg: gemm._gemv(xq, xs, *qs[i], torch.bfloat16, None, True, cfg, counters,
                                                      **mode), configs, c8)
                best_t, best = res[0]
                plain = gemm.decode_config(m, n, k, sms)
                table = plain if a.partials else gemm.decode_config(m, n, k, sms, pdl=True)
                tp = timed(lambda i: gemm._gemv(xq, xs, *qs[i], torch.bfloat16, None, True, plain, counters), c8)
                tt = timed(lambda i: gemm._gemv(xq, xs, *qs[i], torch.bfloat16, None, True, table, counters,
                                                **mode), c8)
                print(f"| {model} {lname} {n}x{k} | {m} | {t16:.4f} | {floor:.4f} | {floor_pdl:.4f} | {tp:.4f} | "
                      f"{tt:.4f} | {best_t:.4f} | {name(best)} | {t16 / tt:.2f}x | {t16 / best_t:.2f}x | "
                      f"{floor_pdl / best_t:.0%} |", flush=True)
                rows += [(model, lname, m, t, cfg) for t, cfg in res]
            for m in a.prefill_m if model == a.models[-1] else ():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xq, xs = gemm.quantize_activations_gpu(x)
                t16 = timed(lambda i: F.linear(x, ws16[i]), c16, reps=5)
                tma = gemm.use_tma(x.device)   # SM90+: the TMA kernel's configs; else the pointer kernel's
                res = sweep(lambda i, cfg: gemm._block_gemm(xq, xs, *qs[i], torch.bfloat16, None, True, cfg),
                            tma_configs() if tma else gemm_configs(), c8)
                best_t, best = res[0]
                table = gemm.tma_config(m) if tma else gemm.prefill_config(m, n, k, sms)
                tt = timed(lambda i: gemm._block_gemm(xq, xs, *qs[i], torch.bfloat16, None, True, table), c8, reps=5)
                tf = 2 * m * n * k / 1e9
                if not prefill_header:
                    prefill_header = True
                    print("\n| prefill linear (N x K) | M | BF16 ms (TFLOP/s) | best block GEMM ms (TFLOP/s) "
                          "| table config ms | best config | best/BF16 | table/BF16 |\n|---|---|---|---|---|---|---|---|")
                print(f"| {model} {lname} {n}x{k} | {m} | {t16:.4f} ({tf / t16:.0f}) | {best_t:.4f} ({tf / best_t:.0f}) | "
                      f"{tt:.4f} | {name(best)} | {t16 / best_t:.2f}x | {t16 / tt:.2f}x |", flush=True)
                rows += [(model, lname, m, t, cfg) for t, cfg in res]

    if a.all:
        print("\n| model | linear | M | ms | config |\n|---|---|---|---|---|")
        for model, lname, m, t, cfg in rows:
            print(f"| {model} | {lname} | {m} | {t:.4f} | {name(cfg)} |")


if __name__ == "__main__":
    main()
