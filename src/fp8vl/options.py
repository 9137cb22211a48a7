"""The options objects of ``fp8vl quantize`` and ``dequantize`` (CLI flags mirror their fields one to one),
and where a model runs (``resolve_device``: ``--device`` of ``eval`` and ``caption``)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

from .errors import FP8VLError

FORMATS = ("fp8", "compressed-tensors")
SCALE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class QuantizeOptions:
    format: str = "fp8"                   # "fp8" (Qwen/DeepSeek layout) or "compressed-tensors"
    scale_dtype: str | None = None        # None: float32 for "fp8", the model dtype for compressed-tensors
    ignore: tuple[str, ...] = ()          # extra module patterns kept in BF16 (glob, or "re:REGEX")
    quantize_vision: bool = False         # also quantize vision linears whose K is a multiple of 128
    device: str = "cpu"                   # "cpu" or "cuda": where the quantizer runs
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_shard_size: int = 5 * 10**9       # bytes per output shard (Hugging Face's default is 5 GB)
    overwrite: bool = False
    dry_run: bool = False
    revision: str | None = None           # hub revision when SOURCE is a repo id
    stream: bool | None = None            # hub ids: download into the staging folder and delete each shard once
                                          # written (None: yes unless the repo is already in the local cache)
    in_flight: int = 2                    # hub ids: source shards on disk or downloading at once
    record_error: bool = False            # keep each FP8 tensor's error in fp8vl-errors.json (always done for
                                          # hub ids: their source is not kept; `verify --source` measures it too)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise FP8VLError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise FP8VLError(f"unknown scale dtype {self.scale_dtype!r}; choose {' or '.join(SCALE_DTYPES)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise FP8VLError(f"unknown device {self.device!r}; use cpu or cuda")
        if self.workers < 1:
            raise FP8VLError("workers must be at least 1")
        if self.in_flight < 1:
            raise FP8VLError("--in-flight must be at least 1 (source shards on disk or downloading at once)")
        if self.max_shard_size < 1:
            raise FP8VLError("max shard size must be positive")
        for p in self.ignore:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise FP8VLError(f"--ignore {p!r}: bad regular expression ({e})") from e


def gpu_driver_present() -> bool:
    """False only where no GPU can be visible: Linux without NVIDIA (or ROCm, or WSL2) device nodes.
    Checked before asking PyTorch, whose import alone takes seconds."""
    return not sys.platform.startswith("linux") or any(
        os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))


def resolve_device(device: str) -> str:
    """Where a model runs (``eval``, ``caption --model``): ``auto`` is ``cuda`` where a GPU can be used
    here, else ``cpu``; ``cuda`` (``cuda:N``) only where it can, else one FP8VLError line with the fix;
    ``cpu`` as is. torch is imported for ``auto`` and ``cuda`` only."""
    if device == "cpu":
        return device
    if device not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise FP8VLError(f"unknown device {device!r}; use auto (the GPU if there is one, else the CPU), cpu or cuda")
    why = _cuda_unusable("cuda" if device == "auto" else device)
    if device == "auto":
        return "cpu" if why else "cuda"
    if why:
        raise FP8VLError(f"--device {device}: {why}; run on the CPU with --device cpu (or --device auto, the "
                         f"default: the GPU where there is one, else the CPU)")
    return device


def _cuda_unusable(device: str) -> str | None:
    """Why ``device`` cannot be used here (None: it can). A tensor is put on it: a GPU that PyTorch
    counts but cannot initialise (driver too old, busy in exclusive mode) fails here, not mid-run."""
    if not gpu_driver_present():   # said at once: no torch import (seconds) to learn what the OS shows
        return "no GPU driver here (no NVIDIA, ROCm or WSL device in /dev)"
    import torch

    try:
        if not torch.cuda.is_available():
            return ("this PyTorch is a CPU-only build" if torch.version.cuda is None else
                    "PyTorch sees no CUDA GPU here (no NVIDIA driver, or no GPU visible)")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            return f"there is no GPU {index} (PyTorch sees {torch.cuda.device_count()})"
        torch.zeros(1, device=device)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the GPU cannot be initialised ({first})"
    return None


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536870912, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise FP8VLError(f"cannot read size {text!r}; write it like 5GB, 512MiB or 2000000000")
    base = 1024 if m.group(3) else 1000
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * base**power)


DEQUANT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class DequantizeOptions:
    """The options of ``fp8vl dequantize``; CLI flags mirror its fields."""

    dtype: str = "bfloat16"               # what every FP8 weight becomes
    overwrite: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_shard_size: int = 5 * 10**9

    def __post_init__(self) -> None:
        if self.dtype not in DEQUANT_DTYPES:
            raise FP8VLError(f"--dtype {self.dtype}: choose {', '.join(DEQUANT_DTYPES)}")
        if self.workers < 1:
            raise FP8VLError("workers must be at least 1")
        if self.max_shard_size < 1:
            raise FP8VLError("max shard size must be positive")
