"""GPUs fp8vl plans for: memory, compute capability, and what FP8 path vLLM takes on each."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FP8VLError
from ..options import gpu_driver_present   # noqa: F401  (here too: where the GPU facts are)

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int           # bytes
    cc: tuple[int, int]   # compute capability


# Memory as the driver reports it (GiB); capability from the vendor's tables.
KNOWN = {
    "rtx 4060 ti": GPU("RTX 4060 Ti 16GB", 16 * GIB, (8, 9)),
    "rtx 4070": GPU("RTX 4070", 12 * GIB, (8, 9)),
    "rtx 4070 ti": GPU("RTX 4070 Ti", 12 * GIB, (8, 9)),
    "rtx 4070 ti super": GPU("RTX 4070 Ti SUPER", 16 * GIB, (8, 9)),
    "rtx 4080": GPU("RTX 4080", 16 * GIB, (8, 9)),
    "rtx 4080 super": GPU("RTX 4080 SUPER", 16 * GIB, (8, 9)),
    "rtx 4090": GPU("RTX 4090", 24 * GIB, (8, 9)),
    "rtx 5070 ti": GPU("RTX 5070 Ti", 16 * GIB, (12, 0)),
    "rtx 5080": GPU("RTX 5080", 16 * GIB, (12, 0)),
    "rtx 5090": GPU("RTX 5090", 32 * GIB, (12, 0)),
    "rtx 3060": GPU("RTX 3060", 12 * GIB, (8, 6)),
    "rtx 3080": GPU("RTX 3080", 10 * GIB, (8, 6)),
    "rtx 3090": GPU("RTX 3090", 24 * GIB, (8, 6)),
    "rtx a6000": GPU("RTX A6000", 48 * GIB, (8, 6)),
    "rtx 6000 ada": GPU("RTX 6000 Ada", 48 * GIB, (8, 9)),
    "a10g": GPU("A10G", 24 * GIB, (8, 6)),
    "l4": GPU("L4", 24 * GIB, (8, 9)),
    "l40s": GPU("L40S", 48 * GIB, (8, 9)),
    "t4": GPU("T4", 16 * GIB, (7, 5)),
    "a100 40gb": GPU("A100 40GB", 40 * GIB, (8, 0)),
    "l40": GPU("L40", 48 * GIB, (8, 9)),
    "a100": GPU("A100 80GB", 80 * GIB, (8, 0)),
    "h100": GPU("H100 80GB", 80 * GIB, (9, 0)),
    "h200": GPU("H200", 141 * GIB, (9, 0)),
}


def _words(text: str) -> list[str]:
    return text.lower().replace("-", " ").replace("_", " ").split()


def lookup(name: str) -> GPU:
    """A known GPU from a user's or the driver's name ("NVIDIA GeForce RTX 4080 SUPER",
    "NVIDIA A100-SXM4-40GB"): the key whose words all appear in the name, the most words winning."""
    words = set(_words(name)) - {"nvidia", "geforce"}
    hits = [k for k in KNOWN if set(_words(k)) <= words]
    if hits:
        return KNOWN[max(hits, key=lambda k: len(_words(k)))]
    raise FP8VLError(f"unknown GPU {name!r}; give its memory instead (--vram 16GiB) or one of: "
                     + ", ".join(g.name for g in KNOWN.values()))


def local_gpu() -> GPU | None:
    """The first CUDA GPU, as PyTorch sees it; None without one."""
    if not gpu_driver_present():
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        p = torch.cuda.get_device_properties(0)
        return GPU(p.name, p.total_memory, (p.major, p.minor))
    except Exception:
        return None


def fp8_verdict(cc: tuple[int, int] | None) -> tuple[str, str]:
    """(short verdict, explanation) for running an FP8 block checkpoint in vLLM."""
    if cc is None:
        return "unknown", "compute capability unknown: FP8 W8A8 needs 8.9+, weight-only FP8 8.0+"
    if cc >= (8, 9):
        return "fp8 w8a8", f"CC {cc[0]}.{cc[1]}: FP8 tensor cores, W8A8 block kernels (full speed-up)"
    if cc >= (8, 0):
        return "fp8 weight-only", (f"CC {cc[0]}.{cc[1]}: no FP8 tensor cores; vLLM runs the weights through "
                                   "its weight-only FP8 (Marlin) path: memory savings, little speed-up")
    return "unsupported", f"CC {cc[0]}.{cc[1]}: vLLM's FP8 paths need 8.0+; use the BF16 model or another GPU"


def bf16_verdict(cc: tuple[int, int] | None) -> tuple[str, str]:
    """(short verdict, explanation) for a checkpoint without FP8 weights (BF16, FP16, ...)."""
    if cc is None:
        return "unknown", "compute capability unknown: BF16 weights need 8.0+; no FP8 path involved"
    if cc >= (8, 0):
        return "bf16", (f"CC {cc[0]}.{cc[1]}: runs the BF16 weights as they are; no FP8 path involved "
                        "(`fp8vl quantize` first to serve an FP8 copy)")
    return "no bf16", f"CC {cc[0]}.{cc[1]}: no BF16 support; vLLM needs --dtype float16 on this GPU"
