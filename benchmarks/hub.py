"""Hub benchmark: ``fp8vl quantize ORG/NAME`` against download alone and download-then-convert.

Serves a synthetic Qwen3-VL-8B-shaped checkpoint (benchmarks/convert.py's, ``--layers`` text layers)
from the local hub of the tests (tests/hub_server.py: huggingface_hub's own protocol on 127.0.0.1),
throttled to ``--rate`` for all connections together, like one link. Then, side by side in one run,
each a subprocess with the real huggingface_hub client:

1. download alone: ``hf_hub_download`` of every file, 8 at once (what ``snapshot_download`` does; the
   local hub has no ``tree`` listing, so the file list comes from ``model_info``);
2. download, then ``fp8vl quantize LOCAL OUTPUT`` (what a user does today);
3. ``fp8vl quantize ORG/NAME OUTPUT`` (streaming: converts each shard as it lands, deletes it once written).

Wall time and disk peak (all files under the run's folder, sampled every 20 ms) for each.

    python benchmarks/hub.py --layers 2 --shard-size 1GB --rate 150MB
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from convert import write_synthetic  # noqa: E402  (benchmarks/convert.py)
from hub_server import HubServer, hub_env  # noqa: E402

from fp8vl.options import parse_size  # noqa: E402

REPO = "bench/qwen3-vl-synthetic"
DOWNLOAD = ("import sys; from concurrent.futures import ThreadPoolExecutor; "
            "from huggingface_hub import HfApi, hf_hub_download; "
            "info = HfApi().model_info(sys.argv[1], files_metadata=True); "
            "list(ThreadPoolExecutor(8).map(lambda s: hf_hub_download(sys.argv[1], s.rfilename, revision=info.sha, "
            "local_dir=sys.argv[2]), info.siblings))")


def du(root: Path) -> int:
    seen = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            seen[st.st_ino] = st.st_blocks * 512
    return sum(seen.values())


def timed(cmds: list[list[str]], env: dict, watch: Path) -> tuple[float, int]:
    """Run ``cmds`` one after the other; (seconds, disk peak under ``watch``)."""
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], du(watch))
            time.sleep(0.02)
    w = threading.Thread(target=sample, daemon=True)
    w.start()
    t0 = time.perf_counter()
    for cmd in cmds:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    stop.set()
    w.join()
    return seconds, max(peak[0], du(watch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="text layers (real model: 36)")
    ap.add_argument("--shard-size", default="1GB", help="source shard size")
    ap.add_argument("--rate", default="150MB", help="link speed, bytes per second (all connections together)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-hub"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    work = args.workdir.resolve()
    src = work / "repo"
    if not (src / "config.json").is_file():
        print(f"writing the synthetic checkpoint to {src} ...", flush=True)
        write_synthetic(src, args.layers, parse_size(args.shard_size))
    size = sum(p.stat().st_size for p in src.iterdir())
    shards = sorted(src.glob("*.safetensors"))
    print(f"hashing {size / 1e9:.2f} GB for the hub's etags ...", flush=True)
    server = HubServer({REPO: src}, rate=parse_size(args.rate))
    env = {**hub_env(server, work / "hf-home"), "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    py, fp8vl = sys.executable, [sys.executable, "-m", "fp8vl.cli", "quantize"]
    common = ["--workers", str(args.workers)]
    rows = []
    try:
        for name, make in [
            ("download alone (hf_hub_download, 8 files at once)",
             lambda d: [[py, "-c", DOWNLOAD, REPO, str(d / "src")]]),
            ("download, then fp8vl quantize LOCAL", lambda d: [
                [py, "-c", DOWNLOAD, REPO, str(d / "src")],
                [*fp8vl, str(d / "src"), str(d / "out"), *common]]),
            ("fp8vl quantize ORG/NAME (--stream)", lambda d: [[*fp8vl, REPO, str(d / "out"), *common]]),
        ]:
            d = work / "run"
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(work / "hf-home", ignore_errors=True)
            d.mkdir(parents=True)
            print(f"{name} ...", flush=True)
            seconds, peak = timed(make(d), env, d)
            out = sum(p.stat().st_size for p in (d / "out").iterdir()) if (d / "out").is_dir() else 0
            rows.append((name, seconds, peak, out))
    finally:
        server.close()
        shutil.rmtree(work / "run", ignore_errors=True)
    alone = rows[0][1]
    largest = max(p.stat().st_size for p in shards)
    print(f"\nsource {size / 1e9:.2f} GB in {len(shards)} shards (largest {largest / 1e9:.2f} GB), link "
          f"{parse_size(args.rate) / 1e6:.0f} MB/s, {os.cpu_count()} cores, --workers {args.workers}\n")
    print("| run | wall s | vs download alone | disk peak GB |")
    print("|---|---:|---:|---:|")
    for name, seconds, peak, out in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / alone:.2f}x | {peak / 1e9:.2f} |")
    out = rows[2][3]
    print(f"\noutput {out / 1e9:.2f} GB; streaming disk peak = output + {(rows[2][2] - out) / largest:.2f} "
          f"x largest source shard")


if __name__ == "__main__":
    main()
