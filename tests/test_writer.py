"""fp8vl.writer: what OUTPUT may be replaced, free space checked up front, a disk that fills anyway.

Disk-full cases run on a real small tmpfs (mounted here; skipped where mounting is not allowed);
the up-front check also runs on the real filesystem, with a sparse source whose plan is larger
than its free space.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fp8vl import FP8VLError, QuantizeOptions, quantize
from fp8vl.dequantize import dequantize
from fp8vl.options import DequantizeOptions
from helpers import ROOT, cli_env, file_hashes


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- --overwrite

def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(dense_src, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    (thesis / "figures").mkdir()
    before = file_hashes(thesis)
    with pytest.raises(FP8VLError) as ei:
        quantize(dense_src, thesis, QuantizeOptions(overwrite=True))
    msg = str(ei.value)
    assert str(thesis) in msg and "config.json" in msg and "chapter1.tex" in msg, msg
    assert file_hashes(thesis) == before and listing(tmp_path) == ["thesis"]


def test_overwrite_refuses_a_file_and_leaves_nothing_beside_it(dense_src, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("not a checkpoint")
    with pytest.raises(FP8VLError, match="is a file"):
        quantize(dense_src, target, QuantizeOptions(overwrite=True))
    assert target.read_text() == "not a checkpoint" and listing(tmp_path) == ["notes.txt"]


def test_overwrite_replaces_an_earlier_output_and_leaves_nothing_beside_it(dense_fp8, tmp_path):
    out = tmp_path / "out"
    quantize(dense_fp8.src, out, QuantizeOptions(scale_dtype="bfloat16"))
    quantize(dense_fp8.src, out, QuantizeOptions(overwrite=True))
    got, first = file_hashes(out), file_hashes(dense_fp8.out)
    got.pop("README.md"), first.pop("README.md")
    assert got == first and listing(tmp_path) == ["out"]


# ---------------------------------------------------------------- free space, up front

def sparse_checkpoint(folder: Path, tensors: dict[str, tuple[str, list[int], int]], config: dict) -> Path:
    """A checkpoint whose data section is a hole: {name: (dtype, shape, itemsize)}; costs no disk."""
    folder.mkdir(parents=True)
    header, pos = {}, 0
    for name, (dtype, shape, item) in tensors.items():
        n = item
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        f.truncate(8 + len(js) + pos)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def needs(msg: str) -> float:
    """Bytes from "needs 12.3 GB" / "needs 4.5 MB" in an error message."""
    m = re.search(r"needs ([0-9.]+) (GB|MB)", msg)
    assert m, msg
    return float(m.group(1)) * (1e9 if m.group(2) == "GB" else 1e6)


def rows_for(nbytes: int, k: int) -> int:
    return -(-nbytes // k // 128) * 128


def never(done, total):
    raise AssertionError("writing started although the output cannot fit")


def test_quantize_refuses_up_front_when_the_output_cannot_fit(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    k = 8192
    n = rows_for(2 * free, k)               # FP8 output: one byte per weight, twice the free space
    src = sparse_checkpoint(tmp_path / "src", {"model.layers.0.mlp.down_proj.weight": ("BF16", [n, k], 2)},
                            {"model_type": "qwen3"})
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(FP8VLError) as ei:
        quantize(src, parent / "out", QuantizeOptions(workers=1), progress=never)
    msg = str(ei.value)
    assert str(parent / "out") in msg and n * k - 5e7 <= needs(msg) <= 1.01 * n * k and "free" in msg, msg
    assert listing(parent) == []


def test_dequantize_refuses_up_front_when_the_output_cannot_fit(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    k = 8192
    n = rows_for(free, k)                   # BF16 output: two bytes per FP8 weight, twice the free space
    src = sparse_checkpoint(tmp_path / "src", {
        "model.layers.0.mlp.down_proj.weight": ("F8_E4M3", [n, k], 1),
        "model.layers.0.mlp.down_proj.weight_scale_inv": ("F32", [n // 128, k // 128], 4)},
        {"model_type": "qwen3", "quantization_config": {"quant_method": "fp8"}})
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(FP8VLError) as ei:
        dequantize(src, parent / "out", progress=never)
    msg = str(ei.value)
    assert 2 * n * k - 5e7 <= needs(msg) <= 1.01 * 2 * n * k and "free" in msg, msg
    assert listing(parent) == []


# ---------------------------------------------------------------- a small real filesystem

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def linear_source(folder: Path, mb: int) -> Path:
    """A text-model source of ``mb`` MB of BF16 linears in 4 MB tensors."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.mlp.down_proj.weight": torch.randn(1024, 2048, generator=g).bfloat16()
               for i in range(mb // 4)}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return folder


def fill(disk: Path) -> None:
    """Write until the filesystem is full."""
    with open(disk / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_quantize_onto_a_too_small_disk_is_refused_up_front(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 64)          # 32 MB of FP8 for a 24 MB disk
    with pytest.raises(FP8VLError, match="free") as ei:
        quantize(src, small_disk / "out", QuantizeOptions(workers=1), progress=never)
    assert 32 << 20 <= needs(str(ei.value)) <= 40 << 20, ei.value
    assert listing(small_disk) == []


def filling_progress(disk: Path):
    calls = []

    def progress(done, total):
        if not calls:
            fill(disk)
        calls.append(done)
    return progress


def test_quantize_when_the_disk_fills_anyway_gives_one_line_and_leaves_nothing(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 16)          # 8 MB of FP8: fits, until something else fills the disk
    with pytest.raises(FP8VLError) as ei:
        quantize(src, small_disk / "out", QuantizeOptions(workers=1, max_shard_size=2_000_000),
                 progress=filling_progress(small_disk))
    msg = str(ei.value)
    assert "no space left" in msg.lower() and str(small_disk / "out") in msg and "\n" not in msg, msg
    assert [n for n in listing(small_disk) if not n.startswith("filler-")] == []


def test_dequantize_when_the_disk_fills_anyway_gives_one_line_and_leaves_nothing(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 16)
    fp8 = tmp_path / "fp8"
    quantize(src, fp8, QuantizeOptions())
    with pytest.raises(FP8VLError) as ei:
        dequantize(fp8, small_disk / "out", DequantizeOptions(workers=1, max_shard_size=2_000_000),
                   progress=filling_progress(small_disk))
    assert "no space left" in str(ei.value).lower()
    assert [n for n in listing(small_disk) if not n.startswith("filler-")] == []


# The CLI, as a user runs it, while another program fills the disk mid-run.
FILL_MID_RUN = r"""
import sys, threading, time, uuid, pathlib
disk = pathlib.Path(sys.argv[1])
def filler():
    while not any(disk.glob(".out.fp8vl-partial/**/*.safetensors")):
        time.sleep(0.001)
    with open(disk / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16)); f.flush()
        except OSError:
            pass
threading.Thread(target=filler, daemon=True).start()
sys.argv = ["fp8vl", "quantize", sys.argv[2], str(disk / "out"), "--workers", "1", "--max-shard-size", "2MB"]
from fp8vl.cli import main
main()
"""


def test_cli_disk_full_mid_run_is_one_line_exit_2(small_disk, tmp_path):
    src = linear_source(tmp_path / "src", 32)
    r = subprocess.run([sys.executable, "-c", FILL_MID_RUN, str(small_disk), str(src)], capture_output=True,
                       text=True, env=cli_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left" in lines[0].lower(), r.stderr
    assert [n for n in listing(small_disk) if not n.startswith("filler-")] == []


def test_output_that_does_not_match_the_plan_is_reported_as_a_bug(dense_fp8, tmp_path):
    """check_output reopens what was written; a mismatch with the plan is fp8vl's fault, not the
    user's: InternalError (a traceback in the CLI), not an FP8VLError that reads like bad input."""
    from fp8vl.errors import InternalError
    from fp8vl.shards import Slot
    from fp8vl.writer import check_output

    out = tmp_path / "out"
    shutil.copytree(dense_fp8.out, out)
    planned = {"model.language_model.layers.0.self_attn.q_proj.weight": Slot(
        "model.language_model.layers.0.self_attn.q_proj.weight", "F8_E4M3", (1, 1), 1)}
    with pytest.raises(InternalError, match="fp8vl bug, please report it:.*q_proj.weight is"):
        check_output(out, planned, "weight_scale_inv")


# ---------------------------------------------------------------- chunk jobs: a plain loop for one worker, else a pool

OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


@pytest.fixture
def two_torch_threads():
    """The caller runs torch on 2 threads (any count but 1 shows a change), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_copy_jobs_return_the_bytes_and_write_nothing(tmp_path):
    from fp8vl.shards import Scratch, read_header
    from fp8vl.writer import COPY_BYTES, copy_jobs

    t = torch.arange(COPY_BYTES // 4 + 1000, dtype=torch.int32)          # 2 jobs, the last partial
    save_file({"t": t}, tmp_path / "a.safetensors")
    before = listing(tmp_path)
    info = read_header(tmp_path / "a.safetensors")[0]["t"]
    jobs = copy_jobs("out.t", info)
    assert [j.nbytes for j in jobs] == [COPY_BYTES, t.numel() * 4 - COPY_BYTES]
    got = bytearray(t.numel() * 4)
    scratch = Scratch()
    for j in jobs:
        chunk = j.run(scratch)
        for p in chunk.pieces:
            assert p.name == "out.t"
            got[p.at:p.at + p.data.numel()] = p.data.numpy().tobytes()
    assert bytes(got) == t.numpy().tobytes()
    assert listing(tmp_path) == before


@pytest.mark.parametrize("workers", [1, 3])
def test_write_shards_writes_what_the_jobs_return_in_a_loop_or_on_a_pool(tmp_path, workers, two_torch_threads):
    """One worker: every job on the calling thread, torch's thread count as the caller set it. More: the
    jobs on pool threads running torch single-threaded, the caller's own count untouched (OpenMP builds)
    and the default for new threads put back. Each slot's ``slot_done`` comes once, after its last
    chunk, with the notes in job order."""
    import threading
    from functools import partial

    from fp8vl.shards import Slot
    from fp8vl.writer import Chunk, Job, Piece, write_shards

    from safetensors.torch import load_file

    data = {"a": torch.arange(1000, dtype=torch.int32), "b": torch.arange(77, dtype=torch.float32) / 7,
            "c": torch.zeros(0, dtype=torch.int32)}
    slots = {n: Slot(n, {torch.int32: "I32", torch.float32: "F32"}[t.dtype], tuple(t.shape), t.numel() * 4)
             for n, t in data.items()}
    ran, done, seen = [], [], []

    def job(name: str, at: int, n: int, scratch) -> Chunk:
        ran.append((threading.current_thread(), torch.get_num_threads()))
        return Chunk((Piece(name, at, data[name].view(torch.uint8)[at:at + n]),), note=at)

    def jobs_for(slot: Slot) -> list[Job]:
        return [Job(min(300, slot.nbytes - at), partial(job, slot.name, at, min(300, slot.nbytes - at)))
                for at in range(0, slot.nbytes, 300)]

    def slot_done(slot, path, notes):                                     # its bytes are in the file by now
        done.append((slot.name, path.name, notes, torch.equal(load_file(path)[slot.name], data[slot.name])))

    total = sum(s.nbytes for s in slots.values())
    wm = write_shards(tmp_path, [[slots["a"], slots["c"]], [slots["b"]]], jobs_for, workers,
                      lambda d, t: seen.append((d, t, torch.get_num_threads())), total, slot_done=slot_done)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert wm == {"a": names[0], "c": names[0], "b": names[1]}
    back = {**load_file(tmp_path / names[0]), **load_file(tmp_path / names[1])}
    assert all(torch.equal(back[n], data[n]) for n in data)
    assert [(d, t) for d, t, _ in seen][-1] == (total, total) and [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert sorted(done) == [("a", names[0], list(range(0, 4000, 300)), True), ("b", names[1], [0, 300], True),
                            ("c", names[0], [], True)]
    threads = {t for t, _ in ran}
    if workers == 1:
        assert threads == {threading.current_thread()}
        assert {n for _, n in ran} == {2}
    else:
        assert threading.current_thread() not in threads and all(t.name.startswith("fp8vl") for t in threads)
        if OPENMP:
            assert {n for _, n in ran} == {1}
            assert {n for _, _, n in seen} == {2}                         # the caller's own count
    assert torch.get_num_threads() == 2
    fresh = []
    t = threading.Thread(target=lambda: (torch.ones(1 << 16).sum(), fresh.append(torch.get_num_threads())))
    t.start()
    t.join()
    assert fresh == [2]                                                   # the default for new threads too


def test_one_worker_and_several_write_the_same_bytes_errors_included(dense_src, tmp_path, two_torch_threads):
    import threading

    outs, calls = {}, {}
    for workers in (1, 3):
        calls[workers] = []
        progress = lambda d, t: calls[workers].append(  # noqa: E731
            (d, t, threading.current_thread() is threading.main_thread(),
             any(x.name.startswith("fp8vl") for x in threading.enumerate()), torch.get_num_threads()))
        res = quantize(dense_src, tmp_path / f"w{workers}" / "out", QuantizeOptions(workers=workers, record_error=True,
                                                                             max_shard_size=1_000_000),
                       progress=progress)
        assert len(res.shards) > 1 and calls[workers][-1][:2] == (res.bytes_in, res.bytes_in)
        outs[workers] = file_hashes(res.output)
    assert outs[1] == outs[3] and "fp8vl-errors.json" in outs[1]
    assert all(main and not pool and n == 2 for _, _, main, pool, n in calls[1])   # a plain loop, torch untouched
    assert any(pool for _, _, _, pool, _ in calls[3])
