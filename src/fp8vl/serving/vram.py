"""``fp8vl plan``: will this checkpoint fit this GPU under vLLM, and with which flags?

The arithmetic follows vLLM's own accounting: of ``gpu_memory_utilization x VRAM`` it takes the
weights, the peak activations of a profiling forward pass (language model at
``max_num_batched_tokens`` tokens, vision encoder on the largest image, sampler logits), non-torch
memory and CUDA graphs; what is left holds the KV cache. Constants are estimates and are shown
in the table, so a user can check or adjust them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FP8VLError
from ..checkpoint.formats import text_config
from .gpus import GIB, GPU, bf16_verdict, fp8_verdict
from ..checkpoint.source import open_checkpoint
from ..checkpoint.tp import SIZES, summarize, tp_report

NON_TORCH = int(0.6 * GIB)    # CUDA context, NCCL and allocator slack outside PyTorch's pool
CUDA_GRAPHS = int(0.5 * GIB)  # captured decode graphs (0 with --enforce-eager)
BLOCK_TOKENS = 16             # vLLM's KV block size


@dataclass
class VramPlan:
    model: str
    gpu: GPU
    tp: int
    utilization: float
    max_pixels: int
    images_per_prompt: int
    max_num_batched_tokens: int
    kv_cache_dtype: str
    rows: list[tuple[str, str, int]] = field(default_factory=list)   # (item, how, bytes) per GPU
    kv_bytes_per_token: int = 0
    kv_tokens: int = 0
    max_model_len: int = 0
    max_num_seqs: int = 0
    context_limit: int = 0
    verdict: tuple[str, str] = ("", "")
    tp_line: str = ""
    vision_tokens: int = 0        # language-model tokens one prompt's images take (0: text model)

    @property
    def kv_budget(self) -> int:
        return self.rows[-1][2] if self.rows else 0


def kv_bytes_per_token(config: dict, tp: int, kv_dtype_bytes: int) -> int:
    """layers x KV heads per rank x head dim x 2 (K and V) x bytes."""
    tc = text_config(config)
    heads = tc.get("num_key_value_heads") or tc["num_attention_heads"]
    head_dim = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    per_rank = max(1, heads // tp)   # fewer KV heads than ranks: replicated, one per rank
    return tc["num_hidden_layers"] * per_rank * head_dim * 2 * kv_dtype_bytes


def plan_vram(model_dir: str | Path, gpu: GPU, tp: int = 1, utilization: float = 0.9,
              max_pixels: int = 512 * 512, images_per_prompt: int = 1, max_num_batched_tokens: int = 4096,
              kv_cache_dtype: str = "auto", enforce_eager: bool = False, typical_tokens: int = 1024) -> VramPlan:
    path = Path(model_dir)
    ckpt = open_checkpoint(path, allow_quantized=True)
    config = ckpt.config
    if not 0.1 <= utilization <= 0.99:
        raise FP8VLError("--gpu-memory-utilization must be between 0.1 and 0.99")
    tc = text_config(config)
    vc = config.get("vision_config") or {}
    p = VramPlan(str(path), gpu, tp, utilization, max_pixels, images_per_prompt, max_num_batched_tokens,
                 kv_cache_dtype)
    fp8 = sum(t.nbytes for t in ckpt.tensors.values() if t.dtype.startswith("F8"))
    other = sum(t.nbytes for t in ckpt.tensors.values()) - fp8
    budget = int(gpu.memory * utilization)
    hidden, inter = tc["hidden_size"], tc.get("intermediate_size") or 4 * tc["hidden_size"]
    vocab = tc.get("vocab_size") or config.get("vocab_size", 0)
    lm_act = max_num_batched_tokens * (4 * hidden + 3 * inter // tp) * 2
    rows = [("budget", f"{gpu.memory / GIB:.1f} GiB x {utilization}", budget)]
    if fp8:
        rows += [("FP8 weights", f"{fp8 / GIB:.2f} GiB of FP8 tensors / TP {tp}", -fp8 // tp),
                 ("BF16 weights", f"{other / GIB:.2f} GiB (vision, embeddings, head, norms, scales) / TP {tp}",
                  -other // tp)]
    else:  # a BF16 (FP16, FP32) checkpoint: no FP8 tensors at all
        dtypes = ", ".join(sorted({t.dtype for t in ckpt.tensors.values()}))
        rows.append(("weights", f"{other / GIB:.2f} GiB ({dtypes}; no FP8 tensors) / TP {tp}", -other // tp))
    rows.append(("LM activations", f"{max_num_batched_tokens} tokens x (4 x {hidden} + 3 x {inter}/TP) x 2 B",
                 -lm_act))
    if vc:
        patch = vc.get("patch_size", 14)
        merge = vc.get("spatial_merge_size", 2)
        vh = vc.get("hidden_size", 1152)
        vi = vc.get("intermediate_size", 4 * vh)
        patches = images_per_prompt * max_pixels // (patch * patch)
        enc = patches * (6 * vh + vi) * 2 * 2
        rows.append(("vision encoder", f"{patches} patches ({images_per_prompt} x {max_pixels} px / {patch}^2) "
                                       f"x (6 x {vh} + {vi}) x 2 B x 2", -enc))
        p.vision_tokens = patches // (merge * merge)
    rows.append(("sampler logits", f"256 x {vocab} x 4 B (float32)", -256 * vocab * 4))
    rows.append(("non-torch memory", "CUDA context, allocator slack", -NON_TORCH))
    rows.append(("CUDA graphs", "0 with --enforce-eager" if enforce_eager else "decode graphs",
                 0 if enforce_eager else -CUDA_GRAPHS))
    kv_budget = sum(r[2] for r in rows)
    rows.append(("KV cache", "what is left", kv_budget))
    p.rows = rows
    kv_bytes = 1 if kv_cache_dtype == "fp8" else 2
    p.kv_bytes_per_token = kv_bytes_per_token(config, tp, kv_bytes)
    p.kv_tokens = max(0, kv_budget) // p.kv_bytes_per_token // BLOCK_TOKENS * BLOCK_TOKENS
    p.context_limit = int(tc.get("max_position_embeddings") or 32768)
    p.max_model_len = min(p.kv_tokens, p.context_limit) // 1024 * 1024
    p.max_num_seqs = max(1, min(256, p.kv_tokens // typical_tokens))
    p.verdict = fp8_verdict(gpu.cc) if fp8 else bf16_verdict(gpu.cc)
    fp8_linears = {n.rsplit(".", 1)[0]: (t.shape[0], t.shape[1]) for n, t in ckpt.tensors.items()
                   if t.dtype == "F8_E4M3" and len(t.shape) == 2}
    larger_tp = [s for s in SIZES if s > tp]   # TP sizes to suggest when it does not fit: those that start
    if fp8_linears:
        rep = tp_report(config, fp8_linears, tuple(sorted({*SIZES, tp})))
        p.tp_line = summarize(rep)
        if rep["sizes"].get(tp):
            raise FP8VLError(f"--tp {tp}: {rep['sizes'][tp][0]}; vLLM would fail at start-up. {p.tp_line}")
        larger_tp = [s for s in larger_tp if not rep["sizes"].get(s)]
    if p.max_model_len < 1024:
        fixes = ["a bigger GPU"] + [f"--tp {s}" for s in larger_tp[:1]]
        fixes += ["--kv-cache-dtype fp8"] * (kv_cache_dtype != "fp8") + ["a smaller --max-pixels"] * bool(vc)
        raise FP8VLError(
            f"{path.name} does not fit {gpu.name} ({gpu.memory / GIB:.0f} GiB) at utilization {utilization}: "
            f"{-kv_budget / GIB if kv_budget < 0 else kv_budget / GIB:.2f} GiB "
            f"{'short' if kv_budget < 0 else 'left'} for the KV cache (needs >= 1024 tokens). "
            f"Use {' or '.join(fixes) if len(fixes) < 3 else ', '.join(fixes[:-1]) + ' or ' + fixes[-1]}"
            + (f" ({p.tp_line})" if p.tp_line and not larger_tp and tp < SIZES[-1] else "") + ".")
    return p


def vllm_args(p: VramPlan, enforce_eager: bool = False) -> list[str]:
    """The flags for ``vllm serve`` that make it run within the plan."""
    args = ["--max-model-len", str(p.max_model_len), "--gpu-memory-utilization", str(p.utilization),
            "--max-num-seqs", str(p.max_num_seqs), "--max-num-batched-tokens", str(p.max_num_batched_tokens)]
    if p.tp > 1:
        args += ["--tensor-parallel-size", str(p.tp)]
    if p.kv_cache_dtype == "fp8":
        args += ["--kv-cache-dtype", "fp8"]
    if p.vision_tokens:
        args += ["--limit-mm-per-prompt", json.dumps({"image": p.images_per_prompt, "video": 0}),
                 "--mm-processor-kwargs", json.dumps({"max_pixels": p.max_pixels})]
    if enforce_eager:
        args.append("--enforce-eager")
    return args
