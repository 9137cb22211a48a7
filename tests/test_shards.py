"""fp8vl.shards: hand-written safetensors reading and streaming writing, judged by the safetensors library."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8vl.errors import FP8VLError
from fp8vl.shards import ShardWriter, Slot, read_header, read_rows, read_tensor
from helpers import FP8, as_bytes, same_bytes


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 200, generator=g).bfloat16(),
        "b.bias": torch.randn(7, generator=g),
        "c.fp16": torch.randn(5, 3, 2, generator=g).half(),
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.fp8": (torch.randn(64, 32, generator=g) * 10).to(FP8),
        "f.u8": torch.arange(13, dtype=torch.uint8),
        "g.scalar": torch.tensor(3.5),
    }


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "lib.safetensors"
    tensors = sample_tensors()
    save_file(tensors, path, metadata={"format": "pt", "who": "test"})
    return path, tensors


def test_read_header_gives_names_dtypes_shapes_and_data_offsets(st_file):
    path, tensors = st_file
    infos, meta = read_header(path)
    assert set(infos) == set(tensors)
    assert meta == {"format": "pt", "who": "test"}
    raw = path.read_bytes()
    for name, t in tensors.items():
        info = infos[name]
        assert info.torch_dtype == t.dtype and info.shape == tuple(t.shape) and info.file == path
        assert info.nbytes == t.numel() * t.element_size()
        # the offset is right iff the file's bytes there are the tensor's bytes
        assert raw[info.offset:info.offset + info.nbytes] == as_bytes(t).numpy().tobytes()


@pytest.mark.parametrize("rows", [(0, 300), (0, 1), (17, 129), (299, 300), (128, 256)], ids=str)
def test_read_rows_matches_the_tensor_slice(st_file, rows):
    path, tensors = st_file
    infos, _ = read_header(path)
    got = read_rows(infos["a.weight"], *rows)
    assert same_bytes(got, tensors["a.weight"][rows[0]:rows[1]])


def test_read_tensor_reads_every_dtype_and_a_scalar(st_file):
    path, tensors = st_file
    infos, _ = read_header(path)
    for name, t in tensors.items():
        assert same_bytes(read_tensor(infos[name]), t), name


@pytest.mark.parametrize("keep", [3, 40, -100], ids=["in-length", "in-header", "in-data"])
def test_truncated_file_raises_fp8vl_error_naming_it(st_file, keep):
    path, _ = st_file
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(FP8VLError, match="truncated|not a safetensors|corrupt") as ei:
        read_header(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("header", [b"\xff\xfe garbage \x00 bytes", b"[1, 2, 3]", b'{"x": {"dtype": "F32"}}',
                                    b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}',
                                    b'{"x": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}'],
                         ids=["not-json", "not-a-dict", "no-offsets", "size-mismatch", "unknown-dtype"])
def test_garbage_header_raises_fp8vl_error_naming_the_file(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(FP8VLError) as ei:
        read_header(path)
    assert str(path) in str(ei.value)


def test_huge_header_length_raises_fp8vl_error(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}      ")
    with pytest.raises(FP8VLError, match=str(path)):
        read_header(path)


def slots_for(tensors):
    return [Slot(n, {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16",
                     torch.int64: "I64", FP8: "F8_E4M3", torch.uint8: "U8"}[t.dtype],
                 tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()]


def write_all(path, tensors, pieces=3):
    """Write every tensor in reverse order, each in ``pieces`` byte ranges, last range first."""
    w = ShardWriter(path, slots_for(tensors), {"format": "pt"})
    for name, t in reversed(list(tensors.items())):
        b = as_bytes(t).reshape(-1)
        step = max(1, -(-b.numel() // pieces))
        for at in reversed(range(0, b.numel(), step)):
            w.write(name, at, b[at:at + step])
    w.close()
    return w


def test_shard_writer_output_reads_back_identically_with_safetensors(tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = sample_tensors()
    write_all(path, tensors)
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert same_bytes(f.get_tensor(name), t), name


def test_shard_writer_aligns_every_tensor_to_its_element_size(tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = sample_tensors()
    write_all(path, tensors)
    infos, _ = read_header(path)
    for name, t in tensors.items():
        assert infos[name].offset % t.element_size() == 0, name
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0 and json.loads(path.read_bytes()[8:8 + n])


@pytest.mark.parametrize("at,size", [(90, 20), (-1, 4), (0, 101)], ids=["past-end", "negative", "too-long"])
def test_shard_writer_rejects_writes_outside_the_tensor(tmp_path, at, size):
    w = ShardWriter(tmp_path / "x.safetensors", [Slot("t", "U8", (100,), 100)], {})
    with pytest.raises((ValueError, FP8VLError)):
        w.write("t", at, bytes(size))
    w.write("t", 0, bytes(100))
    w.close()


def test_shard_writer_close_fails_when_a_tensor_was_never_written(tmp_path):
    path = tmp_path / "x.safetensors"
    w = ShardWriter(path, [Slot("a", "U8", (8,), 8), Slot("b", "U8", (8,), 8)], {})
    w.write("a", 0, bytes(8))
    with pytest.raises(FP8VLError, match="b"):
        w.close()


def test_shard_writer_close_fails_when_a_tensor_is_half_written(tmp_path):
    w = ShardWriter(tmp_path / "x.safetensors", [Slot("a", "U8", (8,), 8)], {})
    w.write("a", 0, bytes(4))
    with pytest.raises(FP8VLError):
        w.close()


def test_shard_writer_close_fails_when_one_range_is_written_twice_and_another_never(tmp_path):
    w = ShardWriter(tmp_path / "x.safetensors", [Slot("a", "U8", (8,), 8)], {})
    w.write("a", 0, b"1234")
    w.write("a", 0, b"1234")
    with pytest.raises((FP8VLError, ValueError)):
        w.close()
