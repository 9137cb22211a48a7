"""The server backend against real HTTP servers on 127.0.0.1 that misbehave on purpose (HTML from a
proxy, empty and cut-off bodies, 500s, a hung server, Ctrl-C mid-request), and the image it sends."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fp8vl.apps.caption import CaptionOptions, caption, sidecar
from fp8vl.apps.caption_server import image_data_url
from fp8vl.inputs.images import load_image
from helpers import _exif_rotated, _photo, popen_cli, run_cli
from test_caption import FAST, _jsonl


def test_the_image_sent_is_the_upright_jpeg(tmp_path):
    im = load_image(_exif_rotated(tmp_path / "r.jpg"), 512)
    sent = Image.open(io.BytesIO(base64.b64decode(image_data_url(im).split(",", 1)[1])))
    assert sent.format == "JPEG" and sent.size == (200, 300)     # what the server receives is rotated too


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

