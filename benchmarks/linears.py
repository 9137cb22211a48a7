"""Linear-layer table on the GPU: fp8vl's FP8 paths against BF16 cuBLAS and a measured read ceiling.

Ceilings, measured in the same run: a pure-read Triton kernel over a buffer >= 4x the L2 cache
(GB/s of reads only: the decode ceiling) and BF16 cuBLAS itself. Every timing is a CUDA graph of
back-to-back calls rotating over enough weight copies to exceed 4x L2 (computed from
``L2_cache_size`` per shape and dtype), so weights stream from HBM; median of a few replays.

Decode rows (M = 1, 8), at the Qwen3-VL decoder shapes as an engine runs them (q/k/v and
gate/up fused): BF16 ``F.linear``; FP8 W8A8 given quantized input (``fp8_gemm``: the input comes
from a fused producer), its split-K partials summed by the GEMV itself or left to the kernel that
consumes the output (``partials=True``, the engine's decode step: charged the time that kernel
takes longer on partials than on the summed output); FP8 W8A8 with a standalone activation
quantization (``fp8_linear``); W8A16 (``w8a16_linear``). Prefill rows (M = 512, 2048, 8B shapes):
cuBLAS block-scaled ``scaled_mm`` (SM90 only), the Triton block GEMM (the path of every other
card), BF16.

    python benchmarks/linears.py            # tables (Markdown)
    python benchmarks/linears.py --check    # numerics PASS/FAIL lines first, then the tables
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

# (hidden, intermediate, attention heads, kv heads), head_dim 128, from the models' published
# config.json text_config: the decoder linears as the engine runs them (fused qkv and gate_up)
MODELS = {"8B": (4096, 12288, 32, 8), "2B": (2048, 6144, 16, 8), "4B": (2560, 9728, 32, 8),
          "32B": (5120, 25600, 64, 8)}
MOE = (2048, 768, 128, 8)   # Qwen3-VL-30B-A3B experts: hidden, moe_intermediate, experts, top-k


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="numerics PASS/FAIL lines before the tables")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    return ap.parse_args()


if __name__ == "__main__":
    arguments()   # --help and a bad argument answer here, before torch, Triton and fp8vl load (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fp8vl.kernels import gemm  # noqa: E402
from fp8vl.kernels import gemm_kernels as gk  # noqa: E402
from fp8vl.runtime.engine import capture_graph  # noqa: E402
from fp8vl.kernels.numerics import (dequantize_weight, fake_quantize_activations, quantize_activations,  # noqa: E402
                                    quantize_weight)


def shapes(model: str) -> dict[str, tuple[int, int]]:
    h, i, heads, kv = MODELS[model]
    return {"qkv": ((heads + 2 * kv) * 128, h), "o": (h, heads * 128), "gate_up": (2 * i, h), "down": (h, i)}


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr, PDL: tl.constexpr):
    """Each program sums ITERS x BLOCK int32 words (the sum is stored so the loads stay). PDL:
    launched with programmatic dependent launch, as the GEMV is: it reads while the kernel before
    it finishes and waits for it only before its store, then lets its own dependent start (the
    GEMV's rule: one kernel ahead at most), the floor of a PDL-launched reader."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0)
    if PDL:
        gk.gdc_wait()
        gk.release_dependents(PDL)
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


def timed(fn, copies: int, calls: int = 0, reps: int = 7) -> float:
    """Median ms per call of ``fn(i)``: calls i = 0.. rotating over ``copies`` inputs, captured in
    one CUDA graph (launch costs as a server's graph sees them); eager warm-up first (autotune)."""
    calls = calls or max(copies, 12)
    for i in range(min(copies, 2)):
        fn(i)
    graph = capture_graph(lambda: [fn(i % copies) for i in range(calls)])[0]
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


def read_floor(nbytes: int, l2: int, configs=((1024, 4, 4), (2048, 4, 4), (2048, 8, 4), (4096, 4, 8)),
               pdl: bool = False) -> float:
    """ms of the fastest pure-read kernel (``configs``: block, iterations, warps) over ``nbytes``,
    rotated over copies exceeding 4x L2: the least any kernel reading that many bytes takes
    (``pdl``: launched with programmatic dependent launch, overlapping the previous call's tail)."""
    words = nbytes // 4
    bufs = [torch.ones(words, dtype=torch.int32, device="cuda") for _ in range(copies_for(nbytes, l2))]
    extra = {"launch_pdl": True} if pdl else {}
    best = float("inf")
    for block, iters, warps in configs:
        out = torch.empty(triton.cdiv(words, block * iters), dtype=torch.int32, device="cuda")
        best = min(best, timed(lambda i: _read_kernel[(out.numel(),)](bufs[i], out, words, BLOCK=block, ITERS=iters,
                                                                       PDL=pdl, num_warps=warps, **extra),
                               len(bufs)))
    return best


def read_ceiling(l2: int) -> float:
    """GB/s of reads of the pure-read kernel over a buffer >= 4x L2 (>= 1 GiB): the decode ceiling."""
    nbytes = max(4 * l2, 1 << 30)
    return nbytes / read_floor(nbytes, l2, ((2048, 8, 4), (4096, 8, 8), (4096, 16, 8), (8192, 4, 8))) / 1e6


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, math.ceil(4 * l2 / nbytes))


def weight_copies(n: int, k: int, l2: int):
    """One random [n, k] weight as BF16 and as FP8 (+ scales), each copied often enough to exceed
    4x L2 (timings rotate over the copies, so weights stream from HBM)."""
    w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s = quantize_weight(w16)
    c16, c8 = copies_for(n * k * 2, l2), copies_for(n * k, l2)
    ws16 = [w16] + [w16.clone() for _ in range(c16 - 1)]
    qs = [(q, s)] + [(q.clone(), s.clone()) for _ in range(c8 - 1)]
    return s, c16, c8, ws16, qs


def consumer(name: str, model: str, m: int):
    """The kernel the engine's decode step runs on this linear's output (qkv: q/k norm + rotary +
    cache write; o, down: residual add + RMSNorm + quantization; gate_up: SwiGLU + quantization),
    as fn(y) for y bf16 [m, N] or split-K partials [S, m, N]."""
    from fp8vl.kernels.attention import add_rmsnorm_quant, qk_norm_rope_cache

    h, _, _, kv = MODELS[model]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    if name == "qkv":
        cos, sin = torch.randn(m, 128, **bf), torch.randn(m, 128, **bf)
        qn, kn = torch.ones(128, **bf), torch.ones(128, **bf)
        kc, vc = torch.zeros(m, kv, 512, 128, **bf), torch.zeros(m, kv, 512, 128, **bf)
        lens = torch.full((m,), 300, device="cuda")
        return lambda y: qk_norm_rope_cache(y, qn, kn, 1e-6, cos, sin, kc, vc, lens)
    if name == "gate_up":
        return gemm.silu_mul_quant
    x, w = torch.randn(m, h, **bf), torch.ones(h, **bf)
    return lambda y: add_rmsnorm_quant(x, y, w, 1e-6)


def decode_rows(label: str, n: int, k: int, l2: int, ceiling: float, ms_list, consumer_of=None) -> None:
    """One row per M; ``consumer_of(m)``: the kernel reading this linear's output (``consumer``),
    which sums the split-K partials left to it."""
    s, c16, c8, ws16, qs = weight_copies(n, k, l2)
    for m in ms_list:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = gemm.quantize_activations_gpu(x)
        t16 = timed(lambda i: F.linear(x, ws16[i]), c16)
        # split-K arrival counters per weight copy, as each FP8Linear owns them (gemm.gemv_counters)
        cnt = [gemm.gemv_counters(n, "cuda") for _ in range(c8)]
        t8 = timed(lambda i: gemm.fp8_gemm(xq, xs, *qs[i], counters=cnt[i]), c8)
        t8p = timed(lambda i: gemm.fp8_gemm(xq, xs, *qs[i], counters=cnt[i], pdl=True), c8)
        t8q = timed(lambda i: gemm.fp8_linear(x, *qs[i], counters=cnt[i]), c8)
        ta16 = timed(lambda i: gemm.w8a16_linear(x, *qs[i], counters=cnt[i]), c8)
        # the engine's way: partials left to the consumer, whose extra read (S float32 rows in
        # place of one bf16 row) is charged to the linear
        t8c = timed(lambda i: gemm.fp8_gemm(xq, xs, *qs[i], counters=cnt[i], partials=True), c8)
        extra = 0.0
        parts = gemm.fp8_gemm(xq, xs, *qs[0], partials=True)
        if consumer_of is not None and parts.ndim == 3:
            fn = consumer_of(m)
            plain = gemm.splitk_sum(parts)
            extra = timed(lambda i: fn(parts), 1) - timed(lambda i: fn(plain), 1)
        tc = t8c + extra
        gbs = (n * k + s.numel() * 4) / tc / 1e6
        print(f"| {label} {n}x{k} | {m} | {t16:.4f} | {t8:.4f} | {tc:.4f} ({t8c:.4f} + {extra:.4f}) | {t8p:.4f} | "
              f"{t8q:.4f} | {ta16:.4f} | {t16 / t8:.2f}x | **{t16 / tc:.2f}x** | {t16 / t8p:.2f}x | {t16 / t8q:.2f}x | "
              f"{t16 / ta16:.2f}x | {gbs:.0f} ({gbs / ceiling:.0%}) | {n * k / 2**20:.0f} |", flush=True)


def prefill_rows(label: str, n: int, k: int, l2: int, sm90: bool, ms_list) -> None:
    _, c16, c8, ws16, qs = weight_copies(n, k, l2)
    for m in ms_list:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = gemm.quantize_activations_gpu(x)
        t16 = timed(lambda i: F.linear(x, ws16[i]), c16, reps=5)
        tc = timed(lambda i: gemm.fp8_gemm(xq, xs, *qs[i], backend="cublas"), c8, reps=5) if sm90 else float("nan")
        tt = timed(lambda i: gemm.fp8_gemm(xq, xs, *qs[i], backend="triton"), c8, reps=5)
        tp = timed(lambda i: gemm._block_gemm(xq, xs, *qs[i], torch.bfloat16, None, True, tma=False), c8, reps=5)
        tq = timed(lambda i: gemm.quantize_activations_gpu(x), 1, reps=5)
        tf = 2 * m * n * k / 1e9
        print(f"| {label} {n}x{k} | {m} | {t16:.4f} ({tf / t16:.0f}) | {tc:.4f} ({tf / tc:.0f}) | "
              f"{tt:.4f} ({tf / tt:.0f}) | {tp:.4f} ({tf / tp:.0f}) | {tq:.4f} | {t16 / tc:.2f}x | {t16 / tt:.2f}x | "
              f"{t16 / tp:.2f}x |", flush=True)


def moe_rows(l2: int, ceiling: float) -> None:
    h, inter, experts, topk = MOE
    q, s = quantize_weight(torch.randn(2 * inter, h, device="cuda") * 0.02)
    w = q.unsqueeze(0).repeat(experts, 1, 1)
    ws = s.unsqueeze(0).repeat(experts, 1, 1)
    for tokens in (1, 8):
        ids = torch.randperm(experts, device="cuda")[: tokens * topk].int()   # distinct experts: all bytes read
        x = torch.randn(tokens * topk, h, device="cuda", dtype=torch.bfloat16)
        xq, xs = gemm.quantize_activations_gpu(x)
        t = timed(lambda i: gemm.fp8_grouped_gemm(xq, xs, w, ws, ids), 1)
        gbs = len(ids) * 2 * inter * h / t / 1e6
        print(f"| 30B-A3B experts gate_up {2 * inter}x{h}, top-{topk} | {tokens} | {t:.4f} | "
              f"{gbs:.0f} ({gbs / ceiling:.0%}) |", flush=True)


def check() -> bool:
    """Numerics on this GPU: PASS/FAIL lines; True when all pass."""
    ok = True

    def report(name: str, good: bool, detail: str = "") -> None:
        nonlocal ok
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {name} {detail}", flush=True)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    sm90 = torch.cuda.get_device_capability() == (9, 0)
    for m in (1, 8, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) * 3
        q, sc = gemm.quantize_activations_gpu(x)
        qr, sr = quantize_activations(x)
        report(f"act-quant M={m}", torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(sc, sr))
    for k in (2048, 2560, 4096, 5120):
        x = (torch.randint(-31, 32, (8, k), device="cuda").float() / 8).to(torch.bfloat16)
        w = (torch.randn(k, device="cuda") * 0.3 + 1).to(torch.bfloat16)
        ref = (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype))
        q, sc = gemm.rmsnorm_quant(x, w, 1e-6)
        qr, sr = quantize_activations(ref)
        report(f"rmsnorm_quant bit-identical (exact sums) K={k}",
               torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(sc, sr))
        x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16) * 4
        ref = (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype))
        flips = (gemm.rmsnorm_quant(x, w, 1e-6)[0].view(torch.uint8) !=
                 quantize_activations(ref)[0].view(torch.uint8)).float().mean().item()
        report(f"rmsnorm_quant random input K={k}", flips < 1e-3, f"({flips:.1e} of codes differ: reduction order)")
    for m, i in ((1, 12288), (8, 9728), (300, 6144)):
        gu = torch.randn(m, 2 * i, device="cuda", dtype=torch.bfloat16) * 4
        q, sc = gemm.silu_mul_quant(gu)
        g, u = gu.chunk(2, -1)
        qr, sr = quantize_activations(F.silu(g) * u)
        report(f"silu_mul_quant bit-identical M={m} I={i}",
               torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(sc, sr))
    for n, k in ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (200, 384)):
        q, s = quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
        wf = dequantize_weight(q, s, torch.float32)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in (1, 8, 16, 512):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = fake_quantize_activations(x.float()) @ wf.t() + b.float()
            xq, xs = gemm.quantize_activations_gpu(x)
            paths = {"auto": "auto", "triton (forced)": "triton"}
            if sm90 and m > 16 and n % 128 == 0:
                paths["cublas"] = "cublas"
            for name, backend in paths.items():
                e = rel(gemm.fp8_gemm(xq, xs, q, s, torch.bfloat16, b, backend), ref)
                report(f"W8A8 {name} {n}x{k} M={m}", e < 5e-3, f"rel err {e:.1e}")
            e = rel(gemm.w8a16_linear(x, q, s, b), x.float() @ wf.t() + b.float())
            report(f"W8A16 {n}x{k} M={m}", e < 5e-3, f"rel err {e:.1e} (vs weight-only simulation)")
    h, inter, _, topk = MOE
    experts = [quantize_weight(torch.randn(2 * inter, h, device="cuda") * 0.02) for _ in range(topk)]
    x = torch.randn(topk, h, device="cuda", dtype=torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    ids = torch.arange(topk, device="cuda").flip(0)
    y = gemm.fp8_grouped_gemm(xq, xs, torch.stack([a for a, _ in experts]), torch.stack([c for _, c in experts]), ids)
    e = max(rel(y[r], fake_quantize_activations(x[r:r + 1].float())[0] @ dequantize_weight(
        *experts[topk - 1 - r], torch.float32).t()) for r in range(topk))
    report("grouped expert GEMM", e < 5e-3, f"max rel err {e:.1e}")
    return ok


def main() -> None:
    a = arguments()
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB, "
          f"CC {props.major}.{props.minor}; torch {torch.__version__}, triton {triton.__version__}\n", flush=True)
    ok = check() if a.check else True
    l2 = props.L2_cache_size
    ceiling = read_ceiling(l2)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / timed(lambda i: x @ x, 1, 3, 5) / 1e9
    print(f"\nceilings: pure read {ceiling:.0f} GB/s (buffer >= 4x L2); BF16 cuBLAS 8192^3 matmul {peak:.0f} TFLOP/s\n")
    print("| linear (N x K) | M | BF16 ms | W8A8, own split-K sum ms | W8A8, sum in the consumer ms (GEMV + "
          "consumer's extra) | W8A8, PDL ms | W8A8 + act-quant ms | W8A16 ms | own-sum speed-up "
          "| sum-in-consumer speed-up | PDL speed-up | W8A8+quant speed-up | W8A16 speed-up "
          "| sum-in-consumer GB/s (% of read ceiling) | FP8 MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
        for name, (n, k) in shapes(model).items():
            decode_rows(f"{model} {name}", n, k, l2, ceiling, (1, 8), lambda m: consumer(name, model, m))
    print("\n| MoE experts (grouped GEMV) | tokens | W8A8 ms | GB/s (% of read ceiling) |\n|---|---|---|---|")
    moe_rows(l2, ceiling)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    print("\n| prefill linear (N x K) | M | BF16 ms (TFLOP/s) | cuBLAS scaled_mm ms (TFLOP/s) "
          "| Triton block GEMM ms (TFLOP/s) | same, pointer loads (8.9 cards) ms (TFLOP/s) | act-quant ms "
          "| cuBLAS speed-up | Triton speed-up | pointer-load speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in shapes("8B").items():
        prefill_rows(f"8B {name}", n, k, l2, sm90, (512, 2048))
    if not ok:
        print("\nnumerics check FAILED (see FAIL lines above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
