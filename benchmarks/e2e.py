"""End to end on the GPU: Qwen3-VL-8B's language model, random weights at real shapes, BF16 vs FP8.

One decode loop for both, made fast the gpt-fast way (static KV cache, the whole decode step
captured in a CUDA graph) so that the linears are what differs: the same model object is timed
with BF16 ``nn.Linear``s, then with every decoder linear swapped for fp8vl's ``FP8Linear``
(scaled_mm / Triton decode kernel), quantized from the very same weights. Embeddings and lm_head
stay BF16, as in fp8vl's checkpoints. The decoder is a compact re-statement of Qwen3's text
architecture (RMSNorm, q/k norm, RoPE, GQA attention, SwiGLU); the vision tower is not run.

    python benchmarks/e2e.py --layers 36
"""

from __future__ import annotations

import argparse
import time


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    return ap.parse_args()


if __name__ == "__main__":
    arguments()   # --help and a bad argument answer here, before torch and fp8vl load (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fp8vl.runtime.engine import capture_graph  # noqa: E402
from fp8vl.kernels.numerics import quantize_weight  # noqa: E402
from fp8vl.runtime.fp8_modules import FP8Linear  # noqa: E402

H, I, HEADS, KV, HD, VOCAB = 4096, 12288, 32, 8, 128, 151936


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(H), RMSNorm(H)
        # q/k/v and gate/up fused into one matrix each, as gpt-fast and vLLM run them: one GEMM
        # (and, for FP8, one activation quantization) per shared input. Rows stay whole 128-blocks,
        # so quantizing the fused matrix equals quantizing its parts.
        self.qkv_proj = nn.Linear(H, (HEADS + 2 * KV) * HD, bias=False)
        self.o_proj = nn.Linear(HEADS * HD, H, bias=False)
        self.q_norm, self.k_norm = RMSNorm(HD), RMSNorm(HD)
        self.gate_up_proj = nn.Linear(H, 2 * I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x, cos, sin, pos, kc, vc, prefill: bool):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q, k, v = self.qkv_proj(h).split([HEADS * HD, KV * HD, KV * HD], -1)
        q = self.q_norm(q.reshape(b, t, HEADS, HD)).transpose(1, 2)
        k = self.k_norm(k.reshape(b, t, KV, HD)).transpose(1, 2)
        v = v.reshape(b, t, KV, HD).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        if prefill:   # from position 0: causal attention over the new keys only
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:         # one token: grouped-query attention over the cache up to and including pos
            qg = q.reshape(b, KV, HEADS // KV, HD)                               # [b, kv, group, hd]
            scores = (qg @ kc.transpose(-1, -2)).float() * HD**-0.5              # [b, kv, group, L]
            valid = torch.arange(kc.shape[2], device=x.device) <= pos
            p = scores.masked_fill(~valid, float("-inf")).softmax(-1).to(vc.dtype)
            a = (p @ vc).reshape(b, HEADS, 1, HD)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, HEADS * HD))
        h = self.post_attention_layernorm(x)
        gate, up = self.gate_up_proj(h).chunk(2, -1)
        return x + self.down_proj(F.silu(gate) * up)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


class Decoder(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, H)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.norm = RMSNorm(H)
        self.lm_head = nn.Linear(H, VOCAB, bias=False)
        inv = 1.0 / (1_000_000 ** (torch.arange(0, HD, 2).float() / HD))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, tokens, pos, caches, prefill=False):
        ang = pos.float()[:, None] * self.inv_freq[None, :]
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        x = self.embed_tokens(tokens)
        for layer, (kc, vc) in zip(self.layers, caches):
            x = layer(x, cos, sin, pos, kc, vc, prefill)
        return self.lm_head(self.norm(x[:, -1:]))


def to_fp8(model: Decoder) -> None:
    """Every decoder linear -> FP8Linear (scaled_mm), quantized from its own BF16 weight."""
    for layer in model.layers:
        for name, mod in list(layer.named_children()):
            if isinstance(mod, nn.Linear):
                q, s = quantize_weight(mod.weight.data)
                setattr(layer, name, FP8Linear(q, s, None, "scaled_mm"))
    torch.cuda.empty_cache()


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def caches_for(model: Decoder, batch: int, length: int):
    shape = (batch, KV, length, HD)
    return [(torch.zeros(shape, dtype=torch.bfloat16, device="cuda"),
             torch.zeros(shape, dtype=torch.bfloat16, device="cuda")) for _ in model.layers]


@torch.no_grad()
def prefill_tps(model: Decoder, tokens: int, reps: int = 5) -> float:
    """Prefill of ``tokens`` tokens at batch 1, captured in a CUDA graph like decode (no Python overhead)."""
    caches = caches_for(model, 1, tokens)
    ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
    pos = torch.arange(tokens, device="cuda")
    graph = capture_graph(lambda: model(ids, pos, caches, prefill=True), warmups=3)[0]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return tokens * reps / (time.perf_counter() - t0)


@torch.no_grad()
def decode_tps(model: Decoder, batch: int, context: int = 1024, steps: int = 128) -> float:
    """Greedy decode steps replayed from one CUDA graph, after a prompt of ``context`` tokens."""
    caches = caches_for(model, batch, context + steps + 16)
    tok = torch.randint(0, VOCAB, (batch, 1), device="cuda")
    pos = torch.tensor([context], device="cuda")
    graph, nxt = capture_graph(lambda: model(tok, pos, caches).argmax(-1), warmups=3)

    def step():
        graph.replay()
        tok.copy_(nxt)
        pos.add_(1)
    for _ in range(5):
        step()
    pos.fill_(context)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def measure(model: Decoder, label: str, batches: list[int], prefill: int) -> dict:
    torch.cuda.synchronize()
    r = {"label": label, "weights_gib": weight_bytes(model) / 2**30, "prefill": prefill_tps(model, prefill)}
    for b in batches:
        r[f"decode_b{b}"] = decode_tps(model, b)
    return r


def main() -> None:
    a = arguments()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(a.layers).to(torch.bfloat16).eval()
    for p in model.parameters():
        if p.ndim == 2:
            p.data.normal_(0, 0.02)
    bf16 = measure(model, "BF16", a.batches, a.prefill)
    to_fp8(model)
    fp8 = measure(model, "FP8 (fp8vl FP8Linear)", a.batches, a.prefill)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; Qwen3-VL-8B language model "
          f"({a.layers} layers), random weights, CUDA-graph decode, context 1024\n")
    print("| | BF16 | FP8 | FP8 / BF16 |")
    print("|---|---|---|---|")
    rows = [("weights (GiB)", "weights_gib"), (f"prefill tokens/s ({a.prefill} tokens)", "prefill")]
    rows += [(f"decode tokens/s, batch {b}", f"decode_b{b}") for b in a.batches]
    for name, key in rows:
        print(f"| {name} | {bf16[key]:.2f} | {fp8[key]:.2f} | {fp8[key] / bf16[key]:.2f}x |")


if __name__ == "__main__":
    main()
