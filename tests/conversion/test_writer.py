"""fp8vl.conversion.writer: the check after writing, chunk jobs that return their bytes, the shard writer's
loop and pool.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fp8vl import QuantizeOptions, quantize
from helpers import file_hashes


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- --overwrite

def test_output_that_does_not_match_the_plan_is_reported_as_a_bug(dense_fp8, tmp_path):
    """check_output reopens what was written; a mismatch with the plan is fp8vl's fault, not the
    user's: InternalError (a traceback in the CLI), not an FP8VLError that reads like bad input."""
    from fp8vl.errors import InternalError
    from fp8vl.checkpoint.shards import Slot
    from fp8vl.conversion.writer import check_output

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
    from fp8vl.checkpoint.shards import Scratch, read_header
    from fp8vl.conversion.writer import COPY_BYTES, copy_jobs

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

    from fp8vl.checkpoint.shards import Slot
    from fp8vl.conversion.writer import Chunk, Job, Piece, write_shards

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


def test_write_shards_in_a_given_order_writes_the_same_files(tmp_path):
    """``order`` (the hub's download order): slots written in that order across shard files, every byte
    where the shard-after-shard run puts it; an order that misses a slot is a bug, said as one."""
    from functools import partial

    from fp8vl.errors import InternalError
    from fp8vl.checkpoint.shards import Slot
    from fp8vl.conversion.writer import Chunk, Job, Piece, write_shards

    data = {n: torch.arange(i * 100, i * 100 + 50 + i, dtype=torch.int32) for i, n in enumerate("abcd")}
    slots = {n: Slot(n, "I32", tuple(t.shape), t.numel() * 4) for n, t in data.items()}
    layout = [[slots["a"], slots["b"]], [slots["c"], slots["d"]]]

    def jobs_for(slot: Slot) -> list[Job]:
        return [Job(slot.nbytes, partial(lambda n, scratch: Chunk((Piece(n, 0, data[n].view(torch.uint8)),)),
                                         slot.name))]
    done = []
    plain, ordered = tmp_path / "plain", tmp_path / "ordered"
    plain.mkdir(), ordered.mkdir()
    write_shards(plain, layout, jobs_for, 1, None, 1)
    wm = write_shards(ordered, layout, jobs_for, 1, None, 1, slot_done=lambda s, p, n: done.append(s.name),
                      order=["d", "a", "c", "b"])
    assert done == ["d", "a", "c", "b"]
    assert wm == {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}
    assert file_hashes(plain) == file_hashes(ordered)
    with pytest.raises(InternalError, match="every slot"):
        write_shards(tmp_path / "bad", layout, jobs_for, 1, None, 1, order=["d", "a", "c"])


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
