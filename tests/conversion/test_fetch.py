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


def _pieces(server: HubServer, name: str) -> list[tuple[int, int]]:
    """The bodies of ``name`` sent, as (first byte, bytes), in byte order."""
    return sorted((start, n) for f, start, n in server.sent if f == name)


def test_a_shard_comes_in_parts_over_several_connections_on_a_per_connection_throttle(repo, tmp_path):
    server, folder, remote = repo
    server.connection_rate = 1.5e6        # each connection, as a CDN throttles
    name, size = "a.safetensors", remote.sizes["a.safetensors"]
    seconds = {}
    for connections in (1, 3):
        dest = tmp_path / f"dest{connections}"
        server.sent.clear()
        with Downloader(connections, part=1 << 20) as download:
            download(remote, "config.json", dest)        # the process has started and imported its client
            t0 = time.perf_counter()
            path = download(remote, name, dest)
            seconds[connections] = time.perf_counter() - t0
        assert path == dest / name and path.read_bytes() == (folder / name).read_bytes()
        # every byte once: one body (huggingface_hub's http_get), or three parts of 1 MiB
        assert _pieces(server, name) == ([(0, size)] if connections == 1 else [(0, 1 << 20), (1 << 20, 1 << 20),
                                                                             (2 << 20, 1 << 20)])
    assert server.most[name] == 3
    assert seconds[3] < 0.6 * seconds[1], seconds       # 0.7 s of link against 2.1 s
    assert not list((tmp_path / "dest3" / ".cache").rglob("*.incomplete"))


def test_a_dropped_connection_asks_again_for_what_its_part_lacks_only(repo, tmp_path):
    server, folder, remote = repo
    name = "a.safetensors"
    server.drop[name] = 300_000
    with Downloader(3, part=1 << 20) as download:
        path = download(remote, name, tmp_path / "dest")
    assert path.read_bytes() == (folder / name).read_bytes()
    pieces = _pieces(server, name)
    cut = [s for s, n in pieces if n == 300_000]
    assert len(cut) == 1 and cut[0] % (1 << 20) == 0          # one part, cut off mid-way
    # that part continues from the byte reached to its own end; no byte comes twice
    assert pieces == sorted([(s, 1 << 20) for s in range(0, 3 << 20, 1 << 20) if s != cut[0]] +
                            [(cut[0], 300_000), (cut[0] + 300_000, (1 << 20) - 300_000)])


def test_a_shard_already_there_at_this_commit_is_not_asked_for_again(repo, tmp_path):
    server, folder, remote = repo
    with Downloader(3, part=1 << 20) as download:
        first = download(remote, "a.safetensors", tmp_path / "dest")
        sent = len(server.sent)
        assert download(remote, "a.safetensors", tmp_path / "dest") == first
    assert len(server.sent) == sent


def test_into_the_hub_cache_in_parts(repo, tmp_path):
    server, folder, remote = repo
    with Downloader(3, part=1 << 20) as download:
        path = download(remote, "a.safetensors", None)
        assert download(remote, "a.safetensors", None) == path
    assert path == tmp_path / "hf-home" / "hub" / "models--org--r" / "snapshots" / remote.commit / "a.safetensors"
    assert path.read_bytes() == (folder / "a.safetensors").read_bytes()
    assert len(_pieces(server, "a.safetensors")) == 3
    assert not list((tmp_path / "hf-home").rglob("*.incomplete"))


def test_a_server_that_ignores_range_gets_one_connection(repo, tmp_path):
    server, folder, remote = repo
    server.ranges = False
    with Downloader(3, part=1 << 20) as download:
        path = download(remote, "a.safetensors", tmp_path / "dest")
    assert path.read_bytes() == (folder / "a.safetensors").read_bytes()
    assert (0, remote.sizes["a.safetensors"]) in _pieces(server, "a.safetensors")


def test_a_chunked_body_is_read_by_the_client(repo, tmp_path):
    # Off the socket it would come with its chunk framing: only a body of exactly the part's
    # Content-Length is read there.
    server, folder, remote = repo
    server.chunked = True
    server.drop["a.safetensors"] = 300_000
    with Downloader(3, part=1 << 20) as download:
        path = download(remote, "a.safetensors", tmp_path / "dest")
    assert path.read_bytes() == (folder / "a.safetensors").read_bytes()
    assert sum(n for _, n in _pieces(server, "a.safetensors")) == remote.sizes["a.safetensors"]


def test_a_xet_file_is_left_to_huggingface_hubs_xet_path(repo, tmp_path):
    # No Xet storage here: the Xet path fails at its token, which shows it was taken; no byte came by HTTP.
    pytest.importorskip("hf_xet")
    server, folder, remote = repo
    server.xet = True
    with Downloader(3, part=1 << 20) as download:
        with pytest.raises(DownloadFailed):
            download(remote, "a.safetensors", tmp_path / "dest")
    assert server.xet_asked == ["org/r"]
    assert server.bytes_sent("a.safetensors") == 0
