"""``fp8vl doctor``: what is installed, whether it fits, and the fix for each problem."""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..serving.gpus import GIB, fp8_verdict, gpu_driver_present, local_gpu
from ..serving.serve import INSTALL

MIN = {"transformers": (5, 0), "torch": (2, 4), "vllm": (0, 11)}  # what fp8vl is tested with; Qwen3-VL in vLLM


@dataclass
class Finding:
    level: str      # ok / warning / error
    what: str
    detail: str
    fix: str = ""


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _package(name: str, required: bool, why: str, install: str = "") -> Finding:
    """``install``: the command when it is missing (default: pip install the package itself)."""
    v = _version(name)
    need = MIN.get(name)
    if v is None:
        level = "error" if required else "warning"
        return Finding(level, name, "not installed", install or (f"pip install '{name}>={'.'.join(map(str, need))}'"
                       if need else f"pip install {name}" + (f"  ({why})" if why else "")))
    if need and _tuple(v) < need:
        return Finding("error", name, f"{v} is older than {'.'.join(map(str, need))} ({why})",
                       f"pip install -U '{name}>={'.'.join(map(str, need))}'")
    return Finding("ok", name, v)


def _torch_cuda_build() -> str | None:
    """torch's CUDA version (None: a CPU build). With a GPU driver present torch is imported (the GPU
    check needs it anyway, and so a broken install shows); without one, the value is read from
    torch/version.py, because importing torch takes seconds."""
    spec = importlib.util.find_spec("torch")
    if gpu_driver_present() or spec is None or not spec.origin:
        import torch

        return torch.version.cuda
    tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "cuda" and node.value is not None:
            return ast.literal_eval(node.value)
    raise ImportError(f"{spec.origin}: no cuda entry in torch/version.py")


def diagnose(output_dir: Path = Path("."), need_bytes: int = 0) -> list[Finding]:
    f: list[Finding] = []
    py = sys.version_info
    f.append(Finding("ok" if py >= (3, 10) else "error", "python", sys.version.split()[0],
                     "" if py >= (3, 10) else "use Python 3.10 or newer"))
    f.append(_package("torch", True, "FP8 dtypes"))
    f.append(_package("transformers", True, "fp8vl is tested with Transformers 5 (5.17 and 5.24)"))
    f.append(_package("vllm", False, "needed for `fp8vl serve`",
                      INSTALL["vllm"] + "; `fp8vl verify --vllm/--sglang` can also use an engine in its own venv: "
                                        "--engine-python PATH"))
    f.append(_package("compressed-tensors", False, "needed to load --format compressed-tensors outside vLLM"))
    try:
        cuda = _torch_cuda_build()
        f.append(Finding("ok", "torch CUDA build", cuda or "CPU-only build",
                         "" if cuda else "a CPU build quantizes fine; install a CUDA build to run models on a GPU"))
    except Exception as e:  # a broken torch install
        f.append(Finding("error", "torch", f"import failed: {e}", "reinstall torch"))
    gpu = local_gpu()
    if gpu is None:
        f.append(Finding("warning", "GPU", "no CUDA GPU visible",
                         "quantize/verify/eval work on CPU; serving FP8 needs an NVIDIA GPU with CC >= 8.0"))
    else:
        verdict, why = fp8_verdict(gpu.cc)
        f.append(Finding("ok" if verdict == "fp8 w8a8" else "warning" if verdict != "unsupported" else "error",
                         "GPU", f"{gpu.name}, {gpu.memory / GIB:.1f} GiB, {why}"))
    try:
        import psutil

        vm = psutil.virtual_memory()
        f.append(Finding("ok" if vm.total >= 4 * GIB else "warning", "RAM",
                         f"{vm.total / GIB:.1f} GiB total, {vm.available / GIB:.1f} GiB available",
                         "" if vm.total >= 4 * GIB else "quantize streams, but loading models for eval needs more"))
    except ImportError:
        pass
    probe = output_dir if output_dir.exists() else output_dir.parent
    free = shutil.disk_usage(probe if probe.exists() else Path(".")).free
    ok = free >= need_bytes
    f.append(Finding("ok" if ok else "error", "disk", f"{free / 1e9:.1f} GB free at {probe.resolve()}"
                     + (f", {need_bytes / 1e9:.1f} GB needed" if need_bytes else ""),
                     "" if ok else "free space or choose another output folder"))
    return f
