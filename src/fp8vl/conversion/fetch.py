"""Shard downloads for ``fp8vl quantize ORG/NAME``: one at a time, in the writer's order, at most
``in_flight`` on disk, in a child process of their own; each over several connections in Range
parts (ranged.py), or huggingface_hub's Xet path, which parallelizes by itself.

Why a process: huggingface_hub's HTTP client is Python, and in fp8vl's process it would share the
interpreter lock with torch's import (1.5-2.5 s, while the first shard downloads) and with the
converter's threads. On 16 cores and a 150 MB/s link the first 1.24 GB shard came at 132 MB/s beside
the import in the same process, 151 MB/s after it (benchmarks/hub.py, BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..checkpoint.source import OTHER_WEIGHTS, SKIP_DIRS
from .ranged import CONNECTIONS, download_parts
from .staging import Resumable

log = logging.getLogger("fp8vl.conversion.fetch")


@dataclass(frozen=True)
class Remote:
    repo: str
    commit: str
    sizes: dict[str, int]        # every file of the repo at that commit -> bytes

    def shards(self) -> list[str]:
        return [f for f in self.sizes if f.endswith(".safetensors")]

    def small_files(self) -> list[str]:
        """Everything but weights: what a local conversion copies or reads (config, index, tokenizer...)."""
        return [f for f in self.sizes if not f.endswith(".safetensors") and not f.endswith(OTHER_WEIGHTS)
                and not set(f.split("/")[:-1]) & SKIP_DIRS]


def hub_endpoint() -> str | None:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is imported.
    return os.environ.get("HF_ENDPOINT") or None


def download(remote: Remote, name: str, dest: Path | None) -> Path:
    """One file at the resolved commit: into ``dest`` (a local dir: the staging folder), or into the
    hub cache. huggingface_hub resumes a broken connection with a Range request and skips a file it
    already has at this commit."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(remote.repo, name, revision=remote.commit, endpoint=hub_endpoint(),
                                local_dir=dest, tqdm_class=_quiet()))


def download_shard(remote: Remote, name: str, dest: Path | None, connections: int = CONNECTIONS,
                   part: int | None = None) -> Path:
    """A shard: in Range parts over ``connections`` connections (ranged.py), else as ``download``
    (a Xet file: huggingface_hub's Xet path; a small file; a server that ignores Range)."""
    path = download_parts(remote.repo, remote.commit, name, dest, hub_endpoint(), connections, part) \
        if connections > 1 else None
    return path if path is not None else download(remote, name, dest)


@cache
def _quiet():
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):
        """No per-file bars: fp8vl shows one progress line for the whole run."""

        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
    return Quiet


class DownloadFailed(Exception):
    """A download in the child process failed: the message names the error there."""


def serve(parent: int) -> None:
    """The download process (see Downloader): one JSON request per line on stdin (repo, commit,
    file, folder, connections, part size), one JSON answer per line on the stdout it was started
    with; anything else written to stdout goes to stderr. Ends at the end of stdin, or when the
    parent is gone (SIGKILL: nothing else would stop a download in progress)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's; it ends this process
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def orphaned():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=orphaned, daemon=True).start()
    _quiet()     # imports huggingface_hub before the first request: that overlaps the parent's start

    for line in sys.stdin:
        r = json.loads(line)
        try:
            dest = Path(r["dest"]) if r["dest"] is not None else None
            answer = {"path": str(download_shard(Remote(r["repo"], r["commit"], {}), r["name"], dest,
                                                 r["connections"], r["part"]))}
        except Exception as e:            # noqa: BLE001 (reported by the parent, naming the file)
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


# The download process's program: this fp8vl (its folder put on the path if a fresh interpreter
# would not find it there, as when the caller extended sys.path), serving the parent given.
CHILD = ("import sys; root = sys.argv[1]; root in sys.path or sys.path.insert(0, root); "
         "from fp8vl.conversion.fetch import serve; serve(int(sys.argv[2]))")


class Downloader:
    """``download_shard`` in a child process, started now so that its start overlaps the parent's
    requests to the hub; one call at a time, ``connections`` connections (1: huggingface_hub's own
    download), parts of ``part`` bytes (default: ranged.part_size). A plain subprocess, not
    multiprocessing: a spawned child would import the caller's main script again."""

    def __init__(self, connections: int = CONNECTIONS, part: int | None = None):
        self.connections, self.part = connections, part
        root = str(Path(__file__).resolve().parents[2])
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, root, str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lock = threading.Lock()

    def __call__(self, remote: Remote, name: str, dest: Path | None) -> Path:
        request = {"repo": remote.repo, "commit": remote.commit, "name": name,
                   "dest": str(dest) if dest is not None else None, "connections": self.connections,
                   "part": self.part}
        with self.lock:
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except OSError:
                line = ""
        if not line:
            raise DownloadFailed(f"the download process ended (exit code {self.proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise DownloadFailed(answer["error"])
        return Path(answer["path"])

    def __enter__(self) -> "Downloader":
        return self

    def __exit__(self, *exc) -> None:
        """End the child, and a download in progress with it."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class Fetcher:
    """Downloads shard names in the order the writer reads them (largest_first), one shard at a time,
    at most ``in_flight`` on disk or downloading.

    ``order`` may start as its head alone (the shards known before torch is imported, so that their
    downloads overlap the import); ``plan(files)`` gives the rest once the plan is made. One shard at
    a time, over several connections (ranged.py): two shards side by side would each take twice as
    long, so the first one the writer needs would arrive later; in order, the writer converts a shard
    while the next one downloads. A slot is freed when ``release(name)`` deletes a consumed shard
    (``stream``) or, keeping the source, as soon as a download completes. The downloads run in a
    Downloader (a child process); closing that ends a download in progress (each writes to a
    temporary name, so nothing half-done looks complete).
    """

    def __init__(self, remote: Remote, dest: Path | None, order: list[str], in_flight: int, stream: bool,
                 downloader: Downloader):
        self.remote, self.dest, self.order, self.in_flight, self.stream = remote, dest, list(order), in_flight, stream
        self.downloader = downloader
        self.cond = threading.Condition()
        self.ready: dict[str, Path] = {}
        self.failed: tuple[str, BaseException] | None = None
        self.busy = 0
        self.planned = False
        self.closed = False
        self.downloaded = 0

    def start(self) -> "Fetcher":
        threading.Thread(target=self._schedule, name="fp8vl-fetch", daemon=True).start()
        return self

    def plan(self, files: list[str]) -> list[str]:
        """The whole order: the shards already given keep their place at its head, ``files`` follow.
        Returns it: the order the writer must read them in."""
        with self.cond:
            self.order += [f for f in files if f not in self.order]
            self.planned = True
            self.cond.notify_all()
            return list(self.order)

    def _schedule(self) -> None:
        i = 0
        while True:
            with self.cond:
                while not self.closed and not self.failed and \
                        (self.busy >= self.in_flight or (i == len(self.order) and not self.planned)):
                    self.cond.wait()
                if self.closed or self.failed or i == len(self.order):
                    return
                name = self.order[i]
                i += 1
                self.busy += 1
            self._fetch(name)

    def _fetch(self, name: str) -> None:
        had = self.dest is not None and (self.dest / name).is_file()
        try:
            path = self.downloader(self.remote, name, self.dest)
        except BaseException as e:         # noqa: BLE001 (reported on the main thread by wait())
            with self.cond:
                self.failed = self.failed or (name, e)
                self.cond.notify_all()
            return
        log.debug(f"downloaded {name}")
        with self.cond:
            self.ready[name] = path
            self.downloaded += 0 if had else self.remote.sizes.get(name, 0)
            if not self.stream:
                self.busy -= 1
            self.cond.notify_all()

    def wait(self, name: str) -> Path:
        """``name`` once it is on disk; a failed download becomes a Resumable error."""
        with self.cond:
            while name not in self.ready:
                if self.failed:
                    which, e = self.failed
                    why = str(e) if isinstance(e, DownloadFailed) else f"{type(e).__name__}: {e}"
                    raise Resumable(f"downloading {which} from {self.remote.repo} failed ({why}); run the "
                                    f"same command again: complete downloads and finished output parts "
                                    f"are kept") from e
                self.cond.wait(0.5)
            return self.ready[name]

    def release(self, name: str) -> None:
        """Every tensor of ``name`` is written: delete it (``stream``) and free its slot."""
        if not self.stream:
            return
        with self.cond:
            path = self.ready.pop(name)
        path.unlink(missing_ok=True)
        log.debug(f"deleted {name}")
        with self.cond:
            self.busy -= 1
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
