"""Batch invariance on the GPU, on the Qwen3-VL-8B-shaped checkpoint (benchmarks/caption.py builds it):
the same images captioned at batch 1, with continuous batching (as many slots as fit) and at batch 8,
FP8 and BF16, with ``EngineOptions(batch_invariant=True)`` (the default) and ``False``. Prints, per
checkpoint and mode, images/s of each run and how many captions differ from batch 1's.

    python benchmarks/invariance.py --workdir /tmp/cap8b --images 64 --new-tokens 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run(loaded, inputs, new_tokens: int, max_batch: int | None, invariant: bool) -> tuple[dict, float, int]:
    import torch

    from fp8vl.runtime.engine import Engine, EngineOptions, Request, round_up

    max_len = round_up(max(i["input_ids"].shape[1] for i in inputs) + new_tokens + 1)
    eng = Engine(loaded.model, [], EngineOptions(max_len=max_len, max_batch=max_batch, max_new_tokens=new_tokens,
                                                 batch_invariant=invariant))
    list(eng.generate([Request(inputs[0])] * min(len(inputs), eng.batch)))    # graphs captured, kernels tuned
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = {r.tag: ids for r, ids in eng.generate(Request(x, i) for i, x in enumerate(inputs))}
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    slots = eng.batch
    del eng
    torch.cuda.empty_cache()
    return out, len(inputs) / s, slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fp8vl-caption-bench"))
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--which", default="fp8,bf16")
    ap.add_argument("--modes", default="on,off", help="batch_invariant on, off, or both")
    a = ap.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from caption import build, images

    from fp8vl.inputs.images import load_image
    from fp8vl.runtime.loader import encode, load_any
    from fp8vl.inputs.prompts import CAPTION

    bf16, fp8 = build(a.workdir, a.layers)
    pics = images(a.workdir / "images", a.images)
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows = []
    for label in a.which.split(","):
        loaded = load_any(fp8 if label == "fp8" else bf16, "cuda")
        inputs = [encode(loaded, CAPTION, load_image(p, 512), device="cpu") for p in pics]
        for mode in a.modes.split(","):
            inv = mode == "on"
            ref, rate1, _ = run(loaded, inputs, a.new_tokens, 1, inv)
            rows.append((label, mode, "batch 1", 1, rate1, 0))
            for name, mb in (("continuous", None), ("batch 8", 8)):
                got, rate, slots = run(loaded, inputs, a.new_tokens, mb, inv)
                differ = sum(got[i] != ref[i] for i in ref)
                rows.append((label, mode, name, slots, rate, differ))
            print(rows[-3:], flush=True)
        del loaded
        torch.cuda.empty_cache()
    print(f"\n{a.images} images, {a.new_tokens} new tokens, {torch.cuda.get_device_name()}")
    print("| checkpoint | batch_invariant | run | slots | images/s | captions unlike batch 1's |")
    print("|---|---|---|---|---|---|")
    for label, mode, name, slots, rate, differ in rows:
        print(f"| {label} | {mode} | {name} | {slots} | {rate:.2f} | {differ} |")


if __name__ == "__main__":
    main()
