"""A local stand-in for the Hugging Face Hub, speaking the download protocol as huggingface_hub's
client uses it (read from huggingface_hub 2.x: ``HfApi.model_info``, ``hf_hub_download``,
``get_hf_file_metadata``, ``http_get``, ``parse_safetensors_file_metadata``). Serves local folders
as model repos, on 127.0.0.1 only:

- ``GET /api/models/{repo}[/revision/{rev}]``: ``{"id", "sha", "siblings": [{"rfilename", "size",
  "blobId", "lfs"}]}``; unknown repo or revision: 404 with ``X-Error-Code``.
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: small files answer 200 with ``ETag`` (the git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; ``.safetensors`` files (LFS on the hub) answer 302 to
  the "CDN", a second port (another origin, so the client does not follow it on HEAD, as with the
  real CDN), with ``X-Linked-Etag`` (sha256), ``X-Linked-Size``, ``X-Repo-Commit`` and ``Location``.
- ``HEAD|GET /blobs/{sha256}`` on the CDN port: the bytes, with ``Range`` (206 + ``Content-Range``).
- ``GET /api/models/{repo}/tree/{rev}``: the file list ``snapshot_download`` asks for (one page).

Throttles: ``rate`` (bytes/s) limits all connections together, like one link; ``connection_rate``
limits each connection on its own, as CDNs do (both may be set). Bodies go out with ``sendfile`` in
paced pieces of 256 KiB, so that the hub's own share of a small machine's CPU stays small.

For tests: ``drop[file] = n`` makes the next GET of ``file`` that asks for more than ``n`` bytes
send ``n`` of them and close the connection; ``sent`` logs every body sent as (file, first byte,
bytes sent); ``most[file]`` is the most bodies of ``file`` sent at once; ``xet`` makes the
``.safetensors`` files answer as Xet-stored ones (``X-Xet-Hash``), whose read-token route answers
404 (no Xet storage here) and is logged in ``xet_asked``; ``ranges = False`` ignores Range headers
(the whole file, 200); ``chunked = True`` sends the body of a Range request chunked, without a
Content-Length, as some proxies do. Written by hand: it stands for the hub, which is no library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 256 << 10


class HubServer:
    def __init__(self, repos: dict[str, Path], rate: float | None = None, connection_rate: float | None = None,
                 xet: bool = False):
        self.rate, self.connection_rate, self.xet = rate, connection_rate, xet
        self.ranges, self.chunked = True, False
        self.drop: dict[str, int] = {}
        self.sent: list[tuple[str, int, int]] = []
        self.most: dict[str, int] = {}
        self.xet_asked: list[str] = []
        self.lock = threading.Lock()
        self._next = 0.0
        self._sending: dict[str, int] = {}
        self.repos = {}
        self.blobs: dict[str, tuple[str, Path]] = {}      # sha256 -> (repo file name, path)
        for repo, folder in repos.items():
            files = {}
            for p in sorted(folder.rglob("*")):
                if p.is_file() and ".cache" not in p.relative_to(folder).parts:
                    rel = str(p.relative_to(folder))
                    data_sha = _sha256(p) if rel.endswith(".safetensors") else None
                    files[rel] = {"path": p, "size": p.stat().st_size, "blob": _git_blob(p), "sha256": data_sha}
                    if data_sha:
                        self.blobs[data_sha] = (rel, p)
            commit = hashlib.sha1(json.dumps({f: v["blob"] for f, v in files.items()}).encode()).hexdigest()
            self.repos[repo] = {"commit": commit, "files": files}
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=True))
        for s in (self.hub, self.cdn):
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.hub.server_port}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_port}"

    def commit(self, repo: str) -> str:
        return self.repos[repo]["commit"]

    def close(self) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()

    def bytes_sent(self, file: str) -> int:
        with self.lock:
            return sum(n for f, _, n in self.sent if f == file)

    def _pace(self, n: int, conn: list[float]) -> None:
        """Wait for the turn of a piece of ``n`` bytes: on the link (``rate``, all connections
        together) and on its connection (``connection_rate``; ``conn`` holds when that connection may
        send next)."""
        now = time.monotonic()
        start = now
        if self.connection_rate:
            start = max(start, conn[0])
            conn[0] = start + n / self.connection_rate
        if self.rate:
            with self.lock:
                start = max(start, self._next)
                self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)

    def _handler(self, cdn: bool):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                self.turn = [0.0]        # when this connection may send its next piece (connection_rate)

            def handle(self):
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass                 # a client gone (a killed run): nothing to answer, nothing to report

            def do_HEAD(self):
                self._route(body=False)

            def do_GET(self):
                self._route(body=True)

            def _reply(self, code: int, headers: dict[str, str], body: bytes = b"", send: bool = True):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send and body:
                    self.wfile.write(body)

            def _missing(self, code: str, what: str):
                self._reply(404, {"X-Error-Code": code, "X-Error-Message": what, "Content-Type": "application/json"},
                            json.dumps({"error": what}).encode(), self.command == "GET")

            def _route(self, body: bool):
                path = self.path.split("?", 1)[0]
                if cdn:
                    m = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
                    if not m or m.group(1) not in server.blobs:
                        return self._missing("EntryNotFound", "no such blob")
                    name, p = server.blobs[m.group(1)]
                    return self._file(name, p, {"ETag": f'"{m.group(1)}"'}, body)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
                if m:
                    repo = self._repo(m.group(1), m.group(2))
                    if repo is None:
                        return
                    tree = [{"type": "file", "path": f, "size": v["size"], "oid": v["blob"],
                             **({"lfs": {"oid": v["sha256"], "size": v["size"], "pointerSize": 134}}
                                if v["sha256"] else {})} for f, v in repo["files"].items()]
                    return self._reply(200, {"Content-Type": "application/json"}, json.dumps(tree).encode(), body)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/xet-read-token/([^/]+)", path)
                if m:
                    with server.lock:
                        server.xet_asked.append(m.group(1))
                    return self._missing("EntryNotFound", "no Xet storage on this hub")
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m:
                    repo = self._repo(m.group(1), m.group(2) or "main")
                    if repo is None:
                        return
                    info = {"id": m.group(1), "sha": repo["commit"], "siblings": [
                        {"rfilename": f, "size": v["size"], "blobId": v["blob"],
                         **({"lfs": {"size": v["size"], "sha256": v["sha256"], "pointerSize": 134}}
                            if v["sha256"] else {})} for f, v in repo["files"].items()]}
                    return self._reply(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    return self._missing("EntryNotFound", "no such route")
                repo = self._repo(m.group(1), m.group(2))
                if repo is None:
                    return
                f = repo["files"].get(m.group(3))
                common = {"X-Repo-Commit": repo["commit"]}
                if f is None:
                    return self._missing("EntryNotFound", f"no file {m.group(3)}")
                if f["sha256"] and server.xet:
                    token = f"{server.url}/api/models/{m.group(1)}/xet-read-token/{repo['commit']}"
                    common = {**common, "X-Xet-Hash": f["sha256"], "X-Xet-Refresh-Route": token}
                if f["sha256"]:
                    return self._reply(302, {**common, "X-Linked-Etag": f'"{f["sha256"]}"',
                                             "X-Linked-Size": str(f["size"]),
                                             "Location": f"{server.cdn_url}/blobs/{f['sha256']}"})
                return self._file(m.group(3), f["path"], {**common, "ETag": f'"{f["blob"]}"'}, body)

            def _repo(self, name: str, rev: str):
                repo = server.repos.get(name)
                if repo is None:
                    self._missing("RepoNotFound", f"repository {name} not found")
                elif rev not in ("main", repo["commit"]):
                    self._missing("RevisionNotFound", f"revision {rev} not found")
                    repo = None
                return repo

            def _file(self, name: str, p: Path, headers: dict[str, str], body: bool):
                size = p.stat().st_size
                start, end = 0, size - 1
                rng = self.headers.get("Range")
                code = 200
                if rng and server.ranges:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                    start, end = int(m.group(1)), min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                    code = 206
                    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
                n = end - start + 1
                chunked = server.chunked and code == 206 and body
                length = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(n)}
                self.send_response(code)
                for k, v in {**headers, **length, "Accept-Ranges": "bytes"}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not body:
                    return
                with server.lock:      # a request the cut would not shorten (a header read) leaves it armed
                    cut = server.drop.get(name)
                    if cut is not None and cut < n:
                        del server.drop[name]
                    else:
                        cut = None
                limit = n if cut is None else min(cut, n)
                done = 0
                with server.lock:
                    server._sending[name] = server._sending.get(name, 0) + 1
                    server.most[name] = max(server.most.get(name, 0), server._sending[name])
                try:
                    with open(p, "rb") as fh:
                        while done < limit:
                            piece = min(CHUNK, limit - done)
                            server._pace(piece, self.turn)
                            if chunked:
                                self.wfile.write(f"{piece:x}\r\n".encode())
                            sent = self.connection.sendfile(fh, start + done, piece)
                            if chunked:
                                self.wfile.write(b"\r\n")
                            if not sent:
                                break
                            done += sent
                        if chunked and done == n:
                            self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.sent.append((name, start, done))
                        server._sending[name] -= 1
                if cut is not None and done < n:        # the dropped connection
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)

        return Handler


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _git_blob(p: Path) -> str:
    h = hashlib.sha1(f"blob {p.stat().st_size}\0".encode())
    with open(p, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def hub_env(server: HubServer, home: Path) -> dict[str, str]:
    """Environment for a subprocess that talks to ``server`` (and only to it)."""
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10", NO_COLOR="1", COLUMNS="200")
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "FP8VL_DEBUG"):
        env.pop(k, None)
    return env
