"""fp8vl's generation engine: continuous batching over a static KV cache, prefill and decode in CUDA graphs.

The gpt-fast / vLLM recipe, kept small by reusing Transformers where it is not on the hot path:
- **prefill** of prompts of one length: the model's own forward up to its language model (vision
  tower, DeepStack features, M-RoPE position logic stay Transformers'; prefill.decoder_inputs),
  then fp8vl's own decoder layers (prefill.run_layers) writing each prompt's keys/values into its
  slot of the static cache; on GPUs the layer loop is captured in one CUDA graph per (batch,
  length rounded up to 64). Families whose rotary module returns per-axis tables (Qwen2.5-VL)
  prefill through Transformers' forward and copy its cache;
- **decode** of all slots at once runs fp8vl's own restatement of the decoder layer (RMSNorm, fused
  qkv and gate_up linears, q/k norm, rotary from the model's own rotary module, grouped-query SDPA
  over the static cache), captured in one CUDA graph per batch-size bucket on GPUs;
- **continuous batching**: a finished sequence frees its slot, which the next prompt fills at once.
BF16 and FP8 checkpoints run the same code; they differ only in the linears. Decoder families:
Qwen3-VL (dense and MoE), Qwen2.5-VL, Qwen3, Llama. Others (Gemma 3: sliding window, other norms)
generate through Transformers, one prompt at a time. The CPU runs the same code without graphs,
which is how the tests check it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..errors import FP8VLError
from .layers import _Layer, _decoder_layers, _text_parts, rms_norm, torch_attention_block
from .prefill import DecoderInputs, decoder_inputs, dense_deepstack, run_layers
from .fp8_modules import FP8Experts, FP8Linear

GiB = 1024**3
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PREFILL_PAD = 64     # prefill graphs are captured for prompt lengths rounded up to this


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
    restated_prefill: bool = True        # prefill through fp8vl's own layers (False: Transformers' forward)
    prefill_graphs: bool = True          # ... captured in CUDA graphs (CUDA, dense layers, cuda_graphs on)
    pdl: bool = False                    # decode GEMVs start while their input's producer runs (SM90+;
                                         # 5% slower whole steps on the H200, so off: BENCHMARKS.md)
    batch_invariant: bool = False        # CUDA: a prompt's tokens and logits do not depend on the batch
                                         # (_invariant; off by default: prefilling each prompt alone costs
                                         # far more than 5% of images/s, docs/decisions.md). The CPU paths
                                         # are invariant whatever this says
    consumer_sums: tuple[str, ...] = ("qkv", "o", "gate_up", "down")   # FP8 decode linears whose
                                         # split-K partials the next kernel sums as it reads them (same
                                         # bits); the others' are summed by the GEMV's last split (each
                                         # linear 0.1-1.8 us slower that way on the H200: BENCHMARKS.md)


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
        # (batch, padded length, DeepStack layers) -> (graph, output [b, n_pad, H]); the graphs share
        # one memory pool and their input buffers (x, cos, sin, ds, slots: _static)
        self.prefill_graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_inputs: dict[str, torch.Tensor] = {}
        self.prefill_pool = None
        self.fused = self._fused_mode()
        self.invariant = self._invariant()
        self.restated = opts.restated_prefill and self.layers is not None and self._flat_rope()
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

    def _invariant(self) -> bool:
        """Batch invariance on CUDA (``opts.batch_invariant``; the CPU paths are invariant as they
        are): every prompt prefilled alone (its GEMM shapes, its vision tower's, are its own), and
        in the decode step no kernel choice depends on the batch size: the FP8 GEMV for every M (not
        cuBLAS above 16 rows), BF16 linears and lm_head through one Triton config (gemm.bf16_linear),
        RMSNorm one program per row (gemm.rmsnorm), attention split by fixed position chunks. Covers
        the Triton decode path (``_kernels_ok``) of dense families; MoE routers still run cuBLAS."""
        return self.opts.batch_invariant and self.device.type == "cuda" and self.layers is not None \
            and self.embed.weight.shape[1] % 128 == 0

    def _flat_rope(self) -> bool:
        """The rotary module returns one [b, n, hd] table (Qwen3-VL, Qwen3, Llama); Qwen2.5-VL's
        returns per-axis tables [3, b, n, hd], which prefill.run_layers does not take."""
        x = torch.zeros(1, 1, 1, dtype=self.dtype, device=self.device)
        pid = torch.zeros((3, 1, 1) if self.mrope else (1, 1), dtype=torch.long, device=self.device)
        return self.rotary(x, pid)[0].dim() == 3

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
        """Prefill prompts of one length together (no padding: the batch dimension stacks whole
        prompts); each one's keys/values into its slot.
        Returns per prompt (last-position logits [vocab], prompt length, M-RoPE delta)."""
        n = group[0]["input_ids"].shape[1]
        if n + 1 > self.opts.max_len:
            raise FP8VLError(f"a prompt of {n} tokens does not fit the engine's {self.opts.max_len}-token "
                             f"sequences; use smaller images or a shorter prompt")
        # per-token tensors stack on a batch axis; image patches and grids concatenate (one row per image)
        inputs = {k: torch.cat([g[k] for g in group]).to(self.device) for k in group[0]}
        if not self.restated:
            return self._prefill_transformers(slots, inputs, n)
        d = decoder_inputs(self.model, inputs)
        x = self._prefill_layers(d, torch.tensor(slots, device=self.device))
        logits = self.lm_head(rms_norm(x[:, n - 1], self.norm.weight, self.norm.variance_epsilon))
        return [(logits[j], n, d.deltas[j]) for j in range(len(group))]

    def _prefill_transformers(self, slots: list[int], inputs: dict[str, torch.Tensor], n: int
                              ) -> list[tuple[torch.Tensor, int, int]]:
        """The model's own forward; its cache copied into the slots."""
        if self.mrope:
            self.base.rope_deltas = None   # Transformers keeps the last prompt's delta here
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        b = inputs["input_ids"].shape[0]
        deltas = self.base.rope_deltas.flatten().tolist() if self.mrope and self.base.rope_deltas is not None \
            else [0] * b
        cache = getattr(out, "cache", None) or out.past_key_values
        idx = torch.tensor(slots, device=self.device)
        for i in range(len(self.layers)):
            layer = cache.layers[i]
            self.k[i][idx, :, :n] = layer.keys
            self.v[i][idx, :, :n] = layer.values
        return [(out.logits[j, -1], n, int(deltas[j])) for j in range(b)]

    def _prefill_graphs_ok(self, b: int, n_pad: int) -> bool:
        # MoE blocks route tokens on the host when they are many (FP8Experts' per-expert loop)
        return self.device.type == "cuda" and self.opts.cuda_graphs and self.opts.prefill_graphs and \
            all(L.mlp is None for L in self.layers) and b <= self._prefill_rows() and n_pad <= self.opts.max_len

    def _prefill_rows(self) -> int:
        return min(self.opts.prefill_batch, self.batch)

    def _prefill_layers(self, d: DecoderInputs, slots: torch.Tensor) -> torch.Tensor:
        """prefill.run_layers on these inputs -> hidden states [b, n or n_pad, H] before the final
        norm: replayed from a CUDA graph where one applies, else eagerly."""
        cos, sin = self.rotary(d.embeds, d.position_ids)                   # [b, n, hd]
        ds = dense_deepstack(d)
        b, n = d.embeds.shape[:2]
        n_pad = round_up(n, PREFILL_PAD)
        if self._prefill_graphs_ok(b, n_pad):
            return self._prefill_replay(dict(x=d.embeds, cos=cos, sin=sin, ds=ds, slots=slots), n_pad)
        return run_layers(self.layers, d.embeds, cos, sin, ds, self.k, self.v, slots, self.fused)

    def _static(self, name: str, like: torch.Tensor, shape: tuple[int, ...], per_prompt: int) -> torch.Tensor:
        """A contiguous ``shape`` view into the one buffer of input ``name`` that every prefill graph
        reads, sized for prefill_batch prompts of ``per_prompt`` elements (at max_len tokens): a
        graph's inputs cost no memory of their own."""
        buf = self.prefill_inputs.get(name)
        if buf is None:
            buf = torch.zeros(per_prompt * self._prefill_rows(), dtype=like.dtype, device=self.device)
            self.prefill_inputs[name] = buf
        return buf[:math.prod(shape)].view(shape)

    def _prefill_replay(self, real: dict[str, torch.Tensor | None], n_pad: int) -> torch.Tensor:
        """The layer loop over inputs padded to n_pad positions (zeros after the prompt), from the
        graph of (b, n_pad, DeepStack layers), captured on first use. The padding sits after the
        prompt, so causal attention keeps the real positions exact; its cache entries lie past the
        prompt, where decode writes position p before it ever reads it."""
        b, n = real["x"].shape[:2]
        axis = dict(x=1, cos=1, sin=1, ds=2)                               # the token axis
        bufs = {}
        for k, t in real.items():
            if t is None:
                bufs[k] = None
            elif k == "slots":
                bufs[k] = self._static(k, t, (b,), 1)
                bufs[k].copy_(t)
            else:
                shape = list(t.shape)
                shape[axis[k]] = n_pad
                bufs[k] = self._static(k, t, tuple(shape), math.prod(shape) // (b * n_pad) * self.opts.max_len)
                bufs[k].narrow(axis[k], 0, n).copy_(t)
                bufs[k].narrow(axis[k], n, n_pad - n).zero_()
        key = (b, n_pad, 0 if real["ds"] is None else real["ds"].shape[0])
        if key not in self.prefill_graphs:
            def run() -> torch.Tensor:
                return run_layers(self.layers, bufs["x"], bufs["cos"], bufs["sin"], bufs["ds"], self.k, self.v,
                                  bufs["slots"], self.fused)
            g, out = capture_graph(run, self.device, self.prefill_pool)
            self.prefill_pool = self.prefill_pool or g.pool()
            self.prefill_graphs[key] = (g, out)
        g, out = self.prefill_graphs[key]
        g.replay()
        return out

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
        from ..kernels.attention import INVARIANT_CHUNK, add_rmsnorm_quant, decode_attention, qk_norm_rope_cache

        ln = self.len[:b]
        x = self.embed(self.tok[:b])                                        # [b, H]
        cos, sin = self._rope(x[:, None], b)
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()           # [b, hd]
        chunk = INVARIANT_CHUNK if self.invariant else None
        if self.fused:
            from ..kernels.gemm import rmsnorm_quant, silu_mul_quant, splitk_sum

            lin = self._fp8_lin(self.opts.consumer_sums)
            h = rmsnorm_quant(x, self.layers[0].ln1, self.layers[0].eps)
        for i, L in enumerate(self.layers):
            kc, vc = self.k[i][:b], self.v[i][:b]
            qkv = lin(L.qkv, h, "qkv") if self.fused else self._linear(L.qkv, self._norm(x, L.ln1, L.eps))
            q = qk_norm_rope_cache(qkv, L.q_norm, L.k_norm, L.eps, cos, sin, kc, vc, ln)
            if self.fused:
                a = decode_attention(q, kc, vc, ln, L.scaling, True, chunk=chunk)
                x, *h = add_rmsnorm_quant(x, lin(L.o, a, "o"), L.ln2, L.eps)
                delta = lin(L.down, silu_mul_quant(lin(L.gate_up, h, "gate_up")), "down")
                if i + 1 < len(self.layers):
                    nxt = self.layers[i + 1]
                    x, *h = add_rmsnorm_quant(x, delta, nxt.ln1, nxt.eps)
                else:
                    x = x + splitk_sum(delta)
                continue
            x = x + self._linear(L.o, decode_attention(q, kc, vc, ln, L.scaling, chunk=chunk))
            h = self._norm(x, L.ln2, L.eps)
            if L.mlp is not None:          # MoE block: router + experts, as the model defines them
                x = x + L.mlp(h[:, None])[:, 0]
                continue
            g, u = self._linear(L.gate_up, h).chunk(2, -1)
            x = x + self._linear(L.down, L.act(g) * u)
        return self._linear(self.lm_head, self._norm(x, self.norm.weight, self.norm.variance_epsilon))

    def _norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """The decode step's RMSNorm of x [b, H]: one program per row where batch-invariant."""
        if self.invariant:
            from ..kernels.gemm import rmsnorm
            return rmsnorm(x, w, eps)
        return rms_norm(x, w, eps)

    def _linear(self, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The decode step's m(x [b, K]): a BF16 nn.Linear through gemm.bf16_linear where batch-invariant
        (cuBLAS picks its kernel by the batch size), any other module as it is."""
        if self.invariant and type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16:
            from ..kernels.gemm import bf16_linear
            return bf16_linear(x, m.weight, m.bias)
        return m(x)

    def _fp8_lin(self, partials: tuple[str, ...] = ()):
        """lin(m, (xq, xs), name) -> [b, N]: FP8Linear ``m`` on activations its producer quantized,
        with the engine's GEMM backend, m's split-K counters and the PDL choice; a split-K GEMV of a
        linear named in ``partials`` leaves its output as float32 partials [S, b, N] for a
        consumer that sums them (gemm.fp8_gemm)."""
        from ..kernels.gemm import fp8_gemm

        def lin(m: FP8Linear, xq_xs: tuple[torch.Tensor, torch.Tensor], name: str = "") -> torch.Tensor:
            return fp8_gemm(*xq_xs, m.weight, m.weight_scale_inv, self.dtype, m.bias, self.fused, m.counters,
                            self.opts.pdl, name in partials, self.invariant)
        return lin

    def _decode(self, b: int) -> torch.Tensor:
        """One token for slots [0, b): reads self.tok/pos/len, writes the cache; logits [b, vocab]."""
        if self.opts.decode_kernels and self._kernels_ok():
            return self._decode_kernels(b)
        tok, ln, rows = self.tok[:b], self.len[:b], self.rows[:b]
        x = self.embed(tok)[:, None]                                        # [b, 1, H]
        cos, sin = self._rope(x, b)
        cos, sin = cos[:, 0], sin[:, 0]                                     # [b, hd]
        mask = (self.span[None, :] <= ln[:, None])[:, None, None, :]        # [b, 1, 1, L]: once for all layers
        if self.fused:
            from ..kernels.gemm import quantize_activations_gpu, rmsnorm_quant, silu_mul_quant

            lin = self._fp8_lin()
        for i, L in enumerate(self.layers):
            if self.fused:
                qkv = lin(L.qkv, rmsnorm_quant(x.view(b, -1), L.ln1, L.eps))
            else:
                qkv = L.qkv(rms_norm(x, L.ln1, L.eps))[:, 0]
            a = torch_attention_block(qkv, L.q_norm, L.k_norm, L.eps, cos, sin, self.k[i][:b], self.v[i][:b], ln,
                                      L.scaling, rows, mask)                # [b, heads * hd]
            if self.fused:
                x = x + lin(L.o, quantize_activations_gpu(a))[:, None]
                gu = lin(L.gate_up, rmsnorm_quant(x.view(b, -1), L.ln2, L.eps))
                x = x + lin(L.down, silu_mul_quant(gu))[:, None]
                continue
            x = x + L.o(a[:, None])
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
            pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
            self.graphs[b] = capture_graph(lambda: self._decode(b), self.device, pool, warmups=2)
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
                    taken.append((req, unpadded(req.inputs)))
                groups: dict[tuple, list[tuple[Request, dict]]] = {}
                for i, (req, inputs) in enumerate(taken):   # prompts of one length and kind prefill together
                    key = (inputs["input_ids"].shape[1], tuple(sorted(inputs)), i if self.invariant else 0)
                    groups.setdefault(key, []).append((req, inputs))
                for pairs in groups.values():
                    slots = [free.pop(0) for _ in pairs]
                    reqs = [r for r, _ in pairs]
                    for slot, req, (logits, n, delta) in zip(slots, reqs, self._prefill(slots, [i for _, i in pairs])):
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

    def forced_logits(self, inputs: dict[str, torch.Tensor], answer: list[int]) -> torch.Tensor:
        """Logits [len(answer), vocab] (float32, CPU) for each answer position, the answer fed through
        the engine's own decode step token by token: what the engine computes while it generates."""
        return self.forced_logits_batch([(inputs, answer)])[0]

    @torch.no_grad()
    def forced_logits_batch(self, pairs: list[tuple[dict[str, torch.Tensor], list[int]]]) -> list[torch.Tensor]:
        """``forced_logits`` of several (inputs, answer) pairs, answers of one length, decoded together
        in slots 0..len(pairs)-1 (each prompt prefilled alone): the decode step at that batch size."""
        if self.layers is None:
            raise FP8VLError("this model family generates through Transformers; the engine has no decode step")
        if len(pairs) > self.batch or len({len(a) for _, a in pairs}) > 1:
            raise FP8VLError(f"forced_logits_batch: at most {self.batch} pairs whose answers have one length")
        first = [self._prefill([i], [unpadded(inputs)])[0] for i, (inputs, _) in enumerate(pairs)]
        rows = [[logits.float().cpu()] for logits, _, _ in first]
        b = self._bucket(len(pairs))
        for j in range(len(pairs[0][1]) - 1):
            tok, pos, ln = [0] * b, [0] * b, [0] * b
            for i, ((_, answer), (_, n, delta)) in enumerate(zip(pairs, first)):
                tok[i], pos[i], ln[i] = answer[j], n + j + delta, n + j
            self.tok[:b].copy_(torch.tensor(tok))
            self.pos[:b].copy_(torch.tensor(pos))
            self.len[:b].copy_(torch.tensor(ln))
            logits = self._step(b)
            for i, r in enumerate(rows):
                r.append(logits[i].float().cpu())
        return [torch.stack(r) for r in rows]


TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def unpadded(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One prompt's inputs without its padding: the positions whose attention_mask is 0 dropped from
    every per-token tensor (TOKEN_KEYS). Transformers' forward gives padded positions neither
    attention nor a rotary position (Qwen-VL's rope index and ``generate``'s position ids count only
    the unmasked tokens), so the unpadded prompt is the same prompt to the model."""
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise FP8VLError(f"a Request holds one prompt (input_ids [1, n]), got input_ids {tuple(ids.shape)}; "
                         f"make one Request per row of the batch")
    mask = inputs.get("attention_mask")
    if mask is None or bool(mask.all()):
        return inputs
    if mask.shape != ids.shape:
        raise FP8VLError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    keep = mask[0].bool()
    return {k: v[:, keep] if k in TOKEN_KEYS and v.shape[:2] == ids.shape else v for k, v in inputs.items()}


# ---------------------------------------------------------------- CUDA graphs and memory

def capture_graph(fn, device: torch.device | str = "cuda", pool=None, warmups: int = 1):
    """Run ``fn()`` ``warmups`` times on a side stream (Triton compiles and autotunes, cuBLAS picks its
    kernels: nothing a capture may not do), then capture one call -> (CUDA graph, its output). ``pool``:
    a graph memory pool to share (graphs replayed one at a time may)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


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
