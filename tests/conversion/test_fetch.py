"""fetch.py: shard downloads in a child process, in the writer's order, a bounded number on disk;
against the local hub (hub_server.py) through the real huggingface_hub client."""

from __future__ import annotations

import os
import time

import pytest

from fp8vl.conversion.fetch import Downloader, DownloadFailed, Fetcher, Remote
from fp8vl.conversion.staging import Resumable
from hub_server import HubServer, hub_env


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repo of three "shards" (random bytes: the fetcher does not read them) on the local hub,
    with this process's environment, which the download process inherits, pointed at it."""
    folder = tmp_path / "repo"
    folder.mkdir()
    for name, n in (("a.safetensors", 3 << 20), ("b.safetensors", 2 << 20), ("c.safetensors", 1 << 20)):
        (folder / name).write_bytes(os.urandom(n))
    (folder / "config.json").write_text("{}")
    server = HubServer({"org/r": folder})
    for k, v in hub_env(server, tmp_path / "hf-home").items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    yield server, folder, Remote("org/r", server.commit("org/r"), sizes)
    server.close()


def test_the_download_process_fetches_files_and_reports_a_failure_by_name(repo, tmp_path):
    server, folder, remote = repo
    dest = tmp_path / "dest"
    with Downloader() as download:
        assert download.proc.pid != os.getpid() and download.proc.poll() is None
        path = download(remote, "b.safetensors", dest)
        assert path == dest / "b.safetensors" and path.read_bytes() == (folder / "b.safetensors").read_bytes()
        with pytest.raises(DownloadFailed, match="EntryNotFound|404"):
            download(remote, "missing.safetensors", dest)
        assert download(remote, "c.safetensors", dest).read_bytes() == (folder / "c.safetensors").read_bytes()
    assert download.proc.poll() is not None


def test_the_head_downloads_before_the_plan_and_the_rest_follows_in_order_two_on_disk(repo, tmp_path):
    server, folder, remote = repo
    server.rate = 8e6
    dest = tmp_path / "dest"
    with Downloader() as download:
        f = Fetcher(remote, dest, ["b.safetensors"], 2, True, download).start()
        assert f.wait("b.safetensors").is_file()                   # before any plan
        assert f.plan(["a.safetensors", "b.safetensors", "c.safetensors"]) == \
            ["b.safetensors", "a.safetensors", "c.safetensors"]
        assert f.wait("a.safetensors").is_file()
        time.sleep(0.5)          # two slots, both held: c must not start
        assert not (dest / "c.safetensors").exists()
        assert server.bytes_sent("c.safetensors") == 0
        f.release("b.safetensors")
        assert not (dest / "b.safetensors").exists()
        assert f.wait("c.safetensors").read_bytes() == (folder / "c.safetensors").read_bytes()
        f.close()
    assert f.downloaded == sum(remote.sizes[n] for n in ("a.safetensors", "b.safetensors", "c.safetensors"))


def test_a_failed_download_is_a_resumable_error_naming_the_file(repo, tmp_path):
    server, folder, remote = repo
    with Downloader() as download:
        f = Fetcher(remote, tmp_path / "dest", ["nope.safetensors"], 2, True, download).start()
        f.plan([])
        with pytest.raises(Resumable) as e:
            f.wait("nope.safetensors")
        f.close()
    assert "downloading nope.safetensors from org/r failed (" in str(e.value)
    assert "run the same command again" in str(e.value)
