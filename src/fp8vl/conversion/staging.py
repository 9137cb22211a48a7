"""OUTPUT's folder: the checks before anything is written, the staging folder beside OUTPUT (one
writer at a time through a lock file, free space checked up front, kept for a resume or removed,
renamed into place at the end), and the non-weight files copied byte for byte.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import FP8VLError
from ..checkpoint.source import OTHER_WEIGHTS, SKIP_DIRS

log = logging.getLogger("fp8vl")


def check_paths(source: Path | None, output: Path, overwrite: bool) -> None:
    """OUTPUT outside SOURCE (None: a hub id, not on disk yet); absent or empty, or (with ``overwrite``)
    a checkpoint folder."""
    if source is not None and (output == source or source in output.parents):
        raise FP8VLError(f"{output}: OUTPUT must not be SOURCE or inside it; choose a folder outside {source}")
    if source is not None and output in source.parents:
        raise FP8VLError(f"{output}: OUTPUT contains SOURCE; choose another folder")
    if not output.exists():
        return
    if not output.is_dir():
        raise FP8VLError(f"{output}: is a file, not a folder (--overwrite replaces only checkpoint folders); "
                         f"move it away or choose another OUTPUT")
    entries = sorted(p.name for p in output.iterdir())
    if entries and not overwrite:
        raise FP8VLError(f"{output}: exists and is not empty; pass --overwrite to replace it")
    if entries and not ("config.json" in entries or any(e.endswith(".safetensors") for e in entries)):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FP8VLError(f"{output}: --overwrite replaces only a checkpoint folder (with config.json or "
                         f".safetensors files), and this one holds {shown}; choose another OUTPUT")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Resumable(FP8VLError):
    """A failure that running the same command again gets past (a download that broke off): a
    resumable Staging keeps its folder for it, as for Ctrl-C, SIGTERM or a full disk."""


def disk_usage(*roots: Path) -> int:
    """Bytes on disk under ``roots``: allocated blocks (the output shards are sparse until written),
    each file counted once by inode (a file renamed or linked between two of the roots), files that
    vanish during the walk skipped."""
    seen: dict[int, int] = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:
                    continue
                seen[st.st_ino] = st.st_blocks * 512
    return sum(seen.values())


class Staging:
    """One writer per OUTPUT, and nothing half-written that looks complete.

    ``with Staging(source, out, overwrite) as st`` takes the lock ``.NAME.fp8vl-lock`` beside OUTPUT
    (an flock: the kernel releases it when the process ends, SIGKILL included; a second run is
    refused), checks OUTPUT under the lock, and removes a staging folder left by a run that no
    longer holds the lock (saying so). ``st.begin(need)`` checks the free space and returns the
    folder to write into, ``.NAME.fp8vl-partial/output``; ``st.commit()`` renames it to OUTPUT.
    Leaving the block removes the staging folder (after commit it holds only the replaced OUTPUT)
    and the lock file; a full disk becomes one FP8VLError line.

    The staging folder is named after OUTPUT, not after a process, and records its owner in
    ``owner.json``: whoever holds the lock owns it, so a later run can tell a dead run's folder
    from a live one's.

    Resumable runs (a hub download) pass ``resume``, a JSON-able dict naming what the run makes
    (source repo, resolved commit, output-shaping options, fp8vl version). It is written to
    ``resume.json`` in the staging folder; a later run whose ``resume`` is equal keeps the folder
    (``st.resumed``) instead of removing it, and a run that ends without committing, for any reason
    but bad input (an FP8VLError that is not ``Resumable``), leaves it for the next run.
    """

    def __init__(self, source: Path, out: Path, overwrite: bool, resume: dict | None = None):
        self.source, self.out, self.overwrite = source, out, overwrite
        self.dir = self.folder_for(out)
        self.lock_file = out.parent / f".{out.name}.fp8vl-lock"
        self.lock = FileLock(self.lock_file, timeout=0)
        self.resume = json.loads(json.dumps(resume)) if resume is not None else None   # as read back
        self.resumed = False
        self._owned = False
        self._committed = False

    @staticmethod
    def folder_for(out: Path) -> Path:
        return out.parent / f".{out.name}.fp8vl-partial"

    def __enter__(self) -> "Staging":
        made_parent = not self.out.parent.exists()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            held = self.lock_file.exists()
            if not held:                  # we locked a file the previous owner had just unlinked
                self.lock.release()
        except Timeout:                   # (an OSError too: caught first)
            held = False
        except OSError as e:
            raise FP8VLError(f"{self.out.parent}: cannot write there ({e.strerror}); choose another OUTPUT") from e
        if not held:
            if made_parent:
                try:
                    self.out.parent.rmdir()
                except OSError:
                    pass
            raise FP8VLError(f"{self.out}: another fp8vl run is writing it (it holds {self.lock_file}); "
                             f"wait for it to finish or choose another OUTPUT")
        try:
            check_paths(self.source, self.out, self.overwrite)   # again, now that no other run can change it
            self._remove_stale()
        except BaseException:
            self._release()
            raise
        return self

    def _remove_stale(self) -> None:
        """We hold the lock, so a staging folder here belongs to a run that ended without cleaning up
        (killed, or the machine went down); earlier versions named theirs after their PID. A resumable
        run keeps one whose manifest is its own."""
        if self.dir.exists() or self.dir.is_symlink():
            try:
                o = json.loads((self.dir / "owner.json").read_text())
                owner = f"pid {o['pid']} on {o['host']}, started {o['started']}"
            except (OSError, ValueError, KeyError, TypeError):
                owner = "owner unknown"
            try:
                manifest = json.loads((self.dir / "resume.json").read_text())
            except (OSError, ValueError):
                manifest = None
            if self.resume is not None and manifest == self.resume and self.dir.is_dir() and \
                    not self.dir.is_symlink():
                self.resumed = True
                log.warning(f"resuming from {self.dir} ({_size(disk_usage(self.dir))} kept): left by an fp8vl run of "
                            f"the same source, commit and options that did not finish ({owner})")
            else:
                why = " (another source, commit or options)" if manifest is not None else ""
                _remove(self.dir)
                log.warning(f"removed {self.dir}: left by an fp8vl run that did not finish ({owner}){why}")
        for p in self.out.parent.glob(f".{glob.escape(self.out.name)}.fp8vl-*-*"):
            m = re.fullmatch(r"\.(.+)\.fp8vl-(?:partial|old)-(\d+)", p.name)
            if m and m.group(1) == self.out.name and not _alive(int(m.group(2))):
                _remove(p)
                log.warning(f"removed {p}: left by an fp8vl run that did not finish (pid {m.group(2)})")

    def folder(self, name: str) -> Path:
        """``name`` inside the staging folder, created (with owner.json and resume.json) on first use."""
        if not self._owned:
            self.dir.mkdir(exist_ok=self.resumed)
            owner = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "output": self.out.name}
            (self.dir / "owner.json").write_text(json.dumps(owner) + "\n")
            if self.resume is not None:
                (self.dir / "resume.json").write_text(json.dumps(self.resume, indent=1) + "\n")
            self._owned = True
        (self.dir / name).mkdir(exist_ok=True)
        return self.dir / name

    def begin(self, need: int) -> Path:
        """Check that ``need`` bytes fit beside OUTPUT (less what a resumed staging folder already holds);
        create the staging folder; return where to write."""
        free = shutil.disk_usage(self.out.parent).free
        have = disk_usage(self.dir) if self.dir.is_dir() else 0
        if need - have > free:
            raise FP8VLError(f"{self.out}: needs {_size(need - have)} but {self.out.parent} has {_size(free)} free; "
                             f"free some space or choose an OUTPUT on another disk")
        return self.folder("output")

    def commit(self) -> None:
        """Rename the finished output into place; a replaced OUTPUT moves into the staging folder first
        and is deleted with it."""
        if self.out.exists():
            self.out.rename(self.dir / "replaced")
        (self.dir / "output").rename(self.out)
        self._committed = True

    def _release(self) -> None:
        # Unlinked while still held: a run that opened the old file sees it gone and is refused,
        # so two runs never hold two different lock files for one OUTPUT.
        self.lock_file.unlink(missing_ok=True)
        self.lock.release()

    def __exit__(self, kind, exc, tb) -> None:
        keep = (self.resume is not None and not self._committed and exc is not None and self.dir.is_dir()
                and (not isinstance(exc, FP8VLError) or isinstance(exc, Resumable)))
        try:
            if keep:
                log.warning(f"kept {self.dir} ({_size(disk_usage(self.dir))}: complete downloads and finished output "
                            f"parts): run the same command again to resume, or delete it")
            else:
                _remove(self.dir)
        finally:
            self._release()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "kept what was finished, to resume" if keep else "the partial output was removed"
            raise FP8VLError(f"{self.out}: no space left on the disk of {self.out.parent} while writing; "
                             f"{what}; free some space and run again") from exc


def other_files(src: Path, weight_files: tuple[Path, ...],
                rewritten: tuple[str, ...] = ("config.json", "README.md", "fp8vl-errors.json")
                ) -> tuple[list[str], list[str]]:
    """The non-weight files to copy byte for byte, and the weights in other formats left out
    (``rewritten``: written by fp8vl itself; an FP8 checkpoint's error file does not describe its copy)."""
    copied, skipped = [], []
    weights = {p.resolve() for p in weight_files}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            p = Path(root) / f
            rel = p.relative_to(src)
            if p.resolve() in weights or str(rel) in rewritten:
                continue
            (skipped if p.suffix in OTHER_WEIGHTS or p.suffix == ".safetensors" else copied).append(str(rel))
    return copied, skipped


def copy_files(src: Path, dst: Path, files: list[str]) -> None:
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)


def bytes_to_write(src: Path, files: list[str], tensor_bytes: int, n_tensors: int) -> int:
    """What the output takes on disk: tensors, copied files, and headers, index, config and card
    (generously: 512 bytes per tensor and 1 MiB)."""
    return tensor_bytes + sum((src / f).stat().st_size for f in files) + 512 * n_tensors + (1 << 20)
