"""Hub benchmark: ``fp8vl quantize ORG/NAME`` against ``snapshot_download`` and a local conversion.

Serves a synthetic Qwen3-VL-8B-shaped checkpoint (benchmarks/convert.py's, ``--layers`` text layers;
``--text-only``: the text layers alone, so that shards are small and many) from the local hub of the
tests (tests/hub_server.py: huggingface_hub's own protocol on 127.0.0.1), throttled per connection
(``--connection-rate``, as CDNs do), for all connections together (``--rate``, one link), or both.
Then, side by side in one run, each a subprocess with the real huggingface_hub client:

1. download alone: ``snapshot_download(local_dir=...)`` with its default workers (8 files at once);
2. ``fp8vl quantize ORG/NAME OUTPUT`` (streaming: converts each shard as it lands, deletes it once written);
3. local conversion, same output: ``fp8vl quantize LOCAL OUTPUT --record-error`` of the served folder
   itself (no download): the hub run's output but for the card, with each FP8 tensor's error, which
   a hub run always measures (its source is gone afterwards);
4. local conversion: the same without ``--record-error`` (a local conversion's default);
5. download, then ``fp8vl quantize LOCAL OUTPUT`` (1, then 4).

Each starts after a ``sync``.

Wall time, the ratio to max(download alone, local conversion with the same output) (the bound
streaming aims at; to the local conversion without the error file below the table) and to the
download alone, the CPU time of the run's processes (the hub's, in this process, not counted: on a
small machine shared with other work it says what wall time the run needs), disk peak (all files
under the run's folder, sampled every 20 ms; the local conversion's source is outside it) for each,
and a timeline line per run: when the first weight bytes were on disk (the start that nothing
overlaps), each source shard with its size in the order its download ended, and the tail (the run's
end after the last download ended: for the streaming run, the conversion of the last shard and the
final steps). ``--baseline SRC`` (repeatable) adds the streaming run of the fp8vl in another source
tree (e.g. a checkout of main's ``src``), so a change and its base are measured in one run, on one
machine state.

    python benchmarks/hub.py --text-only --layers 4 --shard-size 400MB --connection-rate 60MB --workers 2
    python benchmarks/hub.py --layers 2 --shard-size 1GB --rate 150MB [--baseline ../main/src]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="text layers (real model: 36)")
    ap.add_argument("--text-only", action="store_true", help="the text layers alone (no vision, embedding, head)")
    ap.add_argument("--shard-size", default="1GB", help="source shard size")
    ap.add_argument("--rate", help="link speed, bytes per second, all connections together (default: 150MB "
                                   "unless --connection-rate is given)")
    ap.add_argument("--connection-rate", help="bytes per second of each connection, as CDNs throttle")
    ap.add_argument("--workdir", type=Path, default=Path("bench-hub"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--baseline", type=Path, action="append", default=[],
                    help="another fp8vl source tree (its src folder): its streaming run is added, side by side "
                         "(repeatable)")
    return ap.parse_args()


if __name__ == "__main__":
    arguments()   # --help and a bad argument answer here, before torch and fp8vl load (seconds)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import convert  # noqa: E402  (benchmarks/convert.py)
from hub_server import HubServer, hub_env  # noqa: E402

from fp8vl.options import parse_size  # noqa: E402
from fp8vl.conversion.staging import disk_usage  # noqa: E402

REPO = "bench/qwen3-vl-synthetic"
DOWNLOAD = ("import sys; from huggingface_hub import snapshot_download; "
            "snapshot_download(sys.argv[1], local_dir=sys.argv[2])")


@dataclass
class Run:
    name: str
    seconds: float = 0.0
    peak: int = 0                  # bytes on disk under the run's folder, at most
    out: int = 0                   # output bytes
    cpu: float = 0.0               # core-seconds of its processes (user + system), the hub's not counted
    first: float | None = None     # seconds until more than 1 MB was on disk: the first weight bytes
    shards: list[tuple[str, float]] = field(default_factory=list)   # (shard, seconds) as downloads ended


def timed(run: Run, cmds: list[list[str]], env: dict, watch: Path, server: HubServer) -> None:
    """Run ``cmds`` one after the other; fill ``run`` (wall time, disk peak under ``watch``, timeline)."""
    stop = threading.Event()
    seen = len(server.sent)

    def sample():
        nonlocal seen
        while not stop.is_set():
            now = time.perf_counter() - t0
            run.peak = max(run.peak, disk_usage(watch))
            if run.first is None and run.peak > 1 << 20:
                run.first = now
            sent = server.sent[seen:]
            seen += len(sent)
            run.shards += [(f, now) for f, _, n in sent if f.endswith(".safetensors") and n > 100_001]
            time.sleep(0.02)
    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w = threading.Thread(target=sample, daemon=True)
    w.start()
    for cmd in cmds:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    run.seconds = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)       # the download process included: it is waited for
    run.cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    stop.set()
    w.join()
    run.peak = max(run.peak, disk_usage(watch))


def timeline(run: Run, sizes: dict[str, int]) -> str:
    """When the first weight bytes landed, the shards in the order their downloads ended, the tail."""
    ended = {}
    for f, t in run.shards:        # a download continued after a dropped connection: its last part
        ended[f] = t
    order = sorted(ended, key=ended.get)
    shards = ", ".join(f"{f.split('-')[1]} {sizes[f] / 1e9:.2f} GB @{ended[f]:.1f}" for f in order)
    first = f"{run.first:.1f} s" if run.first is not None else "-"
    last = max(ended.values(), default=0.0)
    return (f"- {run.name}: first weight bytes on disk at {first}; downloads ended: {shards}; "
            f"end {run.seconds:.1f} s, tail after the last download {run.seconds - last:.1f} s")


def write_text_only(path: Path, layers: int, shard_bytes: int) -> None:
    """benchmarks/convert.py's checkpoint without the vision tower, embedding and head: the text
    layers alone (386 MB each), so that shards of a few hundred MB hold whole tensors."""
    path.mkdir(parents=True, exist_ok=True)
    shapes = {n: s for n, s in convert.qwen3_vl_8b_shapes(layers).items() if ".language_model.layers." in n}
    shards: list[list] = [[]]
    size = 0
    for name, shp in shapes.items():
        n = 2 * math.prod(shp)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(convert.Slot(name, "BF16", shp, n))
        size += n
    g = convert.torch.Generator().manual_seed(0)
    wmap = {}
    for i, slots in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = convert.ShardWriter(path / fname, slots, {"format": "pt"})
        for s in slots:
            chunk = (convert.torch.randn(s.shape, generator=g) * 0.02).to(convert.torch.bfloat16)
            w.write(s.name, 0, chunk)
            wmap[s.name] = fname
        w.close()
    total = sum(s.nbytes for slots in shards for s in slots)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    (path / "config.json").write_text(json.dumps(convert.qwen3_vl_8b_config_dict(layers), indent=2))


def main() -> None:
    args = arguments()
    rate = parse_size(args.rate) if args.rate else None if args.connection_rate else parse_size("150MB")
    connection_rate = parse_size(args.connection_rate) if args.connection_rate else None

    work = args.workdir.resolve()
    src = work / f"repo-{args.layers}{'-text' if args.text_only else ''}-{args.shard_size}"
    if not (src / "config.json").is_file():
        print(f"writing the synthetic checkpoint to {src} ...", flush=True)
        (write_text_only if args.text_only else convert.write_synthetic)(src, args.layers,
                                                                         parse_size(args.shard_size))
    size = sum(p.stat().st_size for p in src.iterdir())
    shards = sorted(src.glob("*.safetensors"))
    print(f"hashing {size / 1e9:.2f} GB for the hub's etags ...", flush=True)
    server = HubServer({REPO: src}, rate=rate, connection_rate=connection_rate)
    env = hub_env(server, work / "hf-home")

    def on_path(tree: Path) -> dict:
        return {**env, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    here = Path(__file__).resolve().parents[1] / "src"
    py, fp8vl = sys.executable, [sys.executable, "-m", "fp8vl.cli", "quantize"]
    common = ["--workers", str(args.workers)]
    contenders = [      # the streaming run between the two it is compared with: on the same machine state
        ("download alone (snapshot_download, 8 workers)", here,
         lambda d: [[py, "-c", DOWNLOAD, REPO, str(d / "src")]]),
        ("fp8vl quantize ORG/NAME (--stream)", here, lambda d: [[*fp8vl, REPO, str(d / "out"), *common]]),
        ("local conversion, same output (fp8vl quantize LOCAL --record-error, no download)", here,
         lambda d: [[*fp8vl, str(src), str(d / "out"), *common, "--record-error"]]),
        ("local conversion (fp8vl quantize LOCAL, no download)", here,
         lambda d: [[*fp8vl, str(src), str(d / "out"), *common]]),
        ("download, then fp8vl quantize LOCAL", here, lambda d: [
            [py, "-c", DOWNLOAD, REPO, str(d / "src")],
            [*fp8vl, str(d / "src"), str(d / "out"), *common]]),
    ]
    for base in args.baseline:
        contenders.append((f"fp8vl quantize ORG/NAME (--stream), baseline {base}", base.resolve(),
                           lambda d: [[*fp8vl, REPO, str(d / "out"), *common]]))
    runs = []
    try:
        for name, tree, make in contenders:
            d = work / "run"
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(work / "hf-home", ignore_errors=True)
            d.mkdir(parents=True)
            os.sync()              # each run starts with no other run's writes still going to the disk
            print(f"{name} ...", flush=True)
            run = Run(name)
            timed(run, make(d), on_path(tree), d, server)
            run.out = sum(p.stat().st_size for p in (d / "out").iterdir()) if (d / "out").is_dir() else 0
            runs.append(run)
            print(f"  {run.seconds:.1f} s", flush=True)
    finally:
        server.close()
        shutil.rmtree(work / "run", ignore_errors=True)
        shutil.rmtree(work / "hf-home", ignore_errors=True)
    alone, local, plain = runs[0].seconds, runs[2].seconds, runs[3].seconds
    bound = max(alone, local)
    sizes = {p.name: p.stat().st_size for p in shards}
    largest = max(sizes.values())
    throttle = " and ".join(([f"{rate / 1e6:.0f} MB/s for all connections together"] if rate else []) +
                            ([f"{connection_rate / 1e6:.0f} MB/s a connection"] if connection_rate else []))
    print(f"\nsource {size / 1e9:.2f} GB in {len(shards)} shards ({min(sizes.values()) / 1e9:.2f}-"
          f"{largest / 1e9:.2f} GB), link {throttle}, {os.cpu_count()} cores, --workers {args.workers}\n")
    print("| run | wall s | vs max(download, local conversion, same output) | vs download alone | CPU core-s | "
          "disk peak GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r.name} | {r.seconds:.1f} | {r.seconds / bound:.2f}x | {r.seconds / alone:.2f}x | {r.cpu:.1f} | "
              f"{r.peak / 1e9:.2f} |")
    print()
    for r in runs:
        if r.shards:
            print(timeline(r, sizes))
    for r in [runs[1], *runs[5:]]:
        print(f"\n{r.name}: {r.seconds / max(alone, plain):.2f}x max(download, local conversion without the "
              f"error file); output {r.out / 1e9:.2f} GB; disk peak = output + {(r.peak - r.out) / largest:.2f} "
              f"x largest source shard")


if __name__ == "__main__":
    main()
