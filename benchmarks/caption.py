"""In-process captioning on the GPU: fp8vl's engine with the FP8 and the BF16 checkpoint side by side,
and the previous path (Transformers ``generate``, one image at a time) as the baseline.

A Qwen3-VL-8B-shaped checkpoint (random weights, full-size tokenizer, Qwen3-VL's processor) is built
and quantized first; images are 512x512 photos (scikit-image's, cropped and recoloured so each is
distinct). Every answer is exactly --new-tokens long (EOS ignored: random weights). Rows:
load time and peak memory; images/s and tokens/s at batch 1, 8, 32 and with continuous batching
(as many slots as fit); the steps (``steps``): the prefill of 1 and of 8 image prompts through
Transformers' forward, fp8vl's layers eagerly and in CUDA graphs, and one decode step per batch size,
FP8 and BF16 side by side; the real ``fp8vl caption`` path (disk, processor, engine); the FP8 run again
under a --cap memory limit in a fresh process; ``fp8vl eval`` of the pair.

    python benchmarks/caption.py --workdir /tmp/cap8b
    python benchmarks/caption.py --workdir /tmp/cap8b --parts engine,steps --batches 1,8   # the steps only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fp8vl-caption-bench"))
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32,0", help="0: continuous batching, as many slots as fit")
    ap.add_argument("--cap", default="15.5GiB")
    ap.add_argument("--parts", default="engine,rates,steps,old,caption,capped,eval")
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


if __name__ == "__main__":
    arguments()   # --help and a bad argument answer here, before torch and fp8vl load (seconds)

import numpy as np  # noqa: E402
import torch  # noqa: E402

GiB = 1024**3


def images(folder: Path, n: int) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        a = base[i % len(base)]
        img = Image.fromarray(a).convert("RGB").resize((512 + 8 * (i % 7), 512 + 8 * (i % 5)))
        arr = np.asarray(img).astype(np.int16)
        arr = np.clip(arr + (i * 37 % 61) - 30, 0, 255).astype(np.uint8)[:512, :512]
        p = folder / f"img{i:04d}.png"
        if not p.exists():
            Image.fromarray(arr).save(p)
        out.append(p)
    return out


def build(work: Path, layers: int) -> tuple[Path, Path]:
    from fp8vl import QuantizeOptions, quantize
    from fp8vl.apps.tiny import build_qwen3_vl_8b

    bf16, fp8 = work / "bf16", work / "fp8"
    if not (bf16 / "config.json").exists():
        t = time.perf_counter()
        build_qwen3_vl_8b(bf16, layers)
        print(f"built {bf16} in {time.perf_counter() - t:.0f} s", flush=True)
    if not (fp8 / "config.json").exists():
        t = time.perf_counter()
        quantize(bf16, fp8, QuantizeOptions(device="cuda", workers=8))
        print(f"quantized in {time.perf_counter() - t:.0f} s", flush=True)
    return bf16, fp8


def engine_rows(label: str, path: Path, pics: list[Path], new_tokens: int, batches: list[int]) -> list[dict]:
    from fp8vl.inputs.images import load_image
    from fp8vl.runtime.engine import Engine, EngineOptions, Request, round_up
    from fp8vl.runtime.loader import encode, load_any
    from fp8vl.inputs.prompts import CAPTION

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    loaded = load_any(path, "cuda")
    torch.cuda.synchronize()
    load_s, load_peak, steady = time.perf_counter() - t, torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    rows = [dict(what=f"{label}: load", seconds=load_s, peak_gib=load_peak / GiB, steady_gib=steady / GiB)]
    inputs = [encode(loaded, CAPTION, load_image(p, 512), device="cpu") for p in pics]
    n_prompt = inputs[0]["input_ids"].shape[1]
    max_len = round_up(n_prompt + new_tokens + 1)
    for b in batches:
        n = {1: 8, 8: 32, 32: 64}.get(b, 4 * len(pics))
        eng = Engine(loaded.model, [], EngineOptions(max_len=max_len, max_batch=b or None, max_new_tokens=new_tokens))
        list(eng.generate([Request(inputs[0])] * min(n, eng.batch)))        # graphs captured, kernels tuned
        torch.cuda.synchronize()
        t = time.perf_counter()
        done = sum(len(ids) for _, ids in eng.generate(Request(inputs[i % len(inputs)]) for i in range(n)))
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        rows.append(dict(what=f"{label}: engine batch {b or f'continuous ({eng.batch} slots)'}", images=n,
                         seconds=s, images_per_s=n / s, tokens_per_s=done / s,
                         peak_gib=torch.cuda.max_memory_allocated() / GiB, prompt_tokens=n_prompt))
        del eng
        torch.cuda.empty_cache()
    return rows, loaded


PREFILL_WAYS = (("transformers", dict(restated_prefill=False)),      # Transformers' forward, cache copied
                ("eager", dict(prefill_graphs=False)),              # fp8vl's layers, eagerly
                ("graphs", {}))                                     # fp8vl's layers in CUDA graphs


def _ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def step_rows(label: str, loaded, pics: list[Path], batches: list[int]) -> list[dict]:
    """Where the time goes: the prefill (vision tower + prompt) of 1 and of 8 same-length image prompts,
    through Transformers' forward, fp8vl's layers eagerly and in CUDA graphs; one decode step at each
    batch size."""
    from fp8vl.inputs.images import load_image
    from fp8vl.runtime.engine import Engine, EngineOptions
    from fp8vl.runtime.loader import encode
    from fp8vl.inputs.prompts import CAPTION

    inputs = [encode(loaded, CAPTION, load_image(p, 512), device="cpu") for p in pics[:8]]
    n = inputs[0]["input_ids"].shape[1]
    assert all(i["input_ids"].shape[1] == n for i in inputs), "the prefill rows need same-length prompts"
    def prefill(b: int, **kw) -> dict:
        eng = Engine(loaded.model, [], EngineOptions(max_len=512, max_batch=8, max_new_tokens=64, **kw))
        return dict(ms=_ms(lambda: eng._prefill(list(range(b)), inputs[:b]), 5), fused=eng.fused)

    def parts(b: int) -> dict:
        """The graph prefill split in two: what Transformers computes before the language model
        (embeddings, vision tower, DeepStack, M-RoPE positions: BF16 in both checkpoints) and the
        text decoder (rotary tables, DeepStack scatter, the layer loop's graph replay)."""
        from fp8vl.runtime.prefill import decoder_inputs

        eng = Engine(loaded.model, [], EngineOptions(max_len=512, max_batch=8, max_new_tokens=64))
        ins = {k: torch.cat([g[k] for g in inputs[:b]]).to(eng.device) for k in inputs[0]}
        slots = torch.arange(b, device=eng.device)
        d = decoder_inputs(loaded.model, ins)
        return dict(inputs_ms=_ms(lambda: decoder_inputs(loaded.model, ins), 5),
                    layers_ms=_ms(lambda: eng._prefill_layers(d, slots), 5))

    def decode(b: int, **kw) -> dict:
        eng = Engine(loaded.model, [], EngineOptions(max_len=512, max_batch=b, max_new_tokens=64, **kw))
        eng.len[:b].fill_(300)
        eng.pos[:b].fill_(300)
        return dict(step_ms=_ms(lambda: eng._step(b), 20), graphs=eng._use_graphs(), fused=eng.fused)

    rows = []
    for b in (1, 8):
        row = dict(what=f"{label}: prefill batch {b}", kind="prefill", label=label, batch=b, prompt_tokens=n)
        for way, kw in PREFILL_WAYS:
            r = prefill(b, **kw)
            row[f"{way}_ms"], row["fused"] = r["ms"], r["fused"]
            torch.cuda.empty_cache()
        row.update(parts(b))
        torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    for b in batches:
        rows.append(dict(what=f"{label}: decode step batch {b}", kind="decode", label=label, batch=b, **decode(b)))
        if rows[-1]["fused"]:   # the FP8 step again: GEMVs with PDL; every GEMV summing its own split-K
            rows[-1]["pdl_step_ms"] = decode(b, pdl=True)["step_ms"]          # partials; o and down only
            rows[-1]["own_sum_step_ms"] = decode(b, consumer_sums=())["step_ms"]
            rows[-1]["od_sum_step_ms"] = decode(b, consumer_sums=("qkv", "gate_up"))["step_ms"]
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def print_step_tables(rows: list[dict]) -> None:
    """FP8 and BF16 side by side: ms per prefill (all prompts of the batch together), ms per decode step."""
    pre = {(r["label"], r["batch"]): r for r in rows if r.get("kind") == "prefill"}
    if not pre:
        return
    print("\n| prefill (ms) | batch | " + " | ".join(f"fp8 {w} | bf16 {w} | bf16/fp8" for w, _ in PREFILL_WAYS)
          + " |\n|---|---|" + "---|---|---|" * len(PREFILL_WAYS))
    for b in sorted({k[1] for k in pre}):
        f, h = pre.get(("fp8", b), {}), pre.get(("bf16", b), {})
        cells = []
        for w, _ in PREFILL_WAYS:
            a, c = f.get(f"{w}_ms"), h.get(f"{w}_ms")
            cells += [f"{a:.1f}" if a else "", f"{c:.1f}" if c else "", f"{c / a:.2f}x" if a and c else ""]
        tokens = (f or h).get("prompt_tokens", "")
        print(f"| {tokens} tokens each | {b} | " + " | ".join(cells) + " |")
    print("\n| graph prefill parts (ms) | batch | fp8 before the LM | bf16 before the LM | fp8 text decoder "
          "| bf16 text decoder | bf16/fp8 text decoder |\n|---|---|---|---|---|---|---|")
    for b in sorted({k[1] for k in pre}):
        f, h = pre.get(("fp8", b), {}), pre.get(("bf16", b), {})
        if "layers_ms" in f and "layers_ms" in h:
            print(f"| | {b} | {f['inputs_ms']:.1f} | {h['inputs_ms']:.1f} | {f['layers_ms']:.1f} | "
                  f"{h['layers_ms']:.1f} | {h['layers_ms'] / f['layers_ms']:.2f}x |")
    dec = {(r["label"], r["batch"]): r for r in rows if r.get("kind") == "decode"}
    if dec:
        print("\n| decode step (ms) | batch | fp8 | fp8, GEMVs with PDL | fp8, GEMVs summing their own split-K "
              "partials | fp8, o and down summing their own | bf16 | bf16/fp8 |"
              "\n|---|---|---|---|---|---|---|---|")
        for b in sorted({k[1] for k in dec}):
            f, h = dec.get(("fp8", b), {}), dec.get(("bf16", b), {})
            a, c = f.get("step_ms"), h.get("step_ms")
            print(f"| | {b} | {a or 0:.2f} | {f.get('pdl_step_ms', 0):.2f} | {f.get('own_sum_step_ms', 0):.2f} | "
                  f"{f.get('od_sum_step_ms', 0):.2f} | "
                  f"{c or 0:.2f} | " + (f"{c / a:.2f}x" if a and c else "") + " |")


def old_path_row(label: str, loaded, pics: list[Path], new_tokens: int) -> dict:
    """Transformers' generate, one image at a time: what caption --model did before the engine."""
    from fp8vl.inputs.images import load_image
    from fp8vl.runtime.loader import encode
    from fp8vl.inputs.prompts import CAPTION

    batch = encode(loaded, CAPTION, load_image(pics[0], 512))
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=None, top_p=None,
              top_k=None)
    loaded.model.generate(**batch, **dict(kw, max_new_tokens=4, min_new_tokens=4))
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 2
    for p in pics[:n]:
        loaded.model.generate(**encode(loaded, CAPTION, load_image(p, 512)), **kw)
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    return dict(what=f"{label}: Transformers generate, batch 1", images=n, seconds=s, images_per_s=n / s,
                tokens_per_s=n * new_tokens / s)


def caption_row(fp8: Path, folder: Path, new_tokens: int, cap: str | None) -> dict:
    """The real `fp8vl caption --model` path in a fresh process (optionally under a memory cap)."""
    code = f"""
import json, time, torch
from fp8vl.apps.caption import CaptionOptions, caption
from fp8vl.options import parse_size
cap = {cap!r}
opts = CaptionOptions(model={str(fp8)!r}, device="cuda", max_tokens={new_tokens}, txt=False,
                      jsonl={str(folder / 'out.jsonl')!r}, overwrite=True,
                      gpu_memory=parse_size(cap) if cap else None)
s = caption([{str(folder)!r}], opts)
print("RESULT", json.dumps(dict(done=s.done, failed=len(s.failed), seconds=s.seconds, tokens=s.tokens,
      peak_gib=torch.cuda.max_memory_allocated() / 2**30, steady=s.captioning_images_per_s)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        return dict(what=f"fp8: fp8vl caption{' under ' + cap if cap else ''}", error=r.stderr[-800:])
    d = json.loads(line[7:])
    return dict(what=f"fp8: fp8vl caption{' under ' + cap if cap else ''} (after the load; {d['done'] / d['seconds']:.2f}"
                     f" images/s with it)", images=d["done"], failed=d["failed"], seconds=d["seconds"],
                images_per_s=d["steady"], tokens_per_s=d["tokens"] / d["seconds"], peak_gib=d["peak_gib"])


def eval_row(bf16: Path, fp8: Path) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fp8vl.cli", "eval", str(bf16), str(fp8), "--device", "cuda"],
                       capture_output=True, text=True)
    return dict(what="fp8vl eval BF16 vs FP8 (24 text + 12 image prompts, 32 tokens)",
                seconds=time.perf_counter() - t, rc=r.returncode, tail=r.stdout[-300:] + r.stderr[-300:])


def main() -> None:
    a = arguments()
    parts = set(a.parts.split(","))
    print(torch.cuda.get_device_name(0), f"torch {torch.__version__}", flush=True)
    bf16, fp8 = build(a.workdir, a.layers)
    pics = images(a.workdir / "images", a.images)
    rows = []
    batches = [int(x) for x in a.batches.split(",")]
    for label, path in (("fp8", fp8), ("bf16", bf16)):
        if "engine" in parts:
            r, loaded = engine_rows(label, path, pics, a.new_tokens, batches if "rates" in parts else [])
            rows += r
            if "steps" in parts:
                rows += step_rows(label, loaded, pics, [b for b in batches if b] or [1])
            if "old" in parts:
                rows.append(old_path_row(label, loaded, pics, a.new_tokens))
            del loaded
            torch.cuda.empty_cache()
        for row in rows:
            print(row, flush=True)
    if "caption" in parts:
        rows.append(caption_row(fp8, a.workdir / "images", a.new_tokens, None))
    if "capped" in parts:
        rows.append(caption_row(fp8, a.workdir / "images", a.new_tokens, a.cap))
    if "eval" in parts:
        rows.append(eval_row(bf16, fp8))
    print_step_tables(rows)
    print("\n| run | images | s | images/s | tokens/s | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        if "kind" in r:
            continue
        print(f"| {r['what']} | {r.get('images', '')} | {r.get('seconds', 0):.2f} | {r.get('images_per_s', 0):.2f} | "
              f"{r.get('tokens_per_s', 0):.0f} | {r.get('peak_gib', 0):.2f} |" + (f" {r['error']}" if 'error' in r else ""))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
