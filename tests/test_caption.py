"""Batch captioning: a real ``transformers serve`` process on localhost serving the tiny FP8 Qwen3-VL
answers the OpenAI client; real scikit-image photos on disk; the in-process backend on the same copy."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from fp8vl.caption import (CaptionOptions, caption, clean_caption, find_images, image_data_url, load_image,
                           progress_bar, sidecar)
from fp8vl.errors import FP8VLError
from fp8vl.report import print_caption_summary
from helpers import popen_cli, run_cli

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

def _photo(name: str) -> Image.Image:
    a = getattr(data, name)()
    return Image.fromarray(a.astype(np.uint8) * 255 if a.dtype == bool else a)


def _exif_rotated(path: Path) -> Path:
    """A 300x200 (WxH) JPEG, red top-left corner, EXIF orientation 6: shown rotated 90 degrees clockwise."""
    im = _photo("chelsea").convert("RGB").resize((300, 200))
    im.paste((255, 0, 0), (0, 0, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)
    return path


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


def test_load_image_applies_exif_and_never_upscales(tmp_path):
    im = load_image(_exif_rotated(tmp_path / "r.jpg"), 512)
    assert im.size == (200, 300)                                 # stored 300x200, shown upright
    px = np.asarray(im)
    assert px[5, -5, 0] > 200 and px[5, -5, 1] < 60              # the red corner went to the top right
    assert not (px[5, 5, 0] > 200 and px[5, 5, 1] < 60)
    sent = Image.open(io.BytesIO(base64.b64decode(image_data_url(im).split(",", 1)[1])))
    assert sent.format == "JPEG" and sent.size == (200, 300)     # what the server receives is rotated too
    _photo("coffee").save(tmp_path / "coffee.png")               # 600x400
    assert load_image(tmp_path / "coffee.png", 300).size == (300, 200)
    assert load_image(tmp_path / "coffee.png", 4096).size == (600, 400)
    _photo("logo").save(tmp_path / "logo.png")                   # RGBA: transparent parts on white
    logo = load_image(tmp_path / "logo.png", 64)
    assert logo.mode == "RGB" and max(logo.size) == 64 and logo.getpixel((0, 0)) == (255, 255, 255)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(FP8VLError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")


def test_clean_caption():
    assert clean_caption("  A cat\n on a sofa.  ") == "A cat on a sofa."
    assert clean_caption("A cat.", "ohwx") == "ohwx, A cat."
    assert clean_caption("A cat.", "ohwx, ") == "ohwx, A cat."
    assert clean_caption("<think>hmm\nlet me see</think>\nA cat.", "ohwx") == "ohwx, A cat."
    assert clean_caption("   ", "ohwx") == "" and clean_caption(None) == ""


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
    s = caption([tmp_path], opts, progress=lambda n, total: ticks.append((n, total)))
    assert ticks == [(n, len(good) + 1) for n in range(1, len(good) + 2)]
    assert s.done == len(good) and s.skipped == 0 and s.tokens > 0 and s.images_per_s > 0
    assert [p for p, _ in s.failed] == [corrupt] and "cannot read image" in s.failed[0][1]
    assert s.model == str(fp8_dir)                               # the first id of /v1/models
    assert not sidecar(corrupt).exists()
    texts = {p: sidecar(p).read_text(encoding="utf-8") for p in good}
    assert all(t.strip() and "\n" not in t for t in texts.values())
    recs = _jsonl(log)
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
    assert len(_jsonl(log)) == len(good)
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
    assert len(_jsonl(log)) == 2 * len(good)                      # a log: the last line of a file wins


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

    def kill_after_four(n, total):
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
    with progress_bar(Console(file=out, force_terminal=True, width=120), transient=False) as tick:
        s = caption([tmp_path], opts, progress=tick)
    assert (s.done, s.skipped, s.failed) == (2, 0, []) and 2 <= s.tokens <= 16
    assert "fp8" in s.model
    assert 0 < s.load_seconds < s.seconds and s.captioning_images_per_s > s.images_per_s
    for n in ["astronaut", "coffee"]:
        text = (tmp_path / f"{n}.txt").read_text()
        assert text.startswith("ohwx, ") and len(text) > len("ohwx, ")
    assert [r["tokens"] for r in _jsonl(tmp_path / "c.jsonl")] and "2/2" in out.getvalue()
    assert "img/s" in out.getvalue()


# ---------------------------------------------------------------- a misbehaving server

class ScriptedServer(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 speaking the OpenAI chat API, whose n-th chat request gets
    ``script(n)``: "ok", "html" (a proxy's page), "empty", "cut" (JSON cut short, complete as HTTP),
    "short" (connection closed mid-body), "500" or "hang" (never answers until closed). It records the
    mean pixel value of every image it receives."""

    daemon_threads = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script, self.count, self.means, self.lock = script, 0, [], threading.Lock()
        self.release = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.shutdown()
        self.server_close()


def _completion_json(n: int) -> bytes:
    return json.dumps({"id": f"c{n}", "object": "chat.completion", "created": 0, "model": "scripted",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": f"caption number {n}"}}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()


class _ScriptedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model",
                                                                    "created": 0, "owned_by": "test"}]}).encode())
        else:
            self._send(404, b"{}")

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        url = req["messages"][0]["content"][0]["image_url"]["url"]
        with srv.lock:
            n = srv.count
            srv.count += 1
            srv.means.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))).mean())
        what = srv.script(n)
        if what == "ok":
            self._send(200, _completion_json(n))
        elif what == "html":
            self._send(200, b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", "text/html")
        elif what == "empty":
            self._send(200, b"")
        elif what == "cut":
            self._send(200, _completion_json(n)[:40])
        elif what == "short":
            body = _completion_json(n)
            self._send(200, body[:40], length=len(body))
            self.close_connection = True
        elif what == "500":
            self._send(500, b'{"error": {"message": "boom"}}')
        elif what == "hang":
            srv.release.wait()


@pytest.fixture
def scripted():
    servers = []

    def start(script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _photos(folder: Path, n: int) -> list[Path]:
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "page", "coins"]
    out = []
    for name in names[:n]:
        _photo(name).save(folder / f"{name}.png")
        out.append(folder / f"{name}.png")
    return sorted(out)


def test_non_json_200_replies_are_retried_then_recorded_and_the_batch_goes_on(scripted, tmp_path):
    images = _photos(tmp_path, 5)
    # one request at a time, two attempts per image: image 0 gets HTML twice, image 1 an empty body then a
    # caption, image 2 cut-off JSON twice, image 3 a body cut by a closed connection then a caption,
    # image 4 a 500 twice
    seq = ["html", "html", "empty", "ok", "cut", "cut", "short", "ok", "500", "500"]
    srv = scripted(lambda n: seq[n] if n < len(seq) else "ok")
    s = caption([tmp_path], CaptionOptions(endpoint=srv.url, concurrency=1, **FAST))
    assert srv.count == len(seq)                                   # every image sent, each retried once
    assert s.done == 2 and [p for p, _ in s.failed] == [images[0], images[2], images[4]]
    reasons = dict(s.failed)
    assert "not the JSON" in reasons[images[0]] and "502 Bad Gateway" in reasons[images[0]]
    assert "not the JSON" in reasons[images[2]] and "500" in reasons[images[4]]
    assert sidecar(images[1]).read_text() == "caption number 3" and sidecar(images[3]).read_text() == "caption number 7"
    assert not any(sidecar(images[i]).exists() for i in (0, 2, 4))
    # the command prints the summary and exits 1, no traceback
    for p in images:
        sidecar(p).unlink(missing_ok=True)
    srv2 = scripted(lambda n: "html" if n % 2 == 0 else "ok")
    r = run_cli("caption", tmp_path, "--endpoint", srv2.url, "--concurrency", "1", "--retries", "0",
                "--backoff", "0", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    out = " ".join(r.stdout.split())
    assert "captioned 2" in out and "failed 3" in out and "not the JSON" in out


def test_a_hung_server_counts_as_down_like_a_dead_one(scripted, tmp_path):
    images = _photos(tmp_path, 6)
    srv = scripted(lambda n: "hang")
    t0 = time.monotonic()
    s = caption([tmp_path], CaptionOptions(endpoint=srv.url, concurrency=1, retries=0, timeout=0.5))
    took = time.monotonic() - t0
    assert s.done == 0 and len(s.failed) == len(images)
    assert srv.count == 3 and took < 5                              # three timeouts, then nothing more sent
    assert sum("stopped answering" in reason for _, reason in s.failed) == len(images) - 3


def test_ctrl_c_ends_a_run_stuck_on_a_hung_server_at_once_and_keeps_the_captions(scripted, tmp_path):
    images = _photos(tmp_path, 6)
    srv = scripted(lambda n: "ok" if n < 2 else "hang")             # two answers, then silence
    p = popen_cli("caption", tmp_path, "--endpoint", srv.url, "--concurrency", "2", "--timeout", "120",
                  "--jsonl", tmp_path / "log.jsonl", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while (srv.count < 4 or sum(sidecar(x).exists() for x in images) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)                                       # two captions written, two requests hanging
        assert p.poll() is None and srv.count == 4
        time.sleep(0.3)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130 and took < 2, (took, err)
    assert "interrupted" in err and "Traceback" not in err
    kept = {x: sidecar(x).read_text() for x in images if sidecar(x).exists()}
    assert sorted(kept.values()) == ["caption number 0", "caption number 1"]
    assert sorted(r["caption"] for r in _jsonl(tmp_path / "log.jsonl")) == sorted(kept.values())


def test_a_16_bit_png_reaches_the_server_mid_grey(scripted, tmp_path):
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(tmp_path / "grey16.png")
    _photo("camera").save(tmp_path / "camera.png")                # 8-bit grey, for comparison
    srv = scripted(lambda n: "ok")
    s = caption([tmp_path], CaptionOptions(endpoint=srv.url, concurrency=1, **FAST))
    assert s.done == 2 and srv.count == 2
    camera, grey16 = srv.means                                     # sorted order: camera.png, grey16.png
    assert abs(grey16 - 127.5) <= 1.5                              # JPEG at quality 90 on a flat field
    assert abs(camera - np.asarray(_photo("camera")).mean()) <= 1.5


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

    def after_first(n, total):
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
