"""fp8vl's generation engine: continuous batching over a static KV cache, decode in CUDA graphs.

The gpt-fast / vLLM recipe, kept small by reusing Transformers where it is not on the hot path:
- **prefill** of one prompt runs the model's own forward (vision tower, DeepStack, M-RoPE position
  logic, FP8 linears; batch 1, so no padding ever enters a result) and its keys/values are copied
  into the prompt's slot of the static cache;
- **decode** of all slots at once runs fp8vl's own restatement of the decoder layer (RMSNorm, fused
  qkv and gate_up linears, q/k norm, rotary from the model's own rotary module, grouped-query SDPA
  over the static cache), captured in one CUDA graph per batch-size bucket on GPUs;
- **continuous batching**: a finished sequence frees its slot, which the next prompt fills at once.
Decoder families: Qwen3-VL (dense and MoE), Qwen2.5-VL, Qwen3, Llama. Others (Gemma 3: sliding window,
other norms) generate through Transformers, one prompt at a time. The CPU runs the same code without
graphs, which is how the tests check it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from .errors import FP8VLError
from .runtime import FP8Experts, FP8Linear

GiB = 1024**3
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class EngineOptions:
    max_len: int = 2048                  # tokens per sequence, prompt + answer (the cache's length)
    max_batch: int | None = None         # sequences decoded together; None: as many as the memory holds
    max_new_tokens: int = 64
    temperature: float = 0.0             # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    cuda_graphs: bool = True             # on CUDA devices
    reserve: int = int(3 * GiB)          # device memory kept free for prefill activations (CUDA)
    prefill_batch: int = 8               # prompts of one length prefilled in one forward
    decode_kernels: bool = True          # fp8vl's Triton decode kernels where they apply (CUDA, bf16)


@dataclass
class Request:
    inputs: dict[str, torch.Tensor]      # what the processor returns for one prompt (batch 1)
    tag: object = None                   # the caller's handle, given back with the result


@dataclass
class _Seq:
    req: Request
    prompt_len: int
    delta: int                           # M-RoPE: rotary position minus sequence index
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    qkv: torch.nn.Module
    o: torch.nn.Module
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    gate_up: torch.nn.Module | None      # dense MLP, fused
    down: torch.nn.Module | None
    act: object
    mlp: torch.nn.Module | None          # MoE block, called as is
    scaling: float


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' RMSNorm of the Llama/Qwen families: normalize in float32, scale in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def fuse_linears(mods: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)``; the originals become row views of it
    (no extra memory, and the model's own forward keeps working). None where the layouts differ or
    an FP8 part's rows are not whole 128-row scale blocks."""
    if all(isinstance(m, FP8Linear) for m in mods):
        if any(m.out_features % 128 for m in mods) or len({m.mode for m in mods}) > 1:
            return None
        fused = FP8Linear(torch.cat([m.weight for m in mods]), torch.cat([m.weight_scale_inv for m in mods]),
                          torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None, mods[0].mode)
        row = 0
        for m in mods:
            n = m.out_features
            m.weight, m.weight_scale_inv = fused.weight[row:row + n], fused.weight_scale_inv[row // 128:(row + n) // 128]
            if m.bias is not None:
                m.bias = torch.nn.Parameter(fused.bias.data[row:row + n], requires_grad=False)
            row += n
        return fused
    if all(type(m) is torch.nn.Linear for m in mods) and len({m.bias is None for m in mods}) == 1:
        w = torch.cat([m.weight.data for m in mods])
        fused = torch.nn.Linear(w.shape[1], w.shape[0], bias=mods[0].bias is not None, device="meta")
        fused.weight = torch.nn.Parameter(w, requires_grad=False)
        if mods[0].bias is not None:
            fused.bias = torch.nn.Parameter(torch.cat([m.bias.data for m in mods]), requires_grad=False)
        row = 0
        for m in mods:
            n = m.out_features
            m.weight = torch.nn.Parameter(w[row:row + n], requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(fused.bias.data[row:row + n], requires_grad=False)
            row += n
        return fused
    return None


def _text_parts(model: torch.nn.Module):
    base = model.model
    lm = getattr(base, "language_model", base)
    return base, lm


def _decoder_layers(model: torch.nn.Module) -> list[_Layer] | None:
    """fp8vl's view of each decoder layer, or None for a family the engine does not restate."""
    _, lm = _text_parts(model)
    out = []
    for layer in lm.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or hasattr(layer, "pre_feedforward_layernorm") or \
                getattr(attn, "sliding_window", None) or not hasattr(attn, "q_proj"):
            return None
        qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp = layer.mlp
        dense = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj]) if dense else None
        if qkv is None or (dense and gate_up is None):
            return None
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        out.append(_Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                          layer.input_layernorm.variance_epsilon, qkv, attn.o_proj,
                          qn.weight if qn is not None else None, kn.weight if kn is not None else None,
                          gate_up, mlp.down_proj if dense else None, mlp.act_fn if dense else None,
                          None if dense else mlp, attn.scaling))
    return out


class Engine:
    """Generate for many prompts with one loaded model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, eos_ids: list[int], opts: EngineOptions = EngineOptions()):
        self.model, self.opts, self.eos = model, opts, set(eos_ids)
        self.device = next(model.parameters()).device
        self.base, lm = _text_parts(model)
        self.layers = _decoder_layers(model)
        self.embed, self.rotary, self.norm = lm.embed_tokens, lm.rotary_emb, lm.norm
        self.lm_head = model.lm_head
        tc = model.config.get_text_config()
        self.n_heads, self.n_kv = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.mrope = hasattr(self.base, "rope_deltas")
        self.dtype = self.embed.weight.dtype
        self.generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.fused = self._fused_mode()
        self.batch = self._batch_size() if self.layers is not None else 1
        if self.layers is not None:
            self._allocate()

    def _fused_mode(self) -> str | None:
        """The GEMM backend when every decoder linear is an FP8Linear running real FP8 kernels: the
        decode step then quantizes activations inside their producers (RMSNorm, SiLU-and-mul)."""
        if self.layers is None or self.device.type != "cuda":
            return None
        mods = [m for L in self.layers for m in (L.qkv, L.o, L.gate_up, L.down)]
        if not all(isinstance(m, FP8Linear) and m.mode in ("scaled_mm", "triton") for m in mods):
            return None
        return "triton" if mods[0].mode == "triton" else "auto"

    # ------------------------------------------------------------ memory
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.n_kv * self.head_dim * self.dtype.itemsize

    def _batch_size(self) -> int:
        opts, per_seq = self.opts, self.kv_bytes_per_token() * self.opts.max_len
        if self.device.type != "cuda":
            return opts.max_batch or 8
        free, total = torch.cuda.mem_get_info(self.device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(self.device)
        cap = min(free + torch.cuda.memory_reserved(self.device), int(total * fraction))
        budget = cap - torch.cuda.memory_allocated(self.device) - opts.reserve
        fits = max(0, budget // per_seq)
        if fits < 1:
            raise FP8VLError(
                f"no room for the KV cache: {max(budget, 0) / GiB:.2f} GiB left after the weights, one sequence "
                f"of {opts.max_len} tokens needs {per_seq / GiB:.2f} GiB; use a shorter --max-new-tokens, smaller "
                f"images, or a larger --gpu-memory")
        want = opts.max_batch or BUCKETS[-1]
        return int(min(want, fits))

    def _allocate(self) -> None:
        b, L, dev = self.batch, self.opts.max_len, self.device
        shape = (b, self.n_kv, L, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        self.tok = torch.zeros(b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.len = torch.zeros(b, dtype=torch.long, device=dev)
        self.rows = torch.arange(b, device=dev)
        self.span = torch.arange(L, device=dev)

    # ------------------------------------------------------------ prefill
    @torch.no_grad()
    def _prefill(self, slots: list[int], group: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, int, int]]:
        """Run prompts of one length through the model's own forward together (no padding: the
        batch dimension stacks whole prompts); each one's keys/values into its slot.
        Returns per prompt (last-position logits [vocab], prompt length, M-RoPE delta)."""
        n = group[0]["input_ids"].shape[1]
        if n + 1 > self.opts.max_len:
            raise FP8VLError(f"a prompt of {n} tokens does not fit the engine's {self.opts.max_len}-token "
                             f"sequences; use smaller images or a shorter prompt")
        # per-token tensors stack on a batch axis; image patches and grids concatenate (one row per image)
        inputs = {k: torch.cat([g[k] for g in group]).to(self.device) for k in group[0]}
        if self.mrope:
            self.base.rope_deltas = None   # Transformers keeps the last prompt's delta here
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        deltas = self.base.rope_deltas.flatten().tolist() if self.mrope and self.base.rope_deltas is not None \
            else [0] * len(group)
        cache = getattr(out, "cache", None) or out.past_key_values
        idx = torch.tensor(slots, device=self.device)
        for i in range(len(self.layers)):
            layer = cache.layers[i]
            self.k[i][idx, :, :n] = layer.keys
            self.v[i][idx, :, :n] = layer.values
        return [(out.logits[j, -1], n, int(deltas[j])) for j in range(len(group))]

    # ------------------------------------------------------------ decode
    def _rope(self, x: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [b, 1, hd] of each slot's rotary position, from the model's own rotary module."""
        pos = self.pos[:b]
        pid = pos[None, :, None].expand(3, b, 1) if self.mrope else pos[:, None]
        cos, sin = self.rotary(x, pid)
        if cos.dim() == 4:            # Qwen2.5-VL returns per-axis tables; text positions are equal
            cos, sin = cos[0], sin[0]
        return cos, sin

    def _kernels_ok(self) -> bool:
        """fp8vl's Triton decode kernels (attention.py) apply: CUDA, bf16, dense layers, head_dim 64/128."""
        return self.device.type == "cuda" and self.dtype == torch.bfloat16 and self.head_dim in (64, 128)

    def _decode_kernels(self, b: int) -> torch.Tensor:
        """``_decode`` in few launches: q/k norm + rotary + cache write in one kernel, flash-decoding
        attention (its output quantized in the same kernel for an FP8 o_proj), the residual add fused
        into the next RMSNorm (+ quantization) on FP8 models. Same numerics as ``_decode`` up to the
        order of float32 sums."""
        from .attention import add_rmsnorm_quant, decode_attention, qk_norm_rope_cache

        ln = self.len[:b]
        x = self.embed(self.tok[:b])                                        # [b, H]
        cos, sin = self._rope(x[:, None], b)
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()           # [b, hd]
        if self.fused:
            from .gemm import fp8_gemm, rmsnorm_quant, silu_mul_quant

            def lin(m: FP8Linear, xq_xs) -> torch.Tensor:
                return fp8_gemm(*xq_xs, m.weight, m.weight_scale_inv, self.dtype, m.bias, self.fused, m.counters)
            h = rmsnorm_quant(x, self.layers[0].ln1, self.layers[0].eps)
        for i, L in enumerate(self.layers):
            kc, vc = self.k[i][:b], self.v[i][:b]
            qkv = lin(L.qkv, h) if self.fused else L.qkv(rms_norm(x, L.ln1, L.eps))
            q = qk_norm_rope_cache(qkv, L.q_norm, L.k_norm, L.eps, cos, sin, kc, vc, ln)
            if self.fused:
                x, *h = add_rmsnorm_quant(x, lin(L.o, decode_attention(q, kc, vc, ln, L.scaling, True)), L.ln2, L.eps)
                delta = lin(L.down, silu_mul_quant(lin(L.gate_up, h)))
                if i + 1 < len(self.layers):
                    nxt = self.layers[i + 1]
                    x, *h = add_rmsnorm_quant(x, delta, nxt.ln1, nxt.eps)
                else:
                    x = x + delta
                continue
            x = x + L.o(decode_attention(q, kc, vc, ln, L.scaling))
            h = rms_norm(x, L.ln2, L.eps)
            if L.mlp is not None:          # MoE block: router + experts, as the model defines them
                x = x + L.mlp(h[:, None])[:, 0]
                continue
            g, u = L.gate_up(h).chunk(2, -1)
            x = x + L.down(L.act(g) * u)
        return self.lm_head(rms_norm(x, self.norm.weight, self.norm.variance_epsilon))

    def _decode(self, b: int) -> torch.Tensor:
        """One token for slots [0, b): reads self.tok/pos/len, writes the cache; logits [b, vocab]."""
        if self.opts.decode_kernels and self._kernels_ok():
            return self._decode_kernels(b)
        tok, ln, rows = self.tok[:b], self.len[:b], self.rows[:b]
        x = self.embed(tok)[:, None]                                        # [b, 1, H]
        cos, sin = self._rope(x, b)
        cos, sin = cos[:, None], sin[:, None]                               # [b, 1, 1, hd]
        mask = (self.span[None, :] <= ln[:, None])[:, None, None, :]        # [b, 1, 1, L]
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if self.fused:
            from .gemm import fp8_gemm, quantize_activations_gpu, rmsnorm_quant, silu_mul_quant

            def lin(m: FP8Linear, xq_xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:   # [b, N]
                return fp8_gemm(*xq_xs, m.weight, m.weight_scale_inv, self.dtype, m.bias, self.fused, m.counters)
        for i, L in enumerate(self.layers):
            if self.fused:
                qkv = lin(L.qkv, rmsnorm_quant(x.view(b, -1), L.ln1, L.eps))[:, None]
            else:
                qkv = L.qkv(rms_norm(x, L.ln1, L.eps))
            q, k, v = qkv.split([nq, nk, nk], -1)
            q, k = q.view(b, 1, self.n_heads, self.head_dim), k.view(b, 1, self.n_kv, self.head_dim)
            if L.q_norm is not None:
                q, k = rms_norm(q, L.q_norm, L.eps), rms_norm(k, L.k_norm, L.eps)
            q, k = q.transpose(1, 2), k.transpose(1, 2)                     # [b, heads, 1, hd]
            v = v.view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k[i][:b], self.v[i][:b]
            kc[rows, :, ln] = k[:, :, 0]
            vc[rows, :, ln] = v[:, :, 0]
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=L.scaling, enable_gqa=True)
            a = a.transpose(1, 2).reshape(b, 1, nq)
            if self.fused:
                x = x + lin(L.o, quantize_activations_gpu(a.view(b, nq)))[:, None]
                gu = lin(L.gate_up, rmsnorm_quant(x.view(b, -1), L.ln2, L.eps))
                x = x + lin(L.down, silu_mul_quant(gu))[:, None]
                continue
            x = x + L.o(a)
            h = rms_norm(x, L.ln2, L.eps)
            if L.mlp is not None:
                x = x + L.mlp(h)
            else:
                g, u = L.gate_up(h).chunk(2, -1)
                x = x + L.down(L.act(g) * u)
        return self.lm_head(rms_norm(x, self.norm.weight, self.norm.variance_epsilon))[:, 0]

    def _bucket(self, n: int) -> int:
        return next((b for b in BUCKETS if b >= n and b <= self.batch), self.batch)

    def _use_graphs(self) -> bool:
        # MoE blocks are captured only where their experts run on the device alone (FP8 experts through
        # the grouped GEMV); Transformers' own expert loop picks experts on the host
        def capturable(L: _Layer) -> bool:
            ex = getattr(L.mlp, "experts", None)
            return L.mlp is None or (isinstance(ex, FP8Experts) and ex.stacked is not None
                                     and ex.gate_proj[0].mode in ("scaled_mm", "triton"))
        return self.device.type == "cuda" and self.opts.cuda_graphs and all(capturable(L) for L in self.layers)

    @torch.no_grad()
    def _step(self, b: int) -> torch.Tensor:
        if not self._use_graphs():
            return self._decode(b)
        if b not in self.graphs:
            # warm up off the capture (Triton autotuning, cuBLAS handles), then capture
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._decode(b)
            torch.cuda.current_stream(self.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
            with torch.cuda.graph(g, pool=pool):
                out = self._decode(b)
            self.graphs[b] = (g, out)
        g, out = self.graphs[b]
        g.replay()
        return out

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, vocab] -> [n] token ids: greedy, or temperature / top-p sampling."""
        if self.opts.temperature <= 0:
            return logits.argmax(-1)
        probs = (logits.float() / self.opts.temperature).softmax(-1)
        if self.opts.top_p < 1:
            sp, idx = probs.sort(-1, descending=True)
            keep = sp.cumsum(-1) - sp < self.opts.top_p
            probs = torch.zeros_like(probs).scatter(-1, idx, sp * keep)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    # ------------------------------------------------------------ the loop
    def _done(self, s: _Seq) -> bool:
        return s.tokens[-1] in self.eos or len(s.tokens) >= self.opts.max_new_tokens or \
            s.prompt_len + len(s.tokens) >= self.opts.max_len

    @torch.no_grad()
    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, list[int]]]:
        """Yield (request, new token ids, EOS excluded) as each sequence finishes."""
        if self.layers is None:
            yield from self._generate_transformers(requests)
            return
        todo = iter(requests)
        free, active = list(range(self.batch)), {}
        exhausted = False
        while True:
            while free and not exhausted:
                taken = []
                while len(taken) < min(len(free), self.opts.prefill_batch):
                    req = next(todo, None)
                    if req is None:
                        exhausted = True
                        break
                    taken.append(req)
                groups: dict[tuple, list[Request]] = {}
                for req in taken:   # prompts of one length (and one kind) prefill together
                    groups.setdefault((req.inputs["input_ids"].shape[1], tuple(sorted(req.inputs))), []).append(req)
                for reqs in groups.values():
                    slots = [free.pop(0) for _ in reqs]
                    for slot, req, (logits, n, delta) in zip(slots, reqs, self._prefill(slots, [r.inputs for r in reqs])):
                        s = _Seq(req, n, delta, [int(self._sample(logits[None])[0])])
                        if self._done(s):
                            free.append(slot)
                            yield req, self._strip(s.tokens)
                        else:
                            active[slot] = s
                free.sort()
            if not active:
                return
            b = self._bucket(max(active) + 1)
            tok, pos, ln = [0] * b, [0] * b, [0] * b
            for slot, s in active.items():
                at = s.prompt_len + len(s.tokens) - 1          # sequence index of the newest token
                tok[slot], pos[slot], ln[slot] = s.tokens[-1], at + s.delta, at
            self.tok[:b].copy_(torch.tensor(tok))
            self.pos[:b].copy_(torch.tensor(pos))
            self.len[:b].copy_(torch.tensor(ln))
            nxt = self._sample(self._step(b)).tolist()
            for slot in sorted(active):
                s = active[slot]
                s.tokens.append(nxt[slot])
                if self._done(s):
                    del active[slot]
                    free.append(slot)
                    yield s.req, self._strip(s.tokens)
            free.sort()

    def _strip(self, tokens: list[int]) -> list[int]:
        return tokens[:-1] if tokens and tokens[-1] in self.eos else tokens

    def _generate_transformers(self, requests: Iterable[Request]) -> Iterator[tuple[Request, list[int]]]:
        """Families the engine does not restate: Transformers' generate, one prompt at a time."""
        for req in requests:
            inputs = {k: v.to(self.device) for k, v in req.inputs.items()}
            sample = self.opts.temperature > 0
            out = self.model.generate(**inputs, do_sample=sample, max_new_tokens=self.opts.max_new_tokens,
                                      eos_token_id=sorted(self.eos), temperature=self.opts.temperature if sample
                                      else None, top_p=self.opts.top_p if sample else None, top_k=None)
            yield req, self._strip(out[0, inputs["input_ids"].shape[1]:].tolist())

    @torch.no_grad()
    def forced_logits(self, inputs: dict[str, torch.Tensor], answer: list[int]) -> torch.Tensor:
        """Logits [len(answer), vocab] (float32, CPU) for each answer position, the answer fed through
        the engine's own decode step token by token: what the engine computes while it generates."""
        if self.layers is None:
            raise FP8VLError("this model family generates through Transformers; the engine has no decode step")
        logits, n, delta = self._prefill([0], [inputs])[0]
        rows = [logits.float().cpu()]
        for j, t in enumerate(answer[:-1]):
            self.tok[:1].fill_(t)
            self.pos[:1].fill_(n + j + delta)
            self.len[:1].fill_(n + j)
            rows.append(self._step(1)[0].float().cpu())
        return torch.stack(rows)


def limit_gpu_memory(device: str, nbytes: int | None) -> None:
    """Cap what this process may allocate on ``device`` (emulates a smaller card on a larger one)."""
    if nbytes is None or not str(device).startswith("cuda"):
        return
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if nbytes > total:
        raise FP8VLError(f"--gpu-memory {nbytes / GiB:.1f} GiB is more than the card has ({total / GiB:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(nbytes / total, index)


def round_up(n: int, to: int = 64) -> int:
    return int(math.ceil(n / to) * to)
