"""Shared test code: an independent FP8 reference written plainly, and file/tensor utilities.

Nothing here imports fp8vl's numerics at import time: the plain reference is what the tests judge
fp8vl against. The GPU kernels' checks (last section) build on fp8vl.kernels.numerics's W8A8 simulation, which
kernels/test_numerics.py judges against that plain reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

FP8 = torch.float8_e4m3fn
TILE = 128
E4M3_MAX = 448.0
ROOT = Path(__file__).resolve().parents[1]
FP8VL = ROOT / ".venv" / "bin" / "fp8vl"
INDEX = "model.safetensors.index.json"
# Bad inputs that must fail with FP8VLError (API) and exit 2 (CLI); built in conftest.bad_inputs.
BAD_CASES = (
    "missing folder", "no config.json", "truncated shard", "corrupt header", "index names missing shard",
    "quantization_config present", "fp8 tensors present", "int32 linear weight", "output inside source",
    "output not empty", "hub repo offline",
)
PROJS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


# ---------------------------------------------------------------- reference numerics

def ref_block_quantize(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """One 128x128 tile at a time: amax in float32, scale = amax/448 (all-zero tile: 1.0) rounded to
    ``scale_dtype``, q = clamp(w / stored_scale, -448, 448) cast to e4m3fn."""
    n, k = w.shape
    rows, cols = -(-n // TILE), -(-k // TILE)
    q = torch.empty(n, k, dtype=FP8)
    s = torch.empty(rows, cols, dtype=scale_dtype)
    for i in range(rows):
        for j in range(cols):
            r, c = slice(i * TILE, (i + 1) * TILE), slice(j * TILE, (j + 1) * TILE)
            tile = w[r, c].to(torch.float32)
            amax = tile.abs().max()
            scale = torch.tensor(1.0, dtype=scale_dtype) if amax == 0 else (amax / E4M3_MAX).to(scale_dtype)
            s[i, j] = scale
            q[r, c] = (tile / scale.to(torch.float32)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q, s


def expand_scales(s: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-tile scale [rows, cols] -> per-element float32 [n, k]."""
    n, k = shape
    out = torch.empty(n, k, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE] = s[i, j].float()
    return out


def ref_dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q * scale per tile, float32."""
    return q.to(torch.float32) * expand_scales(s, tuple(q.shape))


def within_e4m3_bound(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Boolean mask: |w - q*s| <= max(|w| 2^-4, s 2^-10) (+ float32 slack), element by element."""
    w = w.to(torch.float32)
    se = expand_scales(s, tuple(w.shape))
    err = (w - q.to(torch.float32) * se).abs()
    bound = torch.maximum(w.abs() * 2.0**-4, se * 2.0**-10) * (1 + 1e-6)
    return err <= bound


def ref_activation_quantize(x: torch.Tensor):
    """Per token (every leading index) and per group of 128 channels, plainly."""
    k = x.shape[-1]
    flat = x.reshape(-1, k).to(torch.float32)
    q = torch.empty(flat.shape, dtype=FP8)
    s = torch.empty(flat.shape[0], k // TILE, dtype=torch.float32)
    for t in range(flat.shape[0]):
        for g in range(k // TILE):
            grp = flat[t, g * TILE:(g + 1) * TILE]
            amax = grp.abs().max()
            scale = torch.tensor(1.0) if amax == 0 else amax / E4M3_MAX
            s[t, g] = scale
            q[t, g * TILE:(g + 1) * TILE] = (grp / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], k // TILE)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(as_bytes(a), as_bytes(b))


# ---------------------------------------------------------------- checkpoints on disk

def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in ``folder``, read by the safetensors library."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                out[name] = h.get_tensor(name)
    return out


def tensor_files(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                out[name] = f.name
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def language_linears(cfg: dict, moe: bool = False) -> set[str]:
    """Names of the decoder-layer linear weights, from the config alone."""
    n_layers = text_config(cfg)["num_hidden_layers"]
    names = set()
    for n in range(n_layers):
        base = f"model.language_model.layers.{n}"
        names |= {f"{base}.self_attn.{p}.weight" for p in PROJS["self_attn"]}
        if not moe:
            names |= {f"{base}.mlp.{p}.weight" for p in PROJS["mlp"]}
    return names


def expert_slices(gate_up: torch.Tensor, down: torch.Tensor, hidden: int, inter: int, e: int):
    """Expert ``e``'s [out, in] gate, up and down matrices from the fused 3-D tensors, with the axis
    order read off the config's sizes (gate is the first half of the 2I outputs)."""
    if tuple(gate_up.shape[1:]) == (2 * inter, hidden):
        gu = gate_up[e]
    elif tuple(gate_up.shape[1:]) == (hidden, 2 * inter):
        gu = gate_up[e].t()
    else:
        raise AssertionError(f"gate_up_proj shape {tuple(gate_up.shape)} fits no layout")
    if tuple(down.shape[1:]) == (hidden, inter):
        d = down[e]
    elif tuple(down.shape[1:]) == (inter, hidden):
        d = down[e].t()
    else:
        raise AssertionError(f"down_proj shape {tuple(down.shape)} fits no layout")
    return gu[:inter].contiguous(), gu[inter:].contiguous(), d.contiguous()


def astronaut():
    """The astronaut photograph that ships with scikit-image (offline), as RGB PIL."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).convert("RGB")



def _photo(name: str):
    """A photograph that ships with scikit-image, as PIL (boolean images as 0/255)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    a = getattr(data, name)()
    return Image.fromarray(a.astype(np.uint8) * 255 if a.dtype == bool else a)


def _exif_rotated(path: Path) -> Path:
    """A 300x200 (WxH) JPEG, red top-left corner, EXIF orientation 6: shown rotated 90 degrees clockwise."""
    from PIL import Image

    im = _photo("chelsea").convert("RGB").resize((300, 200))
    im.paste((255, 0, 0), (0, 0, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)
    return path


# ---------------------------------------------------------------- the CLI

def cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200", NO_COLOR="1")
    env.pop("FP8VL_DEBUG", None)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = [str(FP8VL)] if FP8VL.exists() else [sys.executable, "-m", "fp8vl.cli"]
    return subprocess.run([*exe, *map(str, args)], capture_output=True, text=True, env=cli_env(),
                          cwd=cwd, timeout=timeout)


def popen_cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    exe = [str(FP8VL)] if FP8VL.exists() else [sys.executable, "-m", "fp8vl.cli"]
    return subprocess.Popen([*exe, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(), cwd=cwd)


# ---------------------------------------------------------------- Triton kernels on the CPU

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _version(v: str) -> tuple[int, int]:
    return tuple(int(p) for p in v.split(".")[:2])


def run_under_triton_interpreter(test_file: str) -> None:
    """Run ``test_file`` again in a child pytest with TRITON_INTERPRET=1 (Triton reads it when it is
    first imported, so the kernels' CPU tests need a process of their own); fail with its output.
    Skipped where Triton's interpreter cannot run the kernels: before Triton 3.7 it hands a loop a
    one-element array as its bound, which NumPy 2.4 no longer turns into a number."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} "
                    "(needs Triton >= 3.7 or NumPy < 2.4)")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                       cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bytes (NaN codes and -0 included)."""
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---------------------------------------------------------------- GPU kernels: shared by the GPU and interpreter tests

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def qwen3_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' Qwen3(-VL) RMSNorm, unfused: float32 normalization, rounded to x's dtype, times w."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What a W8A8 server computes for x [M, K] and FP8 weight q [N, K] with block scales s, in float32
    (on a GPU, with TF32 off): activations quantized per token and 128 channels, weights dequantized
    -> [M, N]."""
    from fp8vl.kernels.numerics import dequantize_weight, fake_quantize_activations

    return fake_quantize_activations(x.float()) @ dequantize_weight(q, s, torch.float32).t()


def fp8_weight(n: int, k: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random [n, k] weight (std 0.02, as in a model) quantized by fp8vl: (codes, block scales)."""
    from fp8vl.kernels.numerics import quantize_weight

    g = torch.Generator(device).manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=g, device=device) * 0.02)


def grouped_gemm_case(experts: int, n: int, k: int, ids: list[int], device: str = "cpu"):
    """gemm.fp8_grouped_gemm on ``len(ids)`` bf16 rows, row r routed to expert ids[r] (-1: none) of
    ``experts`` random FP8 weights [n, k] -> (y [rows, n], each row's W8A8 reference or None)."""
    from fp8vl.kernels import gemm

    weights = [fp8_weight(n, k, e, device) for e in range(experts)]
    g = torch.Generator(device).manual_seed(experts)
    x = torch.randn(len(ids), k, generator=g, device=device).to(torch.bfloat16)
    xq, xs = gemm.quantize_activations_gpu(x)
    y = gemm.fp8_grouped_gemm(xq, xs, torch.stack([q for q, _ in weights]), torch.stack([s for _, s in weights]),
                              torch.tensor(ids, device=device))
    return y, [None if e < 0 else w8a8_reference(x[r:r + 1], *weights[e])[0] for r, e in enumerate(ids)]


def pad_tokens(t: torch.Tensor, n_pad: int, dim: int = 1) -> torch.Tensor:
    """``t`` with zeros appended along its token axis ``dim`` up to ``n_pad`` positions: what the
    engine's prefill graphs read past a prompt."""
    shape = list(t.shape)
    shape[dim] = n_pad - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)
