"""Find a checkpoint (local folder or hub repo id), read its config, check every shard's header."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import FP8VLError
from .formats import SCALE_SUFFIXES
from .shards import TensorInfo, read_header

INDEX = "model.safetensors.index.json"
FLOAT_SOURCES = {"BF16", "F16", "F32"}
# Weight files in other formats: never copied next to the FP8 shards (a loader could pick them up).
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# A hub repo id as the hub spells one: ORG/NAME, each part letters, digits, -, _ and . (at most 96), not
# starting or ending with - or ., no -- or .. anywhere (huggingface_hub's validate_repo_id).
_REPO_PART = r"\w(?:[\w.-]{0,94}\w)?"
REPO_ID = re.compile(rf"^(?!.*(--|\.\.)){_REPO_PART}/{_REPO_PART}$", re.ASCII)
PATH_PREFIXES = ("./", "../", "/", "~")   # written as a path: never a hub id, even when missing
SKIP_DIRS = {".git", ".cache", ".huggingface"}   # not part of the model: never read or copied
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]   # in file order: shard by shard, offset by offset
    weight_files: tuple[Path, ...]   # the .safetensors shards and the index, if any


def is_local(source: str | Path) -> bool:
    """A local path: one that exists, or one written as a path (./, ../, /, ~; a Path object)."""
    text = str(source)
    return isinstance(source, Path) or text in (".", "..") or text.startswith(PATH_PREFIXES) \
        or os.path.isabs(text) or Path(text).expanduser().exists()


def is_hub_id(source: str | Path) -> bool:
    """``ORG/NAME`` that is not a local path: the one kind of SOURCE fp8vl asks the hub for."""
    return not is_local(source) and bool(REPO_ID.match(str(source)))


def local_folder(path: str | Path, hub: bool = False) -> Path:
    """``path`` as an existing folder (~ expanded, made absolute); else one line naming it as given
    (``hub``: the argument could have been a hub id, and the line says how one is written). The one
    check of every folder argument: cheap (no hub, no torch), so commands run it first."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise FP8VLError(f"{path}: is a file; pass a model folder" + (" or a hub repo id" if hub else ""))
    hint = "; a hub repo id is written ORG/NAME" if hub and not is_local(path) else ""
    raise FP8VLError(f"no such folder: {path}{hint}")


def locate(source: str | Path) -> str | Path:
    """SOURCE as a command line gives it: a hub id (str) as is, anything else as an existing local
    folder (Path), or one FP8VLError line. No hub request: commands check their arguments with it first."""
    return str(source) if is_hub_id(source) else local_folder(source, hub=True)


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; a hub id (is_hub_id) is downloaded into the hub cache."""
    found = locate(source)
    if isinstance(found, Path):
        return found
    try:
        from huggingface_hub import snapshot_download

        # Resumable: files already in the cache are kept, partial ones continued.
        return Path(snapshot_download(found, revision=revision))
    except Exception as e:  # offline, unknown repo, gated repo, ...: one message with the fix
        raise FP8VLError(
            f"cannot download {source} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"Download it where the hub is reachable (hf download {source} --local-dir DIR) "
            f"and pass the local folder DIR as SOURCE."
        ) from e


def read_config(path: Path) -> dict:
    """config.json as a dict whose ``text_config``, ``vision_config`` and ``quantization_config`` (where
    present) are dicts too, so every later ``.get`` is safe; anything else is one FP8VLError line."""
    if not path.is_dir():
        local_folder(path)   # no such folder, or a file: said so, not "no config.json"
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FP8VLError(f"{path}: no config.json; SOURCE must be a Hugging Face model folder")
    try:
        config = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FP8VLError(f"{cfg}: not valid JSON ({e}); restore the file from the original model") from e
    fix = "restore the file from the original model"
    if not isinstance(config, dict):
        raise FP8VLError(f"{cfg}: holds {JSON_TYPES.get(type(config), 'a value')}, not an object; {fix}")
    text = config.get("text_config")
    for where, d, key in [("", config, k) for k in ("text_config", "vision_config", "quantization_config")] + \
            ([("text_config.", text, "quantization_config")] if isinstance(text, dict) else []):
        if key in d and not isinstance(d[key], dict):
            raise FP8VLError(f"{cfg}: {where}{key} is {JSON_TYPES.get(type(d[key]), 'a value')}, not an object; {fix}")
    return config


def check_tree(path: Path) -> None:
    """Every file fp8vl may read or copy exists and is a regular file: a broken symlink (or a device,
    a pipe) is named before anything is opened. Symlinks to files are fine: the hub cache is made of them."""
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for f in files:
            p = Path(root) / f
            if p.is_symlink() and not p.exists():
                raise FP8VLError(f"{p}: broken symlink (points to {os.readlink(p)}, which does not exist); "
                                 f"download the file again or delete the link")
            if not p.is_file():
                raise FP8VLError(f"{p}: not a regular file (a device, pipe or socket); remove it from SOURCE")


def shard_files(path: Path, listed: set[str] | None = None) -> list[Path]:
    """The shards in the order the index names them (else sorted); ``listed``: the files a hub repo
    holds, for shards not downloaded yet (the index itself must be on disk)."""
    present = (lambda p: p.is_file()) if listed is None else (lambda p: str(p.relative_to(path)) in listed)
    index = path / INDEX
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise FP8VLError(f"{index}: corrupt index ({e}); restore it or delete it") from e
        if not isinstance(wmap, dict) or not all(isinstance(f, str) for f in wmap.values()):
            raise FP8VLError(f"{index}: corrupt index (weight_map must map tensor names to file names); "
                             f"restore it or delete it")
        files = list(dict.fromkeys(wmap.values()))
        for f in files:   # checked as written, before anything is opened: a symlink inside SOURCE may point out
            if os.path.isabs(f) or ".." in PurePosixPath(f).parts:
                raise FP8VLError(f"{index} names shard {f}, a path outside {path}; an index may only name "
                                 f"files inside SOURCE: restore it or delete it")
        for f in files:
            if not present(path / f):
                raise FP8VLError(f"{index} names shard {f}, which is missing from {path}; download it again")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors")) if listed is None else \
        sorted(path / f for f in listed if f.endswith(".safetensors") and "/" not in f)
    if not files:
        other = [f.name for f in path.iterdir() if f.suffix in OTHER_WEIGHTS]
        hint = f" (found {', '.join(other[:3])}: re-save the model with safetensors)" if other else ""
        raise FP8VLError(f"{path}: no .safetensors weights{hint}")
    return files


def open_checkpoint(path: Path, allow_quantized: bool = False,
                    headers: dict[str, dict[str, TensorInfo]] | None = None) -> Checkpoint:
    """Read config and every shard header up front, so bad input fails before anything is written.

    ``headers`` (shard file name -> its tensors, read from the hub before the shards are downloaded)
    stand in for the shards' own headers."""
    check_tree(path)
    config = read_config(path)
    files = shard_files(path, None if headers is None else set(headers))
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos = read_header(f)[0] if headers is None else headers[str(f.relative_to(path))]
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].offset):
            if name in tensors:
                raise FP8VLError(f"{f}: tensor {name} also appears in {tensors[name].file.name}")
            tensors[name] = info
    index = path / INDEX
    if index.is_file():
        wmap = json.loads(index.read_text())["weight_map"]
        for name, fname in wmap.items():
            if name not in tensors or tensors[name].file != path / fname:
                raise FP8VLError(f"{index}: says {name} is in {fname}, but it is not there; "
                                 f"the index and the shards disagree: download them again")
    if not allow_quantized:
        qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
        if qc:
            raise FP8VLError(
                f"{path / 'config.json'}: already quantized (quantization_config with quant_method "
                f"{qc.get('quant_method')!r}); fp8vl quantizes BF16/FP16/FP32 checkpoints. "
                f"Run `fp8vl dequantize {path} BF16_DIR` first to start from this one.")
        for t in tensors.values():
            if t.dtype.startswith("F8") or t.name.endswith(SCALE_SUFFIXES):
                raise FP8VLError(
                    f"{t.file}: tensor {t.name} is already quantized ({t.dtype}); "
                    f"run `fp8vl dequantize` first to start from this checkpoint.")
    weight_files = tuple(files) + ((index,) if index.is_file() else ())
    return Checkpoint(path, config, tensors, weight_files)


def check_dtypes(ckpt: Checkpoint, names: list[str]) -> None:
    """The tensors to quantize must be floating point in a width fp8vl reads."""
    for n in names:
        t = ckpt.tensors[n]
        if t.dtype not in FLOAT_SOURCES:
            raise FP8VLError(f"{t.file}: tensor {n} is {t.dtype}; fp8vl quantizes BF16, FP16 or FP32 "
                             f"weights. Exclude it with --ignore {n.removesuffix('.weight')} or convert it.")
