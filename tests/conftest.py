"""Session fixtures: tiny Qwen3-VL checkpoints of the real architectures, built and converted once.

The suite runs offline (as .ci/run does): the hub is never contacted.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fp8vl import QuantizeOptions, quantize  # noqa: E402
from fp8vl.apps.tiny import build_tiny_qwen3_vl  # noqa: E402
from helpers import BAD_CASES, INDEX  # noqa: E402


@dataclass
class Converted:
    src: Path
    out: Path
    result: object


def _build(tmp_path_factory, kind: str, dtype=torch.bfloat16) -> Path:
    root = tmp_path_factory.mktemp(f"src-{kind}-{str(dtype).split('.')[-1]}")
    return build_tiny_qwen3_vl(root / f"tiny-{kind}", kind, dtype=dtype)


def _convert(tmp_path_factory, src: Path, name: str, **opts) -> Converted:
    out = tmp_path_factory.mktemp(f"out-{name}") / f"{name}-fp8"
    return Converted(src, out, quantize(src, out, QuantizeOptions(**opts)))


@pytest.fixture(scope="session")
def dense_src(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "dense")


@pytest.fixture(scope="session")
def tied_src(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tied")


@pytest.fixture(scope="session")
def moe_src(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "moe")


@pytest.fixture(scope="session")
def dense_fp8(tmp_path_factory, dense_src) -> Converted:
    return _convert(tmp_path_factory, dense_src, "dense")


@pytest.fixture(scope="session")
def tied_fp8(tmp_path_factory, tied_src) -> Converted:
    return _convert(tmp_path_factory, tied_src, "tied", record_error=True)


@pytest.fixture(scope="session")
def moe_fp8(tmp_path_factory, moe_src) -> Converted:
    return _convert(tmp_path_factory, moe_src, "moe")


@pytest.fixture(scope="session")
def wide_fp8(tmp_path_factory) -> Converted:
    """Dense, text hidden 1024: the decode GEMVs split K on a GPU (GPU tests only)."""
    return _convert(tmp_path_factory, _build(tmp_path_factory, "wide"), "wide")


@pytest.fixture(scope="session")
def converted(dense_fp8, tied_fp8):
    """Look up a session conversion by kind, for tests parametrized over dense and tied."""
    return {"dense": dense_fp8, "tied": tied_fp8}


@pytest.fixture(scope="session")
def hf_models(dense_fp8, tied_fp8):
    """Source and FP8 output of dense and tied, loaded by Transformers on CPU (lazily, once)."""
    from fp8vl.runtime.loader import load_hf_model

    cache: dict[tuple[str, str], object] = {}
    paths = {("dense", "src"): dense_fp8.src, ("dense", "fp8"): dense_fp8.out,
             ("tied", "src"): tied_fp8.src, ("tied", "fp8"): tied_fp8.out}

    def get(kind: str, which: str):
        if (kind, which) not in cache:
            cache[kind, which] = load_hf_model(paths[kind, which])
        return cache[kind, which]
    return get


# ---------------------------------------------------------------- bad inputs (API and CLI tests)

@dataclass
class Bad:
    source: str
    output: Path
    fragments: tuple[str, ...]   # each must appear in the error message


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, dense_src, dense_fp8) -> dict[str, Bad]:
    root = tmp_path_factory.mktemp("bad")
    cases: dict[str, Bad] = {}

    def copy(name: str, src: Path = dense_src) -> Path:
        dst = root / name.replace(" ", "-").replace(".", "_")
        shutil.copytree(src, dst)
        return dst

    def out(name: str) -> Path:
        return root / "outputs" / name.replace(" ", "-").replace(".", "_")

    missing = root / "no-such-folder"
    cases["missing folder"] = Bad(str(missing), out("missing folder"), (str(missing),))

    p = copy("no config.json")
    (p / "config.json").unlink()
    cases["no config.json"] = Bad(str(p), out("no config.json"), (str(p), "config.json"))

    p = copy("truncated shard")
    shard = p / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    cases["truncated shard"] = Bad(str(p), out("truncated shard"), (str(shard), "truncated"))

    p = copy("corrupt header")
    shard = p / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    cases["corrupt header"] = Bad(str(p), out("corrupt header"), (str(shard),))

    p = copy("index names missing shard")
    (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors")
    names = list(load_file(p / "model-00001-of-00002.safetensors"))
    wmap = {n: "model-00001-of-00002.safetensors" for n in names}
    wmap["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (p / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    cases["index names missing shard"] = Bad(str(p), out("index names missing shard"),
                                             (str(p / INDEX), "model-00002-of-00002.safetensors"))

    p = copy("quantization_config present", dense_fp8.out)
    cases["quantization_config present"] = Bad(str(p), out("quantization_config present"),
                                               (str(p / "config.json"), "already quantized"))

    p = copy("fp8 tensors present", dense_fp8.out)
    cfg = json.loads((p / "config.json").read_text())
    del cfg["quantization_config"]
    (p / "config.json").write_text(json.dumps(cfg))
    cases["fp8 tensors present"] = Bad(str(p), out("fp8 tensors present"),
                                       (str(p / "model-00001-of-00001.safetensors"), "already quantized"))

    p = copy("int32 linear weight")
    shard = p / "model.safetensors"
    sd = load_file(shard)
    bad = "model.language_model.layers.0.self_attn.q_proj.weight"
    sd[bad] = torch.ones(sd[bad].shape, dtype=torch.int32)
    save_file(sd, shard, metadata={"format": "pt"})
    cases["int32 linear weight"] = Bad(str(p), out("int32 linear weight"), (str(shard), bad, "I32"))

    p = copy("output inside source")
    cases["output inside source"] = Bad(str(p), p / "fp8", (str(p / "fp8"),))

    o = out("output not empty")
    o.mkdir(parents=True)
    (o / "keep-me.txt").write_text("precious")
    cases["output not empty"] = Bad(str(dense_src), o, (str(o), "overwrite"))

    repo = "fp8vl-tests-nobody/no-such-model"
    cases["hub repo offline"] = Bad(repo, out("hub repo offline"), (repo, "local folder"))
    assert set(cases) == set(BAD_CASES)
    return cases


# ---------------------------------------------------------------- a source big enough to interrupt

@pytest.fixture(scope="session")
def big_src(tmp_path_factory):
    """512 MB of BF16 linears: about a second of conversion with one worker, long enough to interrupt."""
    src = tmp_path_factory.mktemp("big") / "src"
    src.mkdir()
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.full((4096, 4096), 0.01 * (i + 1),
                                                                      dtype=torch.bfloat16) for i in range(16)}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    yield src
    shutil.rmtree(src)
