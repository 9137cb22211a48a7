"""Which tensor-parallel sizes vLLM can start an FP8 block checkpoint with.

vLLM splits column-parallel linears (q/k/v, gate/up, experts' gate/up) along N and row-parallel
ones (o_proj, down_proj, experts' down) along K; each rank's slice must stay a multiple of the
128 block, or start-up fails with "... is not divisible by block_n = 128". KV heads fewer than the
TP size are replicated (one head per rank). Fused MoE experts split their intermediate size the
same way unless expert parallelism is on, which keeps experts whole.
"""

from __future__ import annotations

import re

from .formats import BLOCK

SIZES = (1, 2, 4, 8)
ROW = re.compile(r"(o_proj|down_proj|attn\.proj|linear_fc2|out_proj|fc2|w2|dense)$")
COL = re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv|linear_fc1|in_proj\w*|fc1|w1|w3|gate_up_proj)$")
EXPERT = re.compile(r"\.experts\.\d+\.")
KV = re.compile(r"(k_proj|v_proj)$")


def _per_rank(size: int, tp: int, what: str, name: str) -> str | None:
    if size % tp:
        return f"{name}: {what} {size} does not split into {tp} equal parts"
    if (size // tp) % BLOCK:
        return f"{name}: {what} per rank {size}/{tp} = {size // tp} is not a multiple of {BLOCK}"
    return None


def _problem(module: str, n: int, k: int, tp: int, kv_heads: int | None, head_dim: int | None) -> str | None:
    if ROW.search(module):
        return _per_rank(k, tp, "K", module)
    if COL.search(module):
        if KV.search(module) and kv_heads and head_dim and kv_heads < tp:
            return None if head_dim % BLOCK == 0 else f"{module}: replicated KV head of {head_dim} rows"
        return _per_rank(n, tp, "N", module)
    return None  # unknown role: replicated in vLLM


def tp_report(config: dict, linears: dict[str, tuple[int, int]], sizes_to_check: tuple[int, ...] = SIZES) -> dict:
    """{"sizes": {tp: [problems]}, "max_tp": int, "expert_parallel_beyond": int | None}.

    ``linears`` maps FP8 module names to their [N, K] weight shapes.
    """
    tc = config.get("text_config") or config
    kv_heads, head_dim = tc.get("num_key_value_heads"), tc.get("head_dim")
    if head_dim is None and tc.get("hidden_size") and tc.get("num_attention_heads"):
        head_dim = tc["hidden_size"] // tc["num_attention_heads"]
    sizes: dict[int, list[str]] = {}
    dense_ok: dict[int, bool] = {}
    for tp in sizes_to_check:
        problems, dense = [], True
        heads = tc.get("num_attention_heads")
        if heads and heads % tp:
            problems.append(f"{heads} attention heads do not split into {tp} equal parts")
        for module, (n, k) in linears.items():
            p = _problem(module, n, k, tp, kv_heads, head_dim)
            if p:
                problems.append(p)
                dense = dense and bool(EXPERT.search(module))
        sizes[tp] = problems
        dense_ok[tp] = dense
    max_tp = 0
    for tp in sorted(sizes_to_check):  # the largest TP with every smaller size fitting too
        if sizes[tp]:
            break
        max_tp = tp
    # With expert parallelism experts stay whole: only the non-expert linears must split.
    ep = [tp for tp in sizes_to_check if sizes[tp] and dense_ok[tp]]
    return {"sizes": sizes, "max_tp": max_tp,
            "expert_parallel_beyond": max_tp if ep and any(EXPERT.search(m) for m in linears) else None}


def summarize(report: dict) -> str:
    ok = [str(tp) for tp, p in report["sizes"].items() if not p]
    bad = {tp: p for tp, p in report["sizes"].items() if p}
    line = f"tensor parallel: TP in {{{', '.join(ok)}}} fits the 128 blocks" if ok else \
        "tensor parallel: no TP size fits the 128 blocks"
    if bad:
        tp, probs = min(bad.items())
        line += f"; TP={tp} fails ({probs[0]}{f' and {len(probs) - 1} more' if len(probs) > 1 else ''})"
    if report["expert_parallel_beyond"] is not None:
        line += (f"; beyond TP={report['expert_parallel_beyond']} use expert parallelism "
                 f"(vllm serve --enable-expert-parallel)")
    return line
