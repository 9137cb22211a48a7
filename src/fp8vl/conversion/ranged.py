"""One shard over several HTTP connections at once, in Range parts, with huggingface_hub's client.

Why by hand: huggingface_hub (2.5) downloads a plain-HTTP file over one connection
(``file_download.http_get``); its only parallel download of one file is Xet's (``hf_xet``, for files
the hub keeps in Xet storage), and ``hf_transfer`` is gone. Hubs and CDNs throttle each connection,
so one connection caps a shard at that rate (60 MB/s a connection: 4.1x ``snapshot_download``'s
time, which has 8 files going at once). Across files alone fp8vl could use at most ``--in-flight``
(2) connections; parts of one file use all of them while the disk holds no more shards.

What is huggingface_hub's and is used as is: the file's metadata (``get_hf_file_metadata``: the HEAD
on the hub, its redirect to the CDN, etag, size, Xet data), the headers (``build_hf_headers``: token,
user agent), the client and its retries on opening a request (``http_stream_backoff`` over
``get_session``), the local folder's download metadata and the cache's pointer (``hf_hub_download``
links a blob that is already there). Xet files are left to ``hf_hub_download``, whose Xet path
parallelizes by itself.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

log = logging.getLogger("fp8vl.conversion.ranged")

CONNECTIONS = 8          # as snapshot_download's max_workers and hf download's default
PART_MIN, PART_MAX = 8 << 20, 256 << 20
RETRIES = 5              # a part's tries without a byte of progress (huggingface_hub's http_get: 5)


class NoRanges(Exception):
    """The server sent the whole file for a Range request: one connection it is."""


def part_size(size: int, connections: int) -> int:
    """Two parts a connection, so that the last parts of a file end close together (a slow
    connection's last part is a short wait), of 8 to 256 MiB: each part opens a connection of its
    own (its body is read off the socket, so the connection is not reused), whose start (TCP, TLS,
    slow start) a larger part pays less often."""
    parts = min(-(-size // PART_MIN), max(2 * connections, -(-size // PART_MAX)))
    return -(-size // max(parts, 1))


def download_parts(repo: str, commit: str, name: str, dest: Path | None, endpoint: str | None,
                   connections: int = CONNECTIONS, part: int | None = None) -> Path | None:
    """``name`` at ``commit`` in Range parts over ``connections`` connections, into ``dest`` (a local
    folder, as ``hf_hub_download(local_dir=dest)`` lays it out) or the hub cache, in parts of
    ``part`` bytes (default: part_size). None when this is not the way: a Xet file, a file of one
    part, a server that ignores Range, a huggingface_hub without an httpx client (before 1.0), no
    ``os.pwrite``; the caller then uses ``hf_hub_download``."""
    http = _client()
    if http is None:
        return None
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    if dest is not None:
        from huggingface_hub._local_folder import (get_local_download_paths, read_download_metadata,
                                                   write_download_metadata)
        paths = get_local_download_paths(dest, name)
        meta = read_download_metadata(dest, name)
        if paths.file_path.is_file() and meta is not None and meta.commit_hash == commit:
            return paths.file_path             # as hf_hub_download: there at this commit
    else:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(repo, name, revision=commit)
        if isinstance(cached, str):
            return Path(cached)

    url = hf_hub_url(repo, name, revision=commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    if meta.xet_file_data is not None or meta.etag is None or not meta.size:
        return None
    part = part or part_size(meta.size, connections)
    if meta.size <= part:
        return None
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)     # a CDN's signed URL: the token stays with the hub (as http_get)
    headers["Accept-Encoding"] = "identity"    # a compressed answer would ignore the Range (http_get's note)

    if dest is not None:
        tmp = paths.incomplete_path(meta.etag)
        final = paths.file_path
    else:
        from huggingface_hub.file_download import repo_folder_name
        final = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs" / meta.etag
        tmp = final.with_name(f"{meta.etag}.incomplete")
    # Unique to this download, as huggingface_hub names its own (its stale-file cleanup and fp8vl's match it).
    tmp = tmp.with_name(f"{tmp.stem}.{uuid.uuid4().hex[:8]}.incomplete")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetch(http, meta.location, headers, tmp, meta.size, connections, part,
              constants.HF_HUB_DOWNLOAD_TIMEOUT)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    except NoRanges:
        log.debug(f"{name}: the server ignores Range; one connection")
        return None
    finally:
        tmp.unlink(missing_ok=True)
    if dest is not None:
        write_download_metadata(dest, name, commit, meta.etag)
        return final
    from huggingface_hub import hf_hub_download
    return Path(hf_hub_download(repo, name, revision=commit, endpoint=endpoint))   # links the blob now there


def fetch(http, url: str, headers: dict[str, str], path: Path, size: int, connections: int, part: int,
          timeout: float) -> None:
    """Bytes [0, size) of ``url`` into ``path``: parts of ``part`` bytes, ``connections`` at a time,
    each written at its offset. A connection that drops (or stalls past ``timeout``) is asked again
    for what its part still lacks, up to RETRIES times without progress; any other failure stops the
    other parts and is raised."""
    parts = [(s, min(s + part, size)) for s in range(0, size, part)]
    lock = threading.Lock()
    failed: list[BaseException] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, size)      # sparse: the disk holds what has arrived

        def worker():
            while True:
                with lock:
                    if failed or not parts:
                        return
                    start, end = parts.pop(0)
                try:
                    _part(http, url, headers, fd, start, end, timeout, failed)
                except BaseException as e:      # noqa: BLE001 (raised by the caller's thread)
                    with lock:
                        failed.append(e)
                    return
        threads = [threading.Thread(target=worker, name=f"fp8vl-part-{i}", daemon=True)
                   for i in range(min(connections, len(parts)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise failed[0]
    finally:
        os.close(fd)


def _part(http, url: str, headers: dict[str, str], fd: int, start: int, end: int, timeout: float,
          failed: list) -> None:
    """Bytes [start, end) of ``url`` at their offset in ``fd``; a dropped connection continues from
    the byte reached."""
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    at, tries = start, RETRIES
    while at < end and not failed:
        try:
            with http_stream_backoff("GET", url, headers={**headers, "Range": f"bytes={at}-{end - 1}"},
                                     timeout=timeout, retry_on_exceptions=(),
                                     retry_on_status_codes=(408, 429)) as r:
                hf_raise_for_status(r)
                if r.status_code != 206:
                    raise NoRanges(url)
                if r.headers.get("Content-Range", "").split(" ")[-1].split("/")[0] != f"{at}-{end - 1}":
                    raise OSError(f"asked for bytes {at}-{end - 1}, the server sent "
                                  f"{r.headers.get('Content-Range')!r}")
                for n in _body(http, r, fd, at, end, timeout, failed):
                    at += n
                    tries = RETRIES
            if at < end and not failed:
                raise http.RemoteProtocolError(f"the body ended at byte {at} of {start}-{end - 1}")
        except (http.TimeoutException, http.NetworkError, http.RemoteProtocolError) as e:
            if tries == 0 or failed:
                raise
            tries -= 1
            log.warning(f"bytes {at}-{end - 1} of {url}: {type(e).__name__}: {e}; asking again from byte {at}")
            time.sleep(1)


def _body(http, r, fd: int, at: int, end: int, timeout: float, failed: list) -> Iterator[int]:
    """The body of ``r``, bytes [at, end) of the file, written into ``fd``; yields the bytes written,
    piece by piece. The client's first piece (what it read with the headers), then the rest straight
    from the connection's socket into one 1 MiB buffer: iterating the client (httpx, h11) costs
    about 4x the CPU (three copies and a few Python calls per 64 KiB: 7.3 against 1.9 core-seconds
    for 1.54 GB on 2 cores, a third of the conversion's own), which on a small machine comes out of
    the conversion. The connection is then closed, not reused (the client did not see the body)."""
    sock = _socket(r, end - at)
    raw = r.iter_raw()
    try:
        for chunk in raw:
            _write(fd, chunk, at, end)
            at += len(chunk)
            yield len(chunk)
            if sock is not None or failed:
                break
        else:
            return
        if failed:
            return
        buf = memoryview(bytearray(1 << 20))
        sock.settimeout(timeout)
        while at < end and not failed:
            try:
                n = sock.recv_into(buf, min(len(buf), end - at))
            except OSError as e:          # socket.timeout among them
                raise (http.ReadTimeout if isinstance(e, TimeoutError) else http.ReadError)(str(e)) from e
            if not n:
                raise http.RemoteProtocolError(f"the server closed the connection at byte {at} of {end}")
            _write(fd, buf[:n], at, end)
            at += n
            yield n
    finally:
        raw.close()


def _socket(r, length: int):
    """The socket ``r``'s body comes on, if reading it there is safe: a plain HTTP/1.1 body of
    ``length`` bytes (no chunked framing, no compression), on a socket that is the connection itself
    (TLS on it included; not TLS inside a proxy's TLS). None otherwise: the client reads it."""
    if r.http_version != "HTTP/1.1" or r.headers.get("Content-Encoding", "identity") != "identity" or \
            "Transfer-Encoding" in r.headers or r.headers.get("Content-Length") != str(length):
        return None
    stream = r.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if not isinstance(sock, socket.socket) or getattr(sock, "_sslobj", None) is not stream.get_extra_info("ssl_object"):
        return None
    return sock


def _write(fd: int, data, at: int, end: int) -> None:
    if at + len(data) > end:
        raise OSError(f"the server sent more than bytes up to {end - 1}")
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _client():
    """The httpx module huggingface_hub's client is made of (httpx2 for 2.x, httpx for 1.x); None for
    a huggingface_hub on requests (before 1.0), or where there is no ``os.pwrite`` (Windows)."""
    from huggingface_hub.utils import get_session

    if not hasattr(os, "pwrite"):
        return None
    session = get_session()
    for name in ("httpx2", "httpx"):
        try:
            http = importlib.import_module(name)
        except ImportError:
            continue
        if isinstance(session, http.Client):
            return http
    return None
