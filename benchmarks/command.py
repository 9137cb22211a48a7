"""`fp8vl caption DIR --model M` as users run it, against the engine's steady state on the same images.

Images of mixed sizes and aspect ratios (20 sizes, 256 to 1600 px a side, JPEG, as photo datasets
have) are written once. Rows, side by side in one run:
- the command in a fresh process, from process start to exit: wall time, time to the first caption
  on disk, the load it reports, images/s overall and after the load; once per ``--workers`` value;
- the engine alone on the same prompts (encoded before timing, model loaded, graphs warm): its
  steady images/s, the ceiling the command is measured against.

GPU (the 8B-shaped checkpoint that benchmarks/caption.py builds):
    python benchmarks/command.py --model /tmp/cap8b/fp8 --images 1024 --device cuda --workers 0,8
CPU (the tiny model; the overheads outside the engine, not the GPU's speed):
    python benchmarks/command.py --tiny --images 48 --device cpu --new-tokens 16 --workers 0,1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SIZES = [(256 + (1600 - 256) * i // 19, 256 + (1600 - 256) * ((i * 7) % 20) // 19) for i in range(20)]


def mixed_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct JPEG photos, 20 sizes (width, height) between 256 and 1600 px, cycled."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        p = folder / f"img{i:05d}.jpg"
        if not p.exists():
            w, h = SIZES[i % len(SIZES)]
            img = Image.fromarray(base[i % len(base)]).convert("RGB").resize((w, h))
            arr = np.clip(np.asarray(img).astype(np.int16) + (i * 37 % 61) - 30, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(p, quality=90)
        out.append(p)
    return out


def command_row(model: Path, folder: Path, n: int, args) -> dict:
    """The CLI in a fresh process; the first caption's time from the jsonl appearing."""
    log = folder.parent / f"captions-w{args.workers_now}.jsonl"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fp8vl.cli", "caption", str(folder), "--model", str(model), "--device", args.device,
           "--max-tokens", str(args.new_tokens), "--no-txt", "--jsonl", str(log), "--quiet",
           "--workers", str(args.workers_now)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and log.exists() and log.stat().st_size:
            first = time.perf_counter() - t0
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    done = len(log.read_text().splitlines()) if log.exists() else 0
    row = dict(what=f"command, --workers {args.workers_now}", images=done, seconds=wall, images_per_s=done / wall,
               first_caption_s=first, rc=proc.returncode, summary=(out + err).strip().splitlines()[:1])
    if proc.returncode or done != n:
        row["error"] = (err or out)[-600:]
    return row


def engine_row(model: Path, pics: list[Path], args) -> dict:
    """The engine alone: prompts encoded first, one warm-up pass, then the timed pass."""
    import torch

    from fp8vl.inputs.images import load_image
    from fp8vl.inputs.prompts import CAPTION
    from fp8vl.runtime.engine import Engine, EngineOptions, Request, round_up
    from fp8vl.runtime.loader import encode, eos_ids, load_any

    loaded = load_any(model, args.device)
    inputs = [encode(loaded, CAPTION, load_image(p, 512), device="cpu") for p in pics]
    max_len = round_up(max(i["input_ids"].shape[1] for i in inputs) + args.new_tokens + 1)
    eng = Engine(loaded.model, eos_ids(loaded), EngineOptions(max_len=max_len, max_new_tokens=args.new_tokens))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    list(eng.generate(Request(x) for x in inputs[: 2 * eng.batch]))       # graphs captured, kernels tuned
    sync()
    t0 = time.perf_counter()
    tokens = sum(len(ids) for _, ids in eng.generate(Request(x) for x in inputs))
    sync()
    s = time.perf_counter() - t0
    return dict(what=f"engine alone ({eng.batch} slots)", images=len(inputs), seconds=s,
                images_per_s=len(inputs) / s, tokens_per_s=tokens / s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="an FP8 (or BF16) checkpoint folder")
    ap.add_argument("--tiny", action="store_true", help="build and quantize the tiny Qwen3-VL (CPU runs)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fp8vl-command-bench"))
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", default="0,8", help="comma-separated --workers values to time")
    a = ap.parse_args()
    if not a.model and not a.tiny:
        ap.error("give --model DIR or --tiny")

    if a.tiny:
        from fp8vl import QuantizeOptions, quantize
        from fp8vl.apps.tiny import build_tiny_qwen3_vl

        src, a.model = a.workdir / "tiny", a.workdir / "tiny-fp8"
        if not (a.model / "config.json").exists():
            build_tiny_qwen3_vl(src, "dense")
            quantize(src, a.model, QuantizeOptions())
    pics = mixed_images(a.workdir / "images", a.images)
    rows = []
    for w in a.workers.split(","):
        a.workers_now = int(w)
        rows.append(command_row(a.model, a.workdir / "images", len(pics), a))
        print(rows[-1], flush=True)
    rows.append(engine_row(a.model, pics, a))
    print(f"\n{len(pics)} images of {len(SIZES)} sizes, {a.new_tokens} new tokens, {a.device}")
    print("| run | images | s | images/s | first caption s | vs engine |\n|---|---|---|---|---|---|")
    ceiling = rows[-1]["images_per_s"]
    for r in rows:
        first = f"{r['first_caption_s']:.1f}" if r.get("first_caption_s") else ""
        print(f"| {r['what']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {first} | "
              f"{r['images_per_s'] / ceiling:.2f}x |" + (f" {r['error']}" if "error" in r else ""))
    (a.workdir / "command.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
