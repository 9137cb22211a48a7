"""Which tensor-parallel sizes vLLM can start an FP8 block checkpoint with, by vLLM 0.33's rules.

Read from vLLM 0.33.0 (``linear.py``, ``quantization/utils/fp8_utils.py``,
``fused_moe/oracle/fp8.py``) and checked against vLLM itself on CPU (``fp8vl verify --vllm``).
For TP size t and 128x128 blocks:

- attention heads (text and vision) must split into t equal parts; KV heads fewer than t are
  replicated (t must then be a multiple of them), else they split too;            -> build fails
- row-parallel linears (o_proj, down_proj) split K: K / t must be a multiple of 128; -> build fails
- column-parallel linears split N. vLLM merges q/k/v into ``qkv_proj`` and gate/up into
  ``gate_up_proj``; each part's N / t must be a multiple of 128. Format ``fp8``: vLLM skips this
  check for a merged layer whose parts do not fit (``allow_fp8_block_shape_mismatch``), builds,
  and fails at load on the scales (``v_proj.weight_scale_inv``: start + length exceeds dimension
  size);                                                                  -> load fails.
  compressed-tensors checks it:                                          -> build fails
- MoE experts split their intermediate size I: I / t must be a multiple of 128. Format ``fp8``:
  otherwise vLLM refines the expert scale blocks to g x g with g = gcd(128, I / t, hidden) when
  g >= 32 (``resolve_fp8_moe_weight_block_shape``; only its Triton MoE kernels take refined blocks)
  and loads; compressed-tensors has no refinement.                        -> build fails
  With expert parallelism (``--enable-expert-parallel``) experts stay whole.
"""

from __future__ import annotations

import math
import re

from .formats import BLOCK, text_config

VLLM_RULES = "0.33"           # the vLLM release these rules are read from
SIZES = (1, 2, 4, 8)
MIN_REFINED_BLOCK = 32        # vLLM refines MoE scale blocks down to 32, no further
ROW = re.compile(r"(o_proj|down_proj|attn\.proj|linear_fc2|out_proj|fc2|w2|dense)$")
COL = re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv|linear_fc1|in_proj\w*|fc1|w1|w3|gate_up_proj)$")
MERGED = re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)$")   # parts of qkv_proj / gate_up_proj
EXPERT = re.compile(r"\.experts\.\d+\.")
KV = re.compile(r"(k_proj|v_proj)$")


def _fmt(config: dict, fmt: str | None) -> str:
    if fmt:
        return fmt
    qc = config.get("quantization_config") or {}
    return "compressed-tensors" if qc.get("quant_method") == "compressed-tensors" else "fp8"


def _split(size: int, tp: int, what: str, name: str) -> tuple[str, int | None]:
    """(problem or "", per-rank size)."""
    if size % tp:
        return f"{name}: {what} {size} does not split into {tp} equal parts", None
    return "", size // tp


def _heads(config: dict, tp: int) -> list[str]:
    tc = text_config(config)
    out = []
    heads, kv = tc.get("num_attention_heads"), tc.get("num_key_value_heads")
    if heads and heads % tp:
        out.append(f"{heads} attention heads do not split into {tp} equal parts")
    if kv and tp > 1 and (tp % kv if kv <= tp else kv % tp):
        out.append(f"{kv} KV heads neither split into nor replicate evenly over {tp} ranks")
    vc = config.get("vision_config") or {}
    vheads = vc.get("num_heads") or vc.get("num_attention_heads")
    if vheads and vheads % tp:
        out.append(f"{vheads} vision attention heads do not split into {tp} equal parts")
    return out


def _linear(module: str, n: int, k: int, tp: int, fmt: str, kv_heads: int | None, head_dim: int | None,
            hidden: int | None) -> tuple[str, str, str]:
    """(problem, phase "build"/"load", note) for one FP8 linear at TP ``tp``; empty strings if fine."""
    if EXPERT.search(module):
        if ROW.search(module):       # down_proj [hidden, I]: its K is the expert intermediate size
            return "", "", ""        # judged with gate/up, which share I
        problem, per = _split(n, tp, "expert intermediate size", module)
        if problem:
            return problem, "build", ""
        if per % BLOCK == 0:
            return "", "", ""
        g = math.gcd(BLOCK, per, hidden or BLOCK)
        if fmt == "fp8" and g >= MIN_REFINED_BLOCK:
            return "", "", f"experts {per} wide per rank, scale blocks refined to {g}x{g}"
        return f"{module}: expert intermediate size per rank {n}/{tp} = {per} is not a multiple of {BLOCK}" \
               + ("" if fmt != "fp8" else f" (refinement needs gcd(128, {per}, {hidden}) = {g} >= 32)"), "build", ""
    if ROW.search(module):
        problem, per = _split(k, tp, "K", module)
        if problem:
            return problem, "build", ""
        if tp > 1 and per % BLOCK:
            return f"{module}: K per rank {k}/{tp} = {per} is not a multiple of {BLOCK}", "build", ""
        return "", "", ""
    if not COL.search(module) or tp == 1:
        return "", "", ""            # unknown role: replicated in vLLM; TP 1 splits nothing
    if KV.search(module) and kv_heads and head_dim and kv_heads < tp:
        per, what = head_dim, f"replicated KV head of {head_dim} rows"
        if per % BLOCK == 0:
            return "", "", ""
        problem = f"{module}: {what} is not a multiple of {BLOCK}"
    else:
        problem, per = _split(n, tp, "N", module)
        if problem:
            return problem, "build", ""
        if per % BLOCK == 0:
            return "", "", ""
        problem = f"{module}: N per rank {n}/{tp} = {per} is not a multiple of {BLOCK}"
    if MERGED.search(module) and fmt == "fp8":
        return problem + " (vLLM builds the merged layer, then fails loading its scales)", "load", ""
    return problem, "build", ""


def tp_report(config: dict, linears: dict[str, tuple[int, int]], sizes_to_check: tuple[int, ...] = SIZES,
              fmt: str | None = None) -> dict:
    """{"sizes": {tp: [problems]}, "phase": {tp: "build"|"load"|None}, "notes": {tp: [notes]},
    "max_tp": int, "expert_parallel_beyond": int | None, "format": str, "vllm": VLLM_RULES}.

    ``linears`` maps FP8 module names to their [N, K] weight shapes; ``fmt`` defaults to the one
    config.json's quantization_config names ("fp8" without one).
    """
    fmt = _fmt(config, fmt)
    tc = text_config(config)
    kv_heads, head_dim, hidden = tc.get("num_key_value_heads"), tc.get("head_dim"), tc.get("hidden_size")
    if head_dim is None and hidden and tc.get("num_attention_heads"):
        head_dim = hidden // tc["num_attention_heads"]
    sizes: dict[int, list[str]] = {}
    phase: dict[int, str | None] = {}
    notes: dict[int, list[str]] = {}
    experts_only: dict[int, bool] = {}
    for tp in sizes_to_check:
        found = [("build", p) for p in _heads(config, tp)]
        dense_ok, tp_notes = not found, []
        for module, (n, k) in linears.items():
            p, ph, note = _linear(module, n, k, tp, fmt, kv_heads, head_dim, hidden)
            if p:
                found.append((ph, p))
                dense_ok = dense_ok and bool(EXPERT.search(module))
            if note and note not in tp_notes:
                tp_notes.append(note)
        found.sort(key=lambda f: f[0] != "build")   # what fails at build comes first: vLLM stops there
        sizes[tp], notes[tp], experts_only[tp] = [p for _, p in found], tp_notes, dense_ok
        phase[tp] = found[0][0] if found else None
    max_tp = 0
    for tp in sorted(sizes_to_check):  # the largest TP with every smaller size fitting too
        if sizes[tp]:
            break
        max_tp = tp
    # With expert parallelism experts stay whole: only the non-expert linears must split.
    ep = [tp for tp in sizes_to_check if sizes[tp] and experts_only[tp]]
    return {"sizes": sizes, "phase": phase, "notes": notes, "max_tp": max_tp, "format": fmt, "vllm": VLLM_RULES,
            "expert_parallel_beyond": max_tp if ep and any(EXPERT.search(m) for m in linears) else None}


def summarize(report: dict) -> str:
    ok = [str(tp) for tp, p in report["sizes"].items() if not p]
    bad = {tp: p for tp, p in report["sizes"].items() if p}
    rules = f"tensor parallel (vLLM {report.get('vllm', VLLM_RULES)} rules)"
    line = f"{rules}: TP in {{{', '.join(ok)}}} fits the 128 blocks" if ok else \
        f"{rules}: no TP size fits the 128 blocks"
    if bad:
        tp, probs = min(bad.items())
        at = report.get("phase", {}).get(tp) or "build"
        line += f"; TP={tp} fails at {at} ({probs[0]}{f' and {len(probs) - 1} more' if len(probs) > 1 else ''})"
    refined = [f"TP {tp}: {n[0]}" for tp, n in report.get("notes", {}).items() if n and not report["sizes"][tp]]
    if refined:
        line += f"; {'; '.join(refined)} (vLLM's Triton MoE kernels)"
    if report["expert_parallel_beyond"] is not None:
        line += (f"; beyond TP={report['expert_parallel_beyond']} use expert parallelism "
                 f"(vllm serve --enable-expert-parallel)")
    return line
