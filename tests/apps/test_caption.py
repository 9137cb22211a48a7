"""Batch captioning: a real ``transformers serve`` process on localhost serving the tiny FP8 Qwen3-VL
answers the OpenAI client; real scikit-image photos on disk; the in-process backend on the same copy.
The outputs, resume and options are checked here; the server backend's retries and failures against
misbehaving servers in test_caption_server.py."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fp8vl.apps.caption import CaptionOptions, caption, find_images, progress_bar, sidecar
from fp8vl.errors import FP8VLError
from fp8vl.report import print_caption_summary
from helpers import _exif_rotated, _photo, run_cli

TRANSFORMERS = Path(sys.executable).parent / "transformers"
FAST = dict(retries=1, backoff=0.01, timeout=30)   # a dead server is noticed in well under a second


# ---------------------------------------------------------------- a real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    f = log.open("w")
    proc = subprocess.Popen([str(TRANSFORMERS), "serve", str(model), "--port", str(port), "--host", "127.0.0.1",
                             "--device", "cpu"], stdout=f, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                          "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base + "/v1"
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise RuntimeError(f"transformers serve did not answer /health in 120 s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def fp8_dir(dense_fp8) -> Path:
    """The tiny Qwen3-VL built and quantized once per session (conftest: build_tiny_qwen3_vl + quantize)."""
    return dense_fp8.out


@pytest.fixture(scope="module")
def server(fp8_dir, tmp_path_factory) -> str:
    proc, url = _start_server(fp8_dir, tmp_path_factory.mktemp("serve") / "server.log")
    yield url
    _stop(proc)


# ---------------------------------------------------------------- real photos

def _dataset(root: Path) -> tuple[list[Path], Path]:
    """Good images (jpg, png, webp, JPG, jpeg in subfolders, one EXIF-rotated) and one corrupt .jpg."""
    (root / "sub" / "deeper").mkdir(parents=True)
    good = [root / "astronaut.jpg", root / "chelsea.png", root / "coffee.webp", root / "sub" / "rocket.JPG",
            root / "sub" / "deeper" / "camera.jpeg"]
    for p in good:
        _photo(p.stem).save(p)
    good.append(_exif_rotated(root / "sub" / "rotated.jpg"))
    corrupt = root / "sub" / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "notes.md").write_text("not an image")
    return sorted(good), corrupt


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- helpers, no model

def test_find_images(tmp_path):
    good, corrupt = _dataset(tmp_path)
    found = find_images([tmp_path])
    assert sorted(found) == sorted(good + [corrupt])
    assert found == sorted(found)                                # folders walked in sorted order
    assert find_images([good[0], tmp_path])[0] == good[0]          # given order, each image once
    assert len(find_images([good[0], tmp_path])) == len(found)
    assert find_images(str(good[0])) == [good[0]]
    with pytest.raises(FP8VLError, match="no-such"):
        find_images([tmp_path / "no-such"])
    with pytest.raises(FP8VLError, match="notes.md"):
        find_images([tmp_path / "notes.md"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FP8VLError, match="no images"):
        find_images([tmp_path / "empty"])


def test_bad_options_fail_before_any_work(tmp_path):
    _photo("astronaut").save(tmp_path / "a.jpg")
    _photo("chelsea").save(tmp_path / "a.png")
    with pytest.raises(FP8VLError, match="a.txt"):               # two images, one sidecar
        caption([tmp_path], CaptionOptions(endpoint="http://127.0.0.1:9/v1"))
    (tmp_path / "a.png").unlink()
    with pytest.raises(FP8VLError, match="nothing to write"):
        caption([tmp_path], CaptionOptions(endpoint="http://127.0.0.1:9/v1", txt=False))
    with pytest.raises(FP8VLError, match="outside"):
        caption([tmp_path], CaptionOptions(endpoint="http://127.0.0.1:9/v1", csv=tmp_path / "x" / "m.csv"))
    (tmp_path / "other.csv").write_text("image,label\na.jpg,cat\n")
    with pytest.raises(FP8VLError, match="other.csv"):
        caption([tmp_path], CaptionOptions(endpoint="http://127.0.0.1:9/v1", csv=tmp_path / "other.csv"))
    with pytest.raises(FP8VLError, match="--endpoint"):
        caption([tmp_path], CaptionOptions(endpoint="localhost:8000"))
    with pytest.raises(FP8VLError, match="--model DIR"):
        caption([tmp_path], CaptionOptions())
    with pytest.raises(FP8VLError, match="--batch-size"):
        caption([tmp_path], CaptionOptions(model="x", batch_size=0))
    with pytest.raises(FP8VLError, match="--workers"):
        caption([tmp_path], CaptionOptions(model="x", workers=-1))
    port = _free_port()                                          # nobody listens there
    t0 = time.monotonic()
    with pytest.raises(FP8VLError, match=f"127.0.0.1:{port}"):
        caption([tmp_path], CaptionOptions(endpoint=f"http://127.0.0.1:{port}", **FAST))
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "a.txt").exists()


# ---------------------------------------------------------------- through the server

def test_folder_through_server_then_resume_trigger_overwrite(fp8_dir, server, tmp_path):
    good, corrupt = _dataset(tmp_path)
    meta, log = tmp_path / "metadata.csv", tmp_path / "captions.jsonl"
    opts = CaptionOptions(endpoint=server, jsonl=log, csv=meta, max_tokens=16, concurrency=4, **FAST)
    ticks = []
    s = caption([tmp_path], opts, progress=lambda n, total, tokens: ticks.append((n, total)))
    assert ticks == [(n, len(good) + 1) for n in range(1, len(good) + 2)]
    assert s.done == len(good) and s.skipped == 0 and s.tokens > 0 and s.images_per_s > 0
    assert [p for p, _ in s.failed] == [corrupt] and "cannot read image" in s.failed[0][1]
    assert s.model == str(fp8_dir)                               # the first id of /v1/models
    assert not sidecar(corrupt).exists()
    texts = {p: sidecar(p).read_text(encoding="utf-8") for p in good}
    assert all(t.strip() and "\n" not in t for t in texts.values())
    recs = [r for r in _jsonl(log) if "caption" in r]
    assert [r["file"] for r in _jsonl(log) if "error" in r] == ["sub/corrupt.jpg"]     # recorded: not retried
    assert sorted(r["file"] for r in recs) == sorted(p.relative_to(tmp_path).as_posix() for p in good)
    for r in recs:
        assert r["caption"] == texts[tmp_path / r["file"]] and r["tokens"] > 0 and r["seconds"] >= 0
    rows = _read_csv(meta)
    assert rows[0] == ["file_name", "text"]
    assert sorted(rows[1:]) == sorted([p.relative_to(tmp_path).as_posix(), texts[p]] for p in good)
    out = io.StringIO()
    from rich.console import Console
    print_caption_summary(s, Console(file=out, width=200))
    assert "corrupt.jpg" in out.getvalue() and f"captioned {len(good)}" in out.getvalue()

    # rerun: nothing left but the corrupt file; a hand-edited sidecar is kept and wins in the csv
    sidecar(good[0]).write_text("my own caption")
    s2 = caption([tmp_path], opts)
    assert (s2.done, s2.skipped, [p for p, _ in s2.failed]) == (0, len(good), [corrupt])
    assert "--retry-failed" in s2.failed[0][1] and len(_jsonl(log)) == len(good) + 1
    rows = _read_csv(meta)
    assert len(rows) == len(good) + 1 and len({r[0] for r in rows}) == len(rows)
    assert [good[0].relative_to(tmp_path).as_posix(), "my own caption"] in rows

    # overwrite with a trigger word: every image recaptioned, the same caption at temperature 0
    s3 = caption([tmp_path], CaptionOptions(**{**opts.__dict__, "overwrite": True, "trigger": "ohwx"}))
    assert s3.done == len(good) and s3.skipped == 0
    for p in good[1:]:
        assert sidecar(p).read_text(encoding="utf-8") == "ohwx, " + texts[p]
    assert sidecar(good[0]).read_text(encoding="utf-8") == "ohwx, " + texts[good[0]]
    rows = _read_csv(meta)
    assert len(rows) == len(good) + 1 and all(t.startswith("ohwx, ") for _, t in rows[1:])
    assert len(_jsonl(log)) == 2 * len(good) + 2     # a log: the last line of a file wins (the corrupt one twice)


def test_txt_off_resumes_from_csv_and_jsonl(server, tmp_path):
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    (tmp_path / "part").mkdir()
    for i, n in enumerate(names):
        _photo(n).save(tmp_path / ("part" if i < 2 else ".") / f"{n}.png")
    meta, log = tmp_path / "metadata.csv", tmp_path / "log.jsonl"
    opts = CaptionOptions(endpoint=server, txt=False, csv=meta, max_tokens=8, **FAST)
    assert caption([tmp_path / "part"], opts).done == 2
    with log.open("a") as f:                                     # a line cut by a killed run
        f.write('{"file": "coffee.png", "caption": "half')
    s = caption([tmp_path], CaptionOptions(**{**opts.__dict__, "jsonl": log}))
    assert (s.done, s.skipped, s.failed) == (2, 2, [])
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and sorted(json.loads(x)["file"] for x in lines[1:]) == ["coffee.png", "rocket.png"]
    assert caption([tmp_path], CaptionOptions(**{**opts.__dict__, "csv": None, "jsonl": log})).skipped == 2
    rows = _read_csv(meta)
    assert sorted(r[0] for r in rows[1:]) == ["coffee.png", "part/astronaut.png", "part/chelsea.png", "rocket.png"]
    assert all(r[1] for r in rows[1:]) and not list(tmp_path.rglob("*.txt"))


def test_server_killed_mid_batch_loses_nothing_and_rerun_completes(fp8_dir, server, tmp_path):
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "page", "text", "coins", "clock",
             "checkerboard", "horse"]
    images = []
    for n in names:
        _photo(n).save(tmp_path / f"{n}.jpg")
        images.append(tmp_path / f"{n}.jpg")
    proc, url = _start_server(fp8_dir, tmp_path / "server.log")
    log = tmp_path / "captions.jsonl"
    on_disk_at_kill: dict[Path, str] = {}

    def kill_after_four(n, total, tokens):
        if n == 4:
            on_disk_at_kill.update({p: sidecar(p).read_text() for p in images if sidecar(p).exists()})
            _stop(proc)

    try:
        t0 = time.monotonic()
        s = caption([tmp_path], CaptionOptions(endpoint=url, jsonl=log, concurrency=1, max_tokens=16, **FAST),
                    progress=kill_after_four)
        took = time.monotonic() - t0
    finally:
        _stop(proc)
    assert took < 60 and proc.returncode is not None
    assert len(on_disk_at_kill) == 4 and 4 <= s.done < len(images)  # the one in flight may be answered
    assert s.done + len(s.failed) == len(images)
    assert all(url in reason for _, reason in s.failed)
    assert any("stopped answering" in reason for _, reason in s.failed)  # the rest was not sent
    done = {p: sidecar(p).read_text() for p in images if sidecar(p).exists()}
    assert len(done) == s.done and on_disk_at_kill.items() <= done.items()
    assert {tmp_path / r["file"]: r["caption"] for r in _jsonl(log)} == done   # every line whole

    s2 = caption([tmp_path], CaptionOptions(endpoint=server, jsonl=log, concurrency=2, max_tokens=16, **FAST))
    assert (s2.done, s2.skipped, s2.failed) == (len(images) - s.done, s.done, [])
    assert all(sidecar(p).read_text().strip() for p in images)
    assert {p: sidecar(p).read_text() for p in done} == done   # the first run's captions left alone
    assert sorted(r["file"] for r in _jsonl(log)) == sorted(p.name for p in images)


# ---------------------------------------------------------------- in-process

def test_local_backend_captions_in_process(fp8_dir, tmp_path):
    from rich.console import Console

    for n in ["astronaut", "coffee"]:
        _photo(n).save(tmp_path / f"{n}.jpg")
    out = io.StringIO()
    opts = CaptionOptions(model=str(fp8_dir), max_tokens=8, trigger="ohwx", jsonl=tmp_path / "c.jsonl")
    with progress_bar(Console(file=out, width=120)) as (progress, loading):     # a log, not a terminal
        s = caption([tmp_path], opts, progress=progress, loading=loading)
    assert (s.done, s.skipped, s.failed) == (2, 0, []) and 2 <= s.tokens <= 16
    assert "fp8" in s.model
    assert 0 < s.load_seconds < s.seconds and s.captioning_images_per_s > s.images_per_s
    for n in ["astronaut", "coffee"]:
        text = (tmp_path / f"{n}.txt").read_text()
        assert text.startswith("ohwx, ") and len(text) > len("ohwx, ")
    lines = out.getvalue().splitlines()
    assert [r["tokens"] for r in _jsonl(tmp_path / "c.jsonl")]
    assert lines[0] == "loading the model ..." and lines[1].startswith("loading the model: ") and " GB/s" in lines[1]
    assert "captioning: 2/2 images" in lines[-1] and "tokens/s" in lines[-1], lines



def test_prompt_file_not_utf8_or_missing_is_one_line(tmp_path):
    _photo("camera").save(tmp_path / "camera.png")
    bad = tmp_path / "prompt.txt"
    bad.write_bytes("D\u00e9cris l'image.".encode("latin-1"))
    for pf, words in [(bad, ["UTF-8", "line 1"]), (tmp_path / "missing.txt", ["cannot read"])]:
        r = run_cli("caption", tmp_path, "--endpoint", "http://127.0.0.1:9/v1", "--prompt-file", pf, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert str(pf) in r.stderr and all(w in r.stderr for w in words) and "Traceback" not in r.stderr
    assert not sidecar(tmp_path / "camera.png").exists()


def _oom_line(e: FP8VLError) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.startswith("out of memory on ")
    return msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA out-of-memory needs a GPU")
def test_in_process_captioning_out_of_gpu_memory_is_one_line_with_the_fix(fp8_dir, tmp_path):
    """A real CUDA OOM: --gpu-memory 1 MiB (the allocator's per-process cap), so the model cannot load."""
    _photo("astronaut").save(tmp_path / "a.jpg")
    try:
        with pytest.raises(FP8VLError) as e:
            caption([tmp_path], CaptionOptions(model=str(fp8_dir), device="cuda", max_tokens=4, gpu_memory=2**20))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    msg = _oom_line(e.value)
    assert "cuda" in msg and "--batch-size" in msg and "--max-tokens" in msg
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


def test_out_of_memory_mid_batch_is_one_line_and_keeps_the_captions(fp8_dir, tmp_path, monkeypatch):
    """On the CPU no allocation raises torch.OutOfMemoryError (CPU allocation failures are RuntimeErrors),
    so after the first caption torch.cat (rotary embeddings in every decode step and prefill) raises it as
    CUDA's allocator would; everything else is the real in-process path, one image at a time."""
    for n in ["astronaut", "coffee"]:
        _photo(n).save(tmp_path / f"{n}.jpg")

    def cat_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def after_first(n, total, tokens):
        monkeypatch.setattr(torch, "cat", cat_out_of_memory)

    with pytest.raises(FP8VLError) as e:
        caption([tmp_path], CaptionOptions(model=str(fp8_dir), max_tokens=4, batch_size=1), progress=after_first)
    assert "Tried to allocate 20.00 GiB" in _oom_line(e.value) and "--batch-size" in str(e.value)
    assert sidecar(tmp_path / "astronaut.jpg").read_text().strip()      # the first caption is kept
    assert not sidecar(tmp_path / "coffee.jpg").exists()


def test_local_backend_batch_1_and_batch_n_write_the_same_captions(fp8_dir, tmp_path):
    """The engine's continuous batching (3 slots over 5 images of different sizes, slots refilled)
    writes exactly the captions that one image at a time writes."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "astronaut"]
    for i, n in enumerate(names):
        img = _photo(n)
        img.resize((64 + 32 * i, 96)).save(tmp_path / f"{i}-{n}.png")
    texts = {}
    for bs in (1, 3):
        s = caption([tmp_path], CaptionOptions(model=str(fp8_dir), max_tokens=10, batch_size=bs, overwrite=True))
        assert (s.done, s.failed) == (5, [])
        texts[bs] = {p.name: p.read_text() for p in sorted(tmp_path.glob("*.txt"))}
    assert len(texts[1]) == 5 and texts[1] == texts[3]


def test_worker_processes_write_the_captions_threads_write(fp8_dir, tmp_path):
    """Images prepared in a worker process (spawned before the model loads) and in threads of this
    process: the same captions, and a corrupt image is a failure either way."""
    for i, n in enumerate(["astronaut", "coffee", "chelsea"]):
        _photo(n).resize((64 + 48 * i, 96)).save(tmp_path / f"{n}.png")
    (tmp_path / "zz-corrupt.jpg").write_bytes(b"\xff\xd8\xff" + np.random.default_rng(1).bytes(2000))
    texts = {}
    for workers in (0, 1):
        s = caption([tmp_path], CaptionOptions(model=str(fp8_dir), max_tokens=8, workers=workers, overwrite=True,
                                               retry_failed=True))
        assert s.done == 3 and [p.name for p, _ in s.failed] == ["zz-corrupt.jpg"], (workers, s.failed)
        texts[workers] = {p.name: p.read_text() for p in sorted(tmp_path.glob("*.txt"))}
    assert len(texts[0]) == 3 and texts[0] == texts[1]


def test_unreadable_images_are_recorded_listed_and_not_retried(fp8_dir, tmp_path, monkeypatch):
    """A corrupt image fails once, is recorded, and the next run lists it without opening it or
    loading the model (nothing else left); --retry-failed tries it again. With --jsonl the record is
    a line of it; a rerun whose only image left is unreadable loads nothing."""
    import fp8vl.runtime.loader as loader

    _photo("coffee").save(tmp_path / "coffee.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    opts = CaptionOptions(model=str(fp8_dir), max_tokens=4)
    s = caption([tmp_path], opts)
    assert s.done == 1 and [p for p, _ in s.failed] == [bad]
    assert (tmp_path / ".broken.jpg.fp8vl-failed").is_file()
    loads = []
    monkeypatch.setattr(loader, "load_any", lambda *a, **k: loads.append(a) or 1 / 0)
    s = caption([tmp_path], opts)                                   # listed, never opened, no model
    assert (s.done, s.skipped, loads) == (0, 1, []) and s.load_seconds == 0.0
    from rich.console import Console

    out = io.StringIO()
    print_caption_summary(s, Console(file=out, width=300), "cpu")
    assert "nothing to caption, so no model was loaded" in out.getvalue()
    assert [p for p, _ in s.failed] == [bad] and "--retry-failed" in s.failed[0][1]
    s = caption([tmp_path], CaptionOptions(model=str(fp8_dir), max_tokens=4, retry_failed=True))
    assert [p for p, _ in s.failed] == [bad] and loads == [] and "cannot read image" in s.failed[0][1]
    # --jsonl: the record is a line there
    log = tmp_path / "c.jsonl"
    sub = tmp_path / "sub"
    sub.mkdir()
    bad.rename(sub / "broken.jpg")
    jopts = CaptionOptions(model=str(fp8_dir), max_tokens=4, txt=False, jsonl=log)
    s = caption([sub], jopts)
    assert [p.name for p, _ in s.failed] == ["broken.jpg"] and loads == []
    assert [(r["file"], "cannot read image" in r["error"]) for r in _jsonl(log)] == [("sub/broken.jpg", True)]
    s = caption([sub], jopts)
    assert "--retry-failed" in s.failed[0][1] and not (sub / ".broken.jpg.fp8vl-failed").exists()


def test_a_second_run_on_the_same_outputs_is_refused_naming_the_first(fp8_dir, tmp_path):
    """Two caption runs on one folder: the second is refused with one line naming the first's PID, and
    it writes nothing; the lock is gone once the first ends."""
    import textwrap

    _photo("coffee").save(tmp_path / "coffee.png")
    holder = textwrap.dedent(f"""
        import sys, time
        from fp8vl.apps.caption import CaptionOptions, _outputs_locked
        with _outputs_locked([{str(tmp_path)!r}], CaptionOptions(model="m")):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        r = run_cli("caption", tmp_path, "--model", fp8_dir, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"PID {p.pid}" in r.stderr and ".fp8vl-caption.lock" in r.stderr
        assert not sidecar(tmp_path / "coffee.png").exists()
    finally:
        p.communicate("\n", timeout=30)
    assert not (tmp_path / ".fp8vl-caption.lock").exists()
