"""``fp8vl quantize ORG/NAME OUTPUT``: download through huggingface_hub and convert while downloading.

Order of work: ``model_info`` resolves the revision to a commit and lists the files with their
sizes; the small files (config, index, tokenizer, ...) download while every shard's header is read
with a ranged request (huggingface_hub's ``parse_safetensors_file_metadata``), so the plan and the
output layout exist before any weight byte arrives. The shards the plan reads start downloading
as soon as the headers are read (the plan needs no torch, whose import runs meanwhile), one after
the other, largest first, at most ``in_flight`` of them on disk or downloading at once (fetch.Fetcher:
a process of its own, each shard over several connections), and convert in that order, one source
shard at a time, each tensor at its place in the layout of a local conversion. The writer waits for a
tensor's shard; once every tensor of a shard is written, its output bytes are synced, a line goes
to the journal and, with ``stream``, the shard is deleted, which lets the next download start.

Everything lives in OUTPUT's staging folder (staging.Staging): ``source/`` (the downloads, with
``stream``), ``output/``, ``resume.json`` (repo, commit, options: what makes a later run's staging
its own) and ``journal.jsonl`` (the shards fully written, with their tensors' errors), so a run
that stops is resumed by running the same command again.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..version import __version__
from ..errors import FP8VLError, InternalError
from .fetch import Downloader, Fetcher, Remote, download, hub_endpoint
from ..options import QuantizeOptions
from ..checkpoint.plan import Entry, make_plan
from ..checkpoint.shards import TensorInfo, read_header
from ..checkpoint.source import INDEX, OTHER_WEIGHTS, Checkpoint, open_checkpoint
from .staging import Resumable, Staging, bytes_to_write, copy_files, other_files

if TYPE_CHECKING:
    from .drift import Drift

# The converter (output.py, drift.py, writer.py: torch among them) is imported inside quantize_hub:
# by a conversion once the first shard is downloading, by a dry run on a thread while the hub
# answers. torch's import (1.5-2.5 s) would otherwise be most of the start.
CONVERTER = "fp8vl.conversion.output"

log = logging.getLogger("fp8vl.conversion.hub")
JOURNAL = "journal.jsonl"


def remote_info(repo: str, revision: str | None) -> Remote | None:
    """The repo at ``revision`` (resolved to its commit); None when the hub cannot be reached or
    offline mode is on (the caller then looks in the local cache)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(repo, revision=revision, files_metadata=True)
    except GatedRepoError as e:
        raise FP8VLError(f"{repo}: gated on the Hugging Face Hub; accept its terms on the model page and log "
                         f"in (hf auth login), or set HF_TOKEN") from e
    except RevisionNotFoundError as e:
        raise FP8VLError(f"{repo}: has no revision {revision!r}; pass a branch, tag or commit it has") from e
    except RepositoryNotFoundError as e:
        raise FP8VLError(f"{repo}: no such model on the Hugging Face Hub (or it is private: log in with "
                         f"hf auth login, or set HF_TOKEN)") from e
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code < 500:
            raise FP8VLError(f"{repo}: the hub refused to list it ({e}); check the name and your token") from e
        log.debug(f"hub unavailable: {e}")
        return None
    except Exception as e:            # offline mode, no network, DNS, proxy: use the local cache
        log.debug(f"hub unreachable: {type(e).__name__}: {e}")
        return None
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) or 0 for s in info.siblings or []}
    return Remote(repo, info.sha, sizes)


def in_cache(remote: Remote, files: list[str]) -> bool:
    """Every one of ``files`` is in the local hub cache at this commit."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(remote.repo, f, revision=remote.commit), str) for f in files)


def start_headers(remote: Remote, pool: ThreadPoolExecutor) -> dict[str, Future]:
    """Start reading the header of every top-level shard of the repo (one ranged request each, two at
    most) on ``pool``: they need only the file list, so they run while the small files (the index
    among them) download. Which shards the plan needs is known once the index is on disk; a failed
    read of one it does not need (a stray file beside the shards) is never looked at."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint())
    return {f: pool.submit(_header, api, remote, f) for f in remote.shards() if "/" not in f}


def _header(api, remote: Remote, name: str) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(tensor, dtype, shape, offset from the start of the data section, bytes), in file order."""
    try:
        meta = api.parse_safetensors_file_metadata(remote.repo, name, revision=remote.commit)
    except Exception as e:
        raise Resumable(f"{remote.repo}: cannot read the header of {name} ({type(e).__name__}: {e}); "
                        f"check the connection and run again") from e
    return [(t, info.dtype, tuple(info.shape), info.data_offsets[0], info.data_offsets[1] - info.data_offsets[0])
            for t, info in sorted(meta.tensors.items(), key=lambda kv: kv[1].data_offsets[0])]


def remote_headers(remote: Remote, shards: list[str], src: Path, started: dict[str, Future],
                   pool: ThreadPoolExecutor) -> dict[str, dict[str, TensorInfo]]:
    """Each shard's tensors from its header alone (``started`` by start_headers; a shard it did not
    start, in a subfolder, is read now). ``file`` is where the shard will be; ``offset`` counts from
    the start of the data section (the header's length is not known yet): the writer reads the
    downloaded file's own header."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint())
    todo = {f: started[f] if f in started else pool.submit(_header, api, remote, f) for f in shards}
    return {f: {t: TensorInfo(t, dtype, shape, src / f, b, n) for t, dtype, shape, b, n in fut.result()}
            for f, fut in todo.items()}


def early_order(ckpt: Checkpoint, src: Path, opts: QuantizeOptions, done: set[str],
                sizes: dict[str, int]) -> list[str]:
    """The shards to download, in the writer's order, as far as the headers alone tell (the plan
    needs no torch): those holding a tensor of the plan that no earlier run finished (``done``),
    largest first. The full plan may add a shard an earlier run finished whose output part did not
    survive, never drop one of these."""
    plan = make_plan(ckpt.config, {n: t.shape for n, t in ckpt.tensors.items()}, opts)
    return largest_first([f for f in shards_read(ckpt, src, plan.entries) if f not in done], sizes)


def shards_read(ckpt: Checkpoint, src: Path, entries: list[Entry]) -> list[str]:
    """The source shards (paths relative to ``src``) that ``entries`` read, in their first use's order."""
    return list(dict.fromkeys(str(ckpt.tensors[e.source].file.relative_to(src)) for e in entries))


def largest_first(files: list[str], sizes: dict[str, int]) -> list[str]:
    """The order in which shards download and convert: largest first, ties in ``files``' order.
    Each shard converts while the next one downloads, so what does not overlap the download is the
    conversion of the last one: the smallest."""
    return sorted(files, key=lambda f: -sizes.get(f, 0))


class Journal:
    """The source shards an earlier run fully wrote: one JSON line per shard (the output slots it
    filled, the errors of its FP8 tensors), appended and synced; a torn last line is ignored."""

    def __init__(self, path: Path):
        self.path = path
        self.slots: set[str] = set()
        self.shards: set[str] = set()
        self.errors: dict[str, dict] = {}
        self._lock = threading.Lock()
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    d = json.loads(line)
                    shard, slots, errors = str(d["shard"]), set(d["slots"]), dict(d["errors"])
                except (ValueError, KeyError, TypeError):
                    continue
                self.shards.add(shard)
                self.slots |= slots
                self.errors.update(errors)

    def add(self, shard: str, slots: list[str], errors: dict[str, dict]) -> None:
        line = json.dumps({"shard": shard, "slots": slots, "errors": errors}) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class HubFeed:
    """The writer's source (convert.Feed) during a download: waits for shards, reads their real
    headers, and when the last entry of a shard is written, syncs, journals and releases it."""

    def __init__(self, ckpt, entries: list[Entry], slots: dict[str, list[str]], fetcher: Fetcher,
                 journal: Journal, drift: Drift):
        self.ckpt, self.fetcher, self.journal, self.drift, self.slots = ckpt, fetcher, journal, drift, slots
        self.local: dict[str, dict[str, TensorInfo]] = {}
        self.entries: dict[str, list[Entry]] = {}      # shard -> the entries still to write from it
        for e in entries:
            self.entries.setdefault(self.shard(e.source), []).append(e)
        self.left = {f: len(es) for f, es in self.entries.items()}
        self.outputs: dict[str, set[Path]] = {}
        self.lock = threading.Lock()

    def shard(self, tensor: str) -> str:
        return str(self.ckpt.tensors[tensor].file.relative_to(self.ckpt.path))

    def tensor(self, name: str) -> TensorInfo:
        shard = self.shard(name)
        if shard not in self.local:
            path = self.fetcher.wait(shard)
            infos, _ = read_header(path)
            file = self.ckpt.tensors[name].file
            planned = {n: (t.dtype, t.shape, t.nbytes) for n, t in self.ckpt.tensors.items() if t.file == file}
            if {n: (t.dtype, t.shape, t.nbytes) for n, t in infos.items()} != planned:
                raise FP8VLError(f"{path}: its tensors differ from the header the hub sent before the download; "
                                 f"delete {path} and run again")
            self.local[shard] = infos
        return self.local[shard][name]

    def entry_done(self, e: Entry, out: Path) -> None:
        shard = self.shard(e.source)
        with self.lock:
            self.outputs.setdefault(shard, set()).add(out)
            self.left[shard] -= 1
            if self.left[shard]:
                return
            outputs = self.outputs.pop(shard)
        for p in outputs:      # the bytes reach the disk before the journal says they are there
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        done = self.entries[shard]
        self.journal.add(shard, [s for e in done for s in self.slots[e.name]],
                         {e.name: self.drift.finish(e.name) for e in done if e.quantize})
        self.fetcher.release(shard)


def quantize_hub(repo: str, output: str | Path | None, opts: QuantizeOptions,
                 progress: Callable[[int, int], None] | None = None,
                 on_plan: Callable | None = None):
    """``quantize`` for a hub id; None when the hub is unreachable (the caller falls back to the cache)."""
    t0 = time.perf_counter()
    # The download process starts now: its start overlaps the requests to the hub.
    with Downloader() if output is not None and not opts.dry_run else nullcontext() as downloader:
        return _quantize_hub(repo, output, opts, progress, on_plan, t0, downloader)


def _quantize_hub(repo: str, output: str | Path | None, opts: QuantizeOptions, progress, on_plan, t0: float,
                  downloader: Downloader | None):
    remote = remote_info(repo, opts.revision)
    if remote is None:
        return None
    out = Path(output).expanduser().resolve() if output is not None else None
    index = INDEX in remote.sizes
    small = remote.small_files()
    if "config.json" not in remote.sizes:
        raise FP8VLError(f"{repo}: no config.json at commit {remote.commit[:12]}; SOURCE must be a Hugging Face "
                         f"model repo")
    if opts.dry_run or out is None:       # small files into the cache, headers by ranged requests
        threading.Thread(target=importlib.import_module, args=(CONVERTER,), daemon=True).start()
        with ThreadPoolExecutor(8) as heads, ThreadPoolExecutor(8) as pool:
            started = start_headers(remote, heads)
            paths = list(pool.map(lambda f: download(remote, f, None), small))
            ckpt = _open(remote, _snapshot(paths, small), index, started, heads)
        from .output import plan_conversion   # waits for the import started above, if still running
        res = plan_conversion(ckpt, None, opts)[0]
        res.hub, res.commit = repo, remote.commit
        if on_plan is not None:
            on_plan(res)
        return res

    stream = opts.stream if opts.stream is not None else not in_cache(remote, remote.shards() + small)
    key = {"source": repo, "commit": remote.commit, "fp8vl": __version__,
           "options": {"format": opts.format, "scale_dtype": opts.scale_dtype, "ignore": list(opts.ignore),
                       "quantize_vision": opts.quantize_vision, "max_shard_size": opts.max_shard_size}}
    staging = Staging.folder_for(out)
    with Staging(staging / "source", out, opts.overwrite, resume=key) as stage:
        dest = stage.folder("source") if stream else None
        if dest is not None:   # downloads a killed run left half-done: never resumed by huggingface_hub
            for p in (dest / ".cache").rglob("*.incomplete"):
                p.unlink(missing_ok=True)
        with ThreadPoolExecutor(8) as heads, ThreadPoolExecutor(8) as pool:
            started = start_headers(remote, heads)
            paths = list(pool.map(lambda f: download(remote, f, dest), small))
            src = dest if dest is not None else _snapshot(paths, small)
            ckpt = _open(remote, src, index, started, heads)
        # The shards to download are known from the headers alone: the first ``in_flight`` start now
        # (the rest as the converter frees their places), after a free-space check for those alone.
        journal = Journal(stage.dir / JOURNAL)
        early = early_order(ckpt, src, opts, journal.shards, remote.sizes)
        stage.begin(sum(remote.sizes[f] for f in early[:opts.in_flight]) if stream else 0)
        fetcher = Fetcher(remote, dest, early, opts.in_flight, stream, downloader).start()
        try:
            # Only now (1.5-2.5 s, while the first shard downloads): earlier, beside the requests
            # above, it held them up (the interpreter lock).
            import torch

            from .drift import Drift
            from .output import plan_conversion, write_output
            from .writer import assign_shards, kept_slots

            res, units, scale_dtype = plan_conversion(ckpt, out, opts)
            res.hub, res.commit = repo, remote.commit
            if on_plan is not None:
                on_plan(res)
            if opts.device.startswith("cuda") and not torch.cuda.is_available():   # as write_output
                raise FP8VLError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")

            # What an earlier run of this command already wrote, and so which shards are still needed.
            shards = assign_shards(units, opts.max_shard_size)
            kept = kept_slots(stage.dir / "output", shards, journal.slots) if stage.resumed else set()
            entries = res.plan.entries
            slots = {e.name: [s.name for s in u] for e, u in zip(entries, units)}
            todo = [e for e in entries if e.name not in kept]
            files = largest_first(shards_read(ckpt, src, todo), remote.sizes)
            if set(early) - set(files):
                raise InternalError(f"{sorted(set(early) - set(files))}: downloading, but the plan reads "
                                    f"nothing from them")
            files = fetcher.plan(files)        # ``early`` stays at the head, in its order
            for f in set(remote.shards()) - set(files):       # consumed by the earlier run, or unused
                if dest is not None:
                    (dest / f).unlink(missing_ok=True)
            copied, res.skipped = other_files(src, ckpt.weight_files)
            res.skipped += [f for f in remote.shards() if src / f not in ckpt.weight_files]
            res.skipped = list(dict.fromkeys(res.skipped + [f for f in remote.sizes if f.endswith(OTHER_WEIGHTS)]))
            need = bytes_to_write(src, copied, res.bytes_out, len(units) + 1)
            if stream:
                need += sum(sorted((remote.sizes[f] for f in files), reverse=True)[:opts.in_flight])
            tmp = stage.begin(need)

            drift = Drift({n: err for n, err in journal.errors.items() if n in kept})
            feed = HubFeed(ckpt, todo, slots, fetcher, journal, drift)
            copy_files(src, tmp, copied)       # while the first shard downloads
            res.copied = copied
            # tensors in download order, each at its place in the local conversion's layout
            rank = {f: i for i, f in enumerate(files)}
            order = [s.name for e, u in sorted(zip(entries, units),
                                               key=lambda eu: rank.get(feed.shard(eu[0].source), len(files)))
                     for s in u]
            write_output(tmp, ckpt, res, units, scale_dtype, opts, progress, t0, feed, kept, drift, order)
        finally:
            fetcher.close()
        res.downloaded = fetcher.downloaded
        stage.commit()
    res.seconds = time.perf_counter() - t0
    return res


def _snapshot(paths: list[Path], names: list[str]) -> Path:
    """The hub cache's snapshot folder of the commit: where hf_hub_download put ``names`` (config.json
    among them) as ``paths``."""
    p = paths[names.index("config.json")]
    return p.parent


def _open(remote: Remote, src: Path, index: bool, started: dict[str, Future], pool: ThreadPoolExecutor):
    """The checkpoint as the plan sees it: config and index from disk, shard headers from the hub."""
    if index:
        wmap = json.loads((src / INDEX).read_text()).get("weight_map") or {}
        names = [f for f in dict.fromkeys(wmap.values()) if isinstance(f, str) and f in remote.sizes]
    else:
        names = [f for f in remote.shards() if "/" not in f]
    if not names:
        raise FP8VLError(f"{remote.repo}: no .safetensors weights at commit {remote.commit[:12]}")
    return open_checkpoint(src, headers=remote_headers(remote, sorted(set(names), key=names.index), src,
                                                       started, pool))
