"""``fp8vl quantize ORG/NAME``: the real huggingface_hub client against a local hub (hub_server.py)
on 127.0.0.1. These tests, and only these, turn offline mode off, pointing HF_ENDPOINT there."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8vl import FP8VLError, QuantizeOptions, quantize
from fp8vl.conversion.drift import FILE as ERRORS
from fp8vl.conversion.hub import early_order, largest_first
from fp8vl.conversion.ranged import CONNECTIONS, part_size
from fp8vl.checkpoint.source import open_checkpoint
from fp8vl.conversion.staging import disk_usage
from fp8vl.check.verify import verify
from helpers import INDEX, file_hashes
from hub_server import HubServer, _sha256, hub_env

SHARD = 1 << 20   # output shard size for the tiny model: several output shards


def _shard(tensors: dict[str, torch.Tensor], dst: Path, n: int, others: Path | None = None) -> Path:
    """Save ``tensors`` as ``n`` shards with a Hugging Face index (weight_map sorted by name)."""
    dst.mkdir(parents=True)
    names = list(tensors)
    cut = [round(i * len(names) / n) for i in range(n + 1)]
    wmap = {}
    for i in range(n):
        f = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[cut[i]:cut[i + 1]]}
        save_file(part, dst / f, metadata={"format": "pt"})
        wmap.update({k: f for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}))
    if others is not None:
        for p in others.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX:
                shutil.copy(p, dst / p.name)
    return dst


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, dense_src) -> Path:
    """The tiny Qwen3-VL in 3 shards."""
    tensors = {}
    for f in sorted(dense_src.glob("*.safetensors")):
        tensors.update(load_file(f))
    return _shard(tensors, tmp_path_factory.mktemp("hub") / "tiny", 3, dense_src)


@pytest.fixture(scope="session")
def big_repo(tmp_path_factory) -> Path:
    """8 shards of 8 MB (two 1024x2048 BF16 linears each, Gaussian): long enough to watch at a few MB/s."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": (torch.randn(1024, 2048, generator=g) * 0.02).bfloat16()
               for i in range(16)}
    tensors["model.norm.weight"] = torch.ones(1024, dtype=torch.bfloat16)
    src = _shard(tensors, tmp_path_factory.mktemp("hub") / "big", 8)
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 1024}))
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    return src


@pytest.fixture(scope="session")
def wide_repo(tmp_path_factory) -> Path:
    """2 shards of 24 MB: larger than huggingface_hub's 10 MB write piece."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": (torch.randn(3072, 4096, generator=g) * 0.02).bfloat16()
               for i in range(2)}
    src = _shard(tensors, tmp_path_factory.mktemp("hub") / "wide", 2)
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 4096}))
    return src


@pytest.fixture(scope="session")
def stray_repo(tmp_path_factory, tiny_repo) -> Path:
    """The tiny repo with a file beside its shards that the index does not name and that is no safetensors."""
    dst = tmp_path_factory.mktemp("hub") / "stray"
    shutil.copytree(tiny_repo, dst)
    (dst / "consolidated.safetensors").write_bytes(b"\xff" * 300_000)
    return dst


@pytest.fixture(scope="session")
def local_fp8(tmp_path_factory, tiny_repo, big_repo, wide_repo):
    """The local conversion of each repo folder, with the error file a hub run always writes: what the
    hub runs must equal."""
    root = tmp_path_factory.mktemp("local")
    opts = QuantizeOptions(workers=2, record_error=True)
    return {"tiny": quantize(tiny_repo, root / "tiny", replace(opts, max_shard_size=SHARD)).output,
            "big": quantize(big_repo, root / "big", replace(opts, max_shard_size=12 << 20)).output,
            "wide": quantize(wide_repo, root / "wide", opts).output}


@pytest.fixture
def hub(tiny_repo, big_repo, wide_repo, stray_repo, tmp_path, monkeypatch):
    """The local hub, with this process's huggingface_hub pointed at it and online."""
    import huggingface_hub.constants as C

    server = HubServer({"org/tiny": tiny_repo, "org/big": big_repo, "org/wide": wide_repo, "org/stray": stray_repo})
    for k, v in hub_env(server, tmp_path / "hf-home").items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    yield server
    server.close()


def _same_as_local(out: Path, local: Path) -> None:
    """Every file byte-identical to the local conversion's, but the card (which names the repo and commit)."""
    a, b = file_hashes(out), file_hashes(local)
    a.pop("README.md"), b.pop("README.md")
    assert a == b
    assert ERRORS in a and any(k.endswith(".safetensors") for k in a)


def _opts(**kw) -> QuantizeOptions:
    return QuantizeOptions(**{"max_shard_size": SHARD, "workers": 2, **kw})


def test_hub_id_converts_to_the_local_conversion_byte_for_byte_and_leaves_no_source(hub, local_fp8, tmp_path):
    out = tmp_path / "out" / "tiny-fp8"
    res = quantize("org/tiny", out, _opts())
    _same_as_local(out, local_fp8["tiny"])
    assert res.commit == hub.commit("org/tiny") and res.hub == "org/tiny"
    assert [p.name for p in out.parent.iterdir()] == ["tiny-fp8"]          # staging and lock gone
    assert not list((tmp_path / "hf-home").rglob("*.safetensors"))         # streamed: nothing in the cache
    card = (out / "README.md").read_text()
    assert hub.commit("org/tiny") in card and "base_model: org/tiny" in card
    assert f"--revision {hub.commit('org/tiny')}" in card and "mean SQNR" in card


def test_disk_peak_is_output_plus_two_shards_and_shards_go_largest_first(hub, big_repo, local_fp8, tmp_path,
                                                                         caplog):
    hub.rate = 24e6
    out = tmp_path / "big-fp8"
    staging = tmp_path / ".big-fp8.fp8vl-partial"
    peak, most, stop = [0], [0], threading.Event()
    sha = {p.name: _sha256(p) for p in big_repo.glob("*.safetensors")}   # a shard's etag on the hub

    def watch():
        # Source shards on disk or downloading, by name (a download in progress is named by its etag);
        # the disk counted once per inode, downloads in progress first: a shard renamed into place, or
        # deleted just as the next download starts, is never counted twice.
        while not stop.is_set():
            shards = set()
            for _, _, files in os.walk(staging / "source"):
                for f in files:
                    if f.endswith(".safetensors"):
                        shards.add(sha[f])
                    elif f.endswith(".incomplete") and any(p in sha.values() for p in f.split(".")):
                        shards.add(next(p for p in f.split(".") if p in sha.values()))   # named by etag
            used = disk_usage(staging / "source" / ".cache", staging, out)
            peak[0], most[0] = max(peak[0], used), max(most[0], len(shards))
            time.sleep(0.005)
    w = threading.Thread(target=watch)
    w.start()
    with caplog.at_level(logging.DEBUG, logger="fp8vl.conversion.fetch"):
        quantize("org/big", out, QuantizeOptions(max_shard_size=12 << 20, workers=2))
    stop.set()
    w.join()
    _same_as_local(out, local_fp8["big"])
    reading = list(dict.fromkeys(json.loads((big_repo / INDEX).read_text())["weight_map"].values()))
    size = {f: (big_repo / f).stat().st_size for f in reading}
    order = sorted(reading, key=lambda f: -size[f])           # largest first, ties in the index's order
    events = [r.getMessage().split()[:2] for r in caplog.records if r.name == "fp8vl.conversion.fetch"]
    deleted = [f for what, f in events if what == "deleted"]
    assert deleted == order
    assert len(set(size.values())) == 3 and order != reading and order != sorted(order)   # 12, 8 and ~4 MB
    downloaded = [f for what, f in events if what == "downloaded"]
    assert downloaded == order
    for f in order:                                           # each written, then deleted, once
        assert events.count(["downloaded", f]) == 1
        assert events.index(["downloaded", f]) < events.index(["deleted", f])
    shard = max(p.stat().st_size for p in big_repo.glob("*.safetensors"))
    output = sum(p.stat().st_size for p in out.iterdir())
    assert 0 < most[0] <= 2
    assert output < peak[0] <= output + 2 * shard + (1 << 20), (peak[0], output, shard)


def test_shards_go_largest_first_with_ties_in_the_index_order():
    sizes = {"a": 5, "b": 9, "c": 5, "d": 1, "e": 9}
    assert largest_first(["c", "a", "e", "d", "b"], sizes) == ["e", "b", "c", "a", "d"]


def test_the_early_order_is_the_shards_the_plan_reads_that_no_earlier_run_finished_largest_first(big_repo):
    ckpt = open_checkpoint(big_repo)
    sizes = {p.name: p.stat().st_size for p in big_repo.glob("*.safetensors")}
    order = largest_first(list(json.loads((big_repo / INDEX).read_text())["weight_map"].values()), sizes)
    order = list(dict.fromkeys(order))
    opts = QuantizeOptions(max_shard_size=12 << 20)
    assert early_order(ckpt, big_repo, opts, set(), sizes) == order
    assert early_order(ckpt, big_repo, opts, {order[0], order[3]}, sizes) == order[1:3] + order[4:]
    assert early_order(ckpt, big_repo, opts, set(order), sizes) == []


def test_a_file_beside_the_shards_that_the_index_does_not_name_is_neither_fatal_nor_downloaded(hub, local_fp8,
                                                                                               tmp_path):
    # Its header is asked for while the small files download (before the index says which shards
    # count); the failed read is never looked at.
    res = quantize("org/stray", tmp_path / "out", _opts())
    _same_as_local(tmp_path / "out", local_fp8["tiny"])
    assert "consolidated.safetensors" in res.skipped
    assert 0 < hub.bytes_sent("consolidated.safetensors") <= 100_001


# Run in the child below: the process's first import of torch is held until a source shard is on
# disk or downloading (or 30 s have passed); it says which came first. A shard downloading is named
# by its etag, a sha256 (a small file's is a 40-digit git blob id). (It waits in the loader: a
# finder runs under the interpreter's global import lock.)
HOLD_TORCH = """
import importlib.abc, importlib.machinery, re, sys, time
from pathlib import Path
staging, said = Path(sys.argv.pop(1)), Path(sys.argv.pop(1))

class Held(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real
    def create_module(self, spec):
        return self.real.create_module(spec)
    def exec_module(self, module):
        if not said.exists():
            end = time.monotonic() + 30
            while time.monotonic() < end and not any(p.name.endswith(".safetensors") or
                                                     re.search("[.][0-9a-f]{64}[.]([0-9a-f]+[.])?incomplete$", p.name)
                                                     for p in staging.rglob("*")):
                time.sleep(0.01)
            said.write_text("downloading" if time.monotonic() < end else "no download while torch waited")
        self.real.exec_module(module)

class Hold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = Held(spec.loader)
        return spec

sys.meta_path.insert(0, Hold())
from fp8vl.cli import main
sys.exit(main())
"""


def test_the_first_shard_downloads_while_torch_is_imported(hub, local_fp8, tmp_path):
    # torch's import (1.5-2.5 s) is the start a download cannot overlap but for the shard the plan
    # reads first: that one is known from the headers alone, before torch is there.
    out, said = tmp_path / "out", tmp_path / "said"
    r = subprocess.run([sys.executable, "-c", HOLD_TORCH, str(tmp_path / ".out.fp8vl-partial"), str(said),
                        "quantize", "org/tiny", str(out), "--workers", "2", "--max-shard-size", str(SHARD)],
                       env=hub_env(hub, tmp_path / "hf-home"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert said.read_text() == "downloading"
    _same_as_local(out, local_fp8["tiny"])


def test_a_script_without_a_main_guard_can_call_quantize(hub, local_fp8, tmp_path):
    # The download process must not run the caller's script again (as multiprocessing's spawn would).
    script = tmp_path / "convert_it.py"
    script.write_text(f"from fp8vl import QuantizeOptions, quantize\n"
                      f"quantize('org/tiny', {str(tmp_path / 'out')!r}, QuantizeOptions(max_shard_size={SHARD}))\n"
                      f"print('converted')\n")
    r = subprocess.run([sys.executable, str(script)], env=hub_env(hub, tmp_path / "hf-home"), capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("converted") == 1
    _same_as_local(tmp_path / "out", local_fp8["tiny"])


def test_a_dropped_connection_is_asked_again_for_what_its_part_lacks(hub, wide_repo, local_fp8, tmp_path):
    name = "model-00002-of-00002.safetensors"
    size = (wide_repo / name).stat().st_size
    part = part_size(size, CONNECTIONS)
    assert 2 << 20 < part < size
    hub.drop[name] = 2 << 20
    out = tmp_path / "wide-fp8"
    quantize("org/wide", out, QuantizeOptions(workers=2))
    _same_as_local(out, local_fp8["wide"])
    gets = sorted((start, n) for f, start, n in hub.sent if f == name and n > 100_001)   # not the header reads
    # Parts on connections of their own; one is cut off after 2 MiB and asked again from there to its
    # own end: no byte comes twice, no other part is asked again.
    cut = [s for s, n in gets if n == 2 << 20]
    assert len(cut) == 1 and cut[0] % part == 0
    whole = [(s, min(part, size - s)) for s in range(0, size, part)]
    assert gets == sorted([p for p in whole if p[0] != cut[0]] +
                          [(cut[0], 2 << 20), (cut[0] + (2 << 20), min(part, size - cut[0]) - (2 << 20))])


def _downloading(staging: Path) -> bool:
    """A source shard is downloading into ``staging``: huggingface_hub's temporary file, named by the
    shard's etag (a sha256; a small file's is a 40-digit git blob id), is there."""
    return any(re.search("[.][0-9a-f]{64}[.]([0-9a-f]+[.])?incomplete$", f.name) for f in staging.rglob("*"))


def _download_processes(home: Path, wait: float = 2.0) -> list[int]:
    """The fp8vl download processes (``fetch.Downloader``) of runs pointed at ``home`` that are
    still alive after ``wait`` seconds (Linux's /proc; elsewhere none are seen)."""
    end = time.monotonic() + wait
    while True:
        pids = []
        for d in Path("/proc").glob("[0-9]*"):
            try:
                if b"fp8vl.conversion.fetch" in (d / "cmdline").read_bytes() and \
                        f"HF_HOME={home}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
        if not pids or time.monotonic() > end:
            return pids
        time.sleep(0.05)


def test_killed_run_resumes_without_downloading_finished_shards(hub, big_repo, local_fp8, tmp_path):
    hub.rate = 8e6
    out = tmp_path / "big-fp8"
    journal = tmp_path / ".big-fp8.fp8vl-partial" / "journal.jsonl"
    env = hub_env(hub, tmp_path / "hf-home")
    p = subprocess.Popen([sys.executable, "-m", "fp8vl.cli", "quantize", "org/big", str(out), "--workers", "2",
                          "--max-shard-size", str(12 << 20)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and \
            (not journal.is_file() or len(journal.read_text().splitlines()) < 3 or not _downloading(journal.parent)):
        time.sleep(0.02)
    hub.rate = 1e6      # the download in progress would outlast the test if it went on
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)       # not communicate(): that would wait for a download process holding the pipes
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert _download_processes(tmp_path / "hf-home") == [], "a download went on after its run was killed"
    p.communicate(timeout=60)
    finished = [json.loads(line)["shard"] for line in journal.read_text().splitlines()]
    assert len(finished) >= 3 and not out.exists()
    hub.sent.clear()
    hub.rate = None
    r = subprocess.run([sys.executable, "-m", "fp8vl.cli", "quantize", "org/big", str(out), "--workers", "2",
                        "--max-shard-size", str(12 << 20)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    _same_as_local(out, local_fp8["big"])
    for name in finished:                           # only its header was read again (one ranged request)
        assert hub.bytes_sent(name) <= 100_001, name
    assert not any(p.name.startswith(".big-fp8") for p in tmp_path.iterdir())


def test_ctrl_c_during_a_download_keeps_the_staging_and_ends_the_download(hub, big_repo, tmp_path):
    # As a terminal sends it: SIGINT to the whole process group, the download process included.
    hub.rate = 4e6          # slow enough that the run is still downloading when the test looks
    out = tmp_path / "big-fp8"
    staging = tmp_path / ".big-fp8.fp8vl-partial"
    p = subprocess.Popen([sys.executable, "-m", "fp8vl.cli", "quantize", "org/big", str(out), "--workers", "2",
                          "--max-shard-size", str(12 << 20)], env=hub_env(hub, tmp_path / "hf-home"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and not _downloading(staging):
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=60)       # not communicate(): that would wait for a download process holding the pipes
    assert _download_processes(tmp_path / "hf-home", wait=0) == [], "a download went on after Ctrl-C"
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr and "run the same command again" in stderr
    assert staging.is_dir() and not out.exists()


def test_keep_source_downloads_into_the_hub_cache_and_a_cached_repo_is_not_streamed(hub, local_fp8, tmp_path):
    quantize("org/tiny", tmp_path / "a", _opts(stream=False))
    cached = sorted(p.name for p in (tmp_path / "hf-home").rglob("*.safetensors"))
    assert cached == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                      "model-00003-of-00003.safetensors"]
    _same_as_local(tmp_path / "a", local_fp8["tiny"])
    hub.sent.clear()
    quantize("org/tiny", tmp_path / "b", _opts())               # default: in the cache, so no stream
    _same_as_local(tmp_path / "b", local_fp8["tiny"])
    assert all(n <= 100_001 for _, _, n in hub.sent)          # header reads only, no download
    assert len(list((tmp_path / "hf-home").rglob("*.safetensors"))) == 3


def test_verify_reports_the_error_recorded_while_converting_as_verify_source_measures_it(hub, tiny_repo, tmp_path):
    out = tmp_path / "tiny-fp8"
    quantize("org/tiny", out, _opts())
    recorded = verify(out)
    measured = verify(out, tiny_repo)
    assert recorded.ok and any(c.name == "recorded error" and c.level == "ok" for c in recorded.checks)
    got = {t.name: t for t in recorded.tensors}
    assert set(got) == {t.name for t in measured.tensors} and got
    for t in measured.tensors:
        assert abs(got[t.name].sqnr_db - t.sqnr_db) < 0.01, t.name
        assert abs(got[t.name].rel_error - t.rel_error) <= 1e-5 * t.rel_error, t.name
        assert 0 < got[t.name].max_rel_error < 1 / 8      # e4m3 rounds to within 1/16 of the tile max


def test_staging_of_another_commit_or_options_is_removed_and_the_run_starts_over(hub, local_fp8, tmp_path, caplog):
    out = tmp_path / "tiny-fp8"
    staging = tmp_path / ".tiny-fp8.fp8vl-partial"
    (staging / "output").mkdir(parents=True)
    (staging / "output" / "model-00001-of-00003.safetensors").write_bytes(b"stale")
    (staging / "resume.json").write_text(json.dumps({"source": "org/tiny", "commit": "0" * 40}))
    (staging / "journal.jsonl").write_text(json.dumps({"shard": "x", "slots": ["lm_head.weight"], "errors": {}}))
    with caplog.at_level(logging.WARNING, logger="fp8vl"):
        quantize("org/tiny", out, _opts())
    assert any("removed" in r.getMessage() and "another source, commit or options" in r.getMessage()
               for r in caplog.records)
    _same_as_local(out, local_fp8["tiny"])


def test_unknown_repo_or_revision_is_one_clear_error(hub, tmp_path):
    with pytest.raises(FP8VLError, match="org/nothing: no such model"):
        quantize("org/nothing", tmp_path / "x", _opts())
    with pytest.raises(FP8VLError, match="org/tiny: has no revision 'v9'"):
        quantize("org/tiny", tmp_path / "x", _opts(revision="v9"))
    assert not any(tmp_path.iterdir())


def test_dry_run_reads_headers_only(hub, tmp_path):
    res = quantize("org/tiny", None, _opts(dry_run=True))
    assert res.commit == hub.commit("org/tiny") and any(e.quantize for e in res.plan.entries)
    assert all(n <= 100_001 for f, _, n in hub.sent if f.endswith(".safetensors"))
