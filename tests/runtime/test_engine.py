"""fp8vl.runtime.engine and fp8vl.runtime.loader on the tiny real-architecture models, on the CPU (no graphs).

The engine's own prefill and decode steps are judged against Transformers' forward of the very same weights
(teacher-forced on the engine's answer), its batching against itself at batch 1, and the loader
against Transformers' own load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from fp8vl.runtime.engine import Engine, EngineOptions, Request
from fp8vl.errors import FP8VLError
from fp8vl.check.evaluate import kl_stats
from fp8vl.runtime.loader import Loaded, encode, eos_ids, load_processor
from fp8vl.runtime.loader import load_model
from fp8vl.runtime.fp8_modules import FP8Linear, fp8_mode
from helpers import pad_tokens


def _image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _loaded(path, dtype=torch.bfloat16, mode="w8a8") -> Loaded:
    return Loaded(load_model(path, "cpu", mode, dtype), load_processor(path, True), True, path)


def _requests(L: Loaded) -> list[Request]:
    """Image prompts of different sizes (different image token counts) and text prompts."""
    sizes = [(64, 96), (128, 64), (96, 128), (64, 64)]
    reqs = [Request(encode(L, "Describe this image." + " more" * i, _image(i, *hw)), f"img{i}")
            for i, hw in enumerate(sizes)]
    return reqs + [Request(encode(L, "Hello there. " * (i + 1)), f"txt{i}") for i in range(3)]


def _forward_logits(model, inputs, answer) -> torch.Tensor:
    """Transformers' forward over prompt + answer: [len(answer), vocab] float32."""
    n = inputs["input_ids"].shape[1]
    ext = torch.tensor([answer])
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ext], 1),
                attention_mask=torch.ones(1, n + len(answer), dtype=torch.long))
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ext)], 1)
    with torch.no_grad():
        return model(**full).logits[0, n - 1:n - 1 + len(answer)].float()


@pytest.mark.parametrize("kind", ["dense", "tied", "moe"])
def test_engine_decode_step_equals_transformers_forward(kind, dense_src, tied_src, moe_src):
    """float32: the engine's decode (fused qkv/gate_up, its own attention over the static cache)
    computes what Transformers' forward computes, to float32 rounding. (In bfloat16 both the engine
    and Transformers' own cached decoding differ from the full forward by KL ~2e-4 on these random
    models: rounding, not the algorithm.)"""
    src = {"dense": dense_src, "tied": tied_src, "moe": moe_src}[kind]
    L = _loaded(src, torch.float32)
    eng = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=10, max_batch=2))
    for req in _requests(L)[::3]:
        answer = next(eng.generate([req]))[1]
        assert len(answer) == 10
        st = kl_stats(_forward_logits(L.model, req.inputs, answer), eng.forced_logits(req.inputs, answer))
        assert st["kl_max"] < 1e-6 and st["top1"] == 1.0, (req.tag, st["kl_max"])


def test_engine_fp8_decode_matches_transformers_forward_with_the_same_fp8_linears(dense_fp8):
    """FP8 (W8A8 simulation, float32 activations): the engine's decode against Transformers' forward
    with the same FP8Linear modules. Activation quantization amplifies rounding differences (a
    value on a rounding boundary of e4m3 moves one step), hence a looser bound than plain float32."""
    L = _loaded(dense_fp8.out, torch.float32)
    assert any(isinstance(m, FP8Linear) for m in L.model.modules())
    eng = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=10, max_batch=2))
    req = _requests(L)[0]
    answer = next(eng.generate([req]))[1]
    st = kl_stats(_forward_logits(L.model, req.inputs, answer), eng.forced_logits(req.inputs, answer))
    assert st["kl_mean"] < 1e-3 and st["top1"] == 1.0


@pytest.mark.parametrize("which", ["src", "fp8"])
def test_batch_1_and_batch_n_give_the_same_greedy_answers(which, dense_src, dense_fp8):
    """Continuous batching with 3 slots over 7 prompts (slots refill) against one slot at a time."""
    L = _loaded(dense_src if which == "src" else dense_fp8.out)
    reqs = _requests(L)
    eos = eos_ids(L)
    many = Engine(L.model, eos, EngineOptions(max_len=256, max_new_tokens=12, max_batch=3))
    one = Engine(L.model, eos, EngineOptions(max_len=256, max_new_tokens=12, max_batch=1))
    got_many = {r.tag: ids for r, ids in many.generate(reqs)}
    got_one = {r.tag: ids for r, ids in one.generate(reqs)}
    assert set(got_many) == {r.tag for r in reqs}
    assert got_many == got_one
    # and they are Transformers' own greedy answers. For FP8, with the prefill through Transformers'
    # forward: fp8vl's restated prefill equals it within float rounding (test_prefill.py), but an FP8
    # activation code can flip on a one-ulp difference, and a tiny random model's greedy answer with it
    # (seen with Transformers 5.17, whose attention rounds differently from 5.24's)
    if which == "fp8":
        hf = Engine(L.model, eos, EngineOptions(max_len=256, max_new_tokens=12, max_batch=3, restated_prefill=False))
        got_many = {r.tag: ids for r, ids in hf.generate(reqs)}
    # Where the two answers part, it must be at a near-tie of Transformers' own logits on the shared
    # prefix (within 2% of their range): the same FP8 checkpoint gave the same answers on this CPU
    # but parted at such a tie on another one (its float32 reductions run in another order).
    for req in reqs[:2]:
        out = L.model.generate(**req.inputs, do_sample=False, max_new_tokens=12, eos_token_id=eos)
        ids = [t for t in out[0, req.inputs["input_ids"].shape[1]:].tolist() if t not in eos]
        mine = got_many[req.tag]
        part = next((i for i, (a, b) in enumerate(zip(mine, ids)) if a != b), None)
        if part is None:
            assert mine == ids[:len(mine)]
            continue
        lg = _forward_logits(L.model, req.inputs, mine[:part + 1])[part]
        gap = float((lg[mine[part]] - lg[ids[part]]).abs())
        assert gap <= 0.02 * float(lg.max() - lg.min()), (req.tag, part, gap, float(lg.max() - lg.min()))


def test_continuous_batching_refills_freed_slots(dense_src):
    """Short and long requests in 2 slots: a slot freed by a short one is refilled before the long
    one ends (results come back out of submission order)."""
    L = _loaded(dense_src)
    reqs = _requests(L)[:4]
    seen = []

    def source():
        for r in reqs:
            seen.append(r.tag)
            yield r

    eng = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=6, max_batch=2))
    # the first request asks for fewer tokens: it finishes first and its slot takes request 3
    eng.opts = EngineOptions(max_len=256, max_new_tokens=6, max_batch=2)
    order = []
    for r, ids in eng.generate(source()):
        order.append((r.tag, len(ids), list(seen)))
    assert [o[0] for o in order][:2] == ["img0", "img1"]
    # when the first result came back only the 2 requests that fit had been taken ...
    assert order[0][2] == ["img0", "img1"]
    # ... and the next were taken only as slots freed up
    assert len({o[0] for o in order}) == 4 and all(o[1] == 6 for o in order)


def test_prompt_longer_than_the_cache_is_refused(dense_src):
    L = _loaded(dense_src)
    eng = Engine(L.model, [], EngineOptions(max_len=16, max_new_tokens=4, max_batch=1))
    with pytest.raises(FP8VLError, match="does not fit"):
        list(eng.generate([_requests(L)[0]]))


def test_loader_equals_transformers_load_and_keeps_fp8_bytes(dense_src, dense_fp8):
    from transformers import AutoModelForImageTextToText

    ours = load_model(dense_src, "cpu").state_dict()
    theirs = AutoModelForImageTextToText.from_pretrained(dense_src, dtype=torch.bfloat16).state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    fp8 = load_model(dense_fp8.out, "cpu", "w8a8")
    assert fp8_mode(fp8) == "w8a8" and not any(p.is_meta for p in fp8.parameters())


def test_loader_never_holds_a_widened_copy_of_an_fp8_weight(tmp_path):
    """Peak memory of a load: the tiny FP8 checkpoint is loaded in a fresh process with every torch
    operation watched (TorchDispatchMode); no operation may turn an FP8 weight into a wider float
    tensor (what loading through Transformers' dequantizing path does). The same watch must see
    the widening copy of an explicit dequantization, so the watch can fail (Transformers' own load,
    which widens in some releases only, is no dependable control)."""
    from fp8vl.apps.tiny import build_tiny_qwen3_vl
    from fp8vl import QuantizeOptions, quantize

    src = build_tiny_qwen3_vl(tmp_path / "src", "dense")
    out = tmp_path / "fp8"
    quantize(src, out, QuantizeOptions(workers=1))
    code = textwrap.dedent(f"""
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from safetensors import safe_open
        from fp8vl.runtime.loader import load_model
        from pathlib import Path
        fp8_shapes = set()
        for shard in Path({str(out)!r}).glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                for k in f.keys():
                    if f.get_slice(k).get_dtype() == "F8_E4M3":
                        fp8_shapes.add(tuple(f.get_slice(k).get_shape()))
        wide = []
        class Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                r = func(*args, **(kwargs or {{}}))
                fp8_in = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn
                             for a in [*args, *(kwargs or {{}}).values()])
                for t in (r if isinstance(r, (list, tuple)) else [r]):
                    if fp8_in and isinstance(t, torch.Tensor) and tuple(t.shape) in fp8_shapes and \\
                            t.dtype in (torch.bfloat16, torch.float16, torch.float32):
                        wide.append((str(func), tuple(t.shape), str(t.dtype)))
                return r
        with Watch():
            m = load_model({str(out)!r}, "cpu", "w8a8")
        assert fp8_shapes, "no FP8 weights"
        print("WIDE", wide)
        wide.clear()
        from fp8vl.kernels.numerics import dequantize_weight
        from fp8vl.runtime.fp8_modules import FP8Linear
        lin = next(x for x in m.modules() if isinstance(x, FP8Linear))
        with Watch():
            dequantize_weight(lin.weight, lin.weight_scale_inv, torch.bfloat16)
        print("CONTROL", len(wide))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "WIDE []" in r.stdout, r.stdout[-2000:]
    assert "CONTROL 0" not in r.stdout and "CONTROL" in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_cap_is_respected_and_graphs_match_eager(dense_fp8):
    from fp8vl.runtime.engine import limit_gpu_memory

    L = Loaded(load_model(dense_fp8.out, "cuda"), load_processor(dense_fp8.out, True), True, dense_fp8.out)
    reqs = [Request({k: v.cpu() for k, v in r.inputs.items()}, r.tag) for r in _requests(L)]
    graphs = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4))
    eager = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4, cuda_graphs=False))
    assert {r.tag: i for r, i in graphs.generate(reqs)} == {r.tag: i for r, i in eager.generate(reqs)}
    limit_gpu_memory("cuda", torch.cuda.memory_allocated() + 64 * 2**20)
    try:
        with pytest.raises(FP8VLError, match="KV cache"):
            Engine(L.model, [], EngineOptions(max_len=4096, max_new_tokens=12))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["src", "fp8"])
def test_gpu_decode_kernels_match_the_torch_decode_step(which, dense_src, dense_fp8):
    """The Triton decode path (fused norm/rope/cache write, flash-decoding attention, fused residual
    + RMSNorm + quantization) against the engine's plain-torch decode step on the same model. BF16:
    within bf16 rounding. FP8: activation quantization turns those roundings into whole e4m3 steps
    on ~1% of the values, so the bound is relative to FP8's own drift from the BF16 source (less
    than half of it, the tolerance the runtime's real kernels are held to against the simulation)."""
    def engines(path):
        L = Loaded(load_model(path, "cuda"), load_processor(path, True), True, path)
        fast = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=2))
        plain = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=2,
                                                  decode_kernels=False))
        assert fast._kernels_ok()
        return L, fast, plain

    L, fast, plain = engines(dense_src if which == "src" else dense_fp8.out)
    req = _requests(L)[0]
    answer = next(fast.generate([req]))[1]
    st = kl_stats(plain.forced_logits(req.inputs, answer), fast.forced_logits(req.inputs, answer))
    if which == "src":
        assert st["kl_mean"] < 2e-3 and st["top1"] >= 0.9, st
        return
    _, _, src_plain = engines(dense_src)
    drift = kl_stats(src_plain.forced_logits(req.inputs, answer), plain.forced_logits(req.inputs, answer))
    assert st["kl_mean"] < 0.5 * drift["kl_mean"], (st["kl_mean"], drift["kl_mean"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_moe_decode_is_captured_and_matches_eager(moe_fp8):
    """FP8 MoE experts through the grouped GEMV: the decode step is captured in CUDA graphs and gives
    the answers of the same engine run eagerly."""
    L = Loaded(load_model(moe_fp8.out, "cuda"), load_processor(moe_fp8.out, True), True, moe_fp8.out)
    reqs = [Request({k: v.cpu() for k, v in r.inputs.items()}, r.tag) for r in _requests(L)]
    graphs = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4))
    eager = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4, cuda_graphs=False))
    assert graphs._use_graphs()
    assert {r.tag: i for r, i in graphs.generate(reqs)} == {r.tag: i for r, i in eager.generate(reqs)}
    # the grouped path computes what the per-expert loop computes (W8A8 both; sums in another order)
    from fp8vl.runtime.fp8_modules import FP8Experts

    ex = next(m for m in L.model.modules() if isinstance(m, FP8Experts))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(6, ex.gate_proj[0].in_features, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.stack([torch.randperm(len(ex.gate_proj), device="cuda", generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, device="cuda", generator=g).softmax(-1).to(torch.bfloat16)
    fast = ex(x, idx, w)
    stacked, ex.stacked = ex.stacked, None
    slow = ex(x, idx, w)
    ex.stacked = stacked
    assert float((fast.float() - slow.float()).norm() / slow.float().norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs SM90+")
def test_gpu_engine_with_pdl_gives_the_answers_of_plain_launches(dense_fp8):
    """EngineOptions(pdl=True) changes when each decode GEMV starts, not what it computes (same
    configs at these shapes): the same greedy answers as plain launches, decode in CUDA graphs."""
    L = Loaded(load_model(dense_fp8.out, "cuda"), load_processor(dense_fp8.out, True), True, dense_fp8.out)
    reqs = [Request({k: v.cpu() for k, v in r.inputs.items()}, r.tag) for r in _requests(L)]
    plain = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4))
    early = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4, pdl=True))
    assert early._use_graphs() and early.fused
    assert {r.tag: i for r, i in plain.generate(reqs)} == {r.tag: i for r, i in early.generate(reqs)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores")
def test_gpu_split_k_partials_summed_by_their_consumers_give_the_same_logits(wide_fp8):
    """A model wide enough that the decode GEMVs split K: every linear's partials summed by the
    kernel that reads them (q/k norm + rope, residual add + RMSNorm + quantization, SwiGLU, the last
    layer's splitk_sum) gives the very logits and answers of each GEMV summing its own
    (consumer_sums=()), decode in CUDA graphs."""
    from fp8vl.kernels.gemm import decode_config

    L = Loaded(load_model(wide_fp8.out, "cuda"), load_processor(wide_fp8.out, True), True, wide_fp8.out)
    reqs = _cuda_requests(L)
    every = ("qkv", "o", "gate_up", "down")
    ours = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4, consumer_sums=every))
    theirs = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4, consumer_sums=()))
    assert ours._use_graphs() and ours.fused
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    first = ours.layers[0]
    assert all(decode_config(1, m.out_features, m.in_features, sms).kwargs["SPLIT_K"] > 1
               for m in (first.qkv, first.o, first.down)), "the GEMVs do not split K: the test proves nothing"
    req = reqs[0]
    answer = next(ours.generate([req]))[1]
    assert torch.equal(ours.forced_logits(req.inputs, answer), theirs.forced_logits(req.inputs, answer))
    assert {r.tag: i for r, i in ours.generate(reqs)} == {r.tag: i for r, i in theirs.generate(reqs)}


@pytest.mark.parametrize("which", ["src", "fp8"])
def test_restated_prefill_gives_the_answers_of_transformers_prefill(which, dense_src, dense_fp8):
    """bf16 generation with the prefill through fp8vl's layers and through Transformers' forward
    (restated_prefill=False): the same greedy answers for image and text prompts."""
    L = _loaded(dense_src if which == "src" else dense_fp8.out)
    reqs = _requests(L)[::2]
    eos = eos_ids(L)
    ours = Engine(L.model, eos, EngineOptions(max_len=256, max_new_tokens=12, max_batch=3))
    theirs = Engine(L.model, eos, EngineOptions(max_len=256, max_new_tokens=12, max_batch=3, restated_prefill=False))
    assert ours.restated and not theirs.restated
    assert {r.tag: ids for r, ids in ours.generate(reqs)} == {r.tag: ids for r, ids in theirs.generate(reqs)}


def _cuda_requests(L: Loaded) -> list[Request]:
    return [Request({k: v.cpu() for k, v in r.inputs.items()}, r.tag) for r in _requests(L)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["src", "fp8"])
def test_gpu_prefill_graph_replays_the_eager_layers(which, dense_src, dense_fp8):
    """The captured prefill (inputs padded to a multiple of 64) gives bit for bit what the same
    layers compute eagerly on the same padded inputs: hidden states and cache entries; and the
    engine's logits with graphs stay within bf16 rounding of the unpadded eager prefill."""
    from fp8vl.runtime.engine import PREFILL_PAD, round_up
    from fp8vl.runtime.prefill import decoder_inputs, dense_deepstack, run_layers

    path = dense_src if which == "src" else dense_fp8.out
    L = Loaded(load_model(path, "cuda"), load_processor(path, True), True, path)
    eng = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=2))
    plain = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=2, prefill_graphs=False))
    assert eng._prefill_graphs_ok(1, 64) and not plain._prefill_graphs_ok(1, 64)
    assert (eng.fused is not None) == (which == "fp8")
    reqs = _cuda_requests(L)
    for req in (reqs[0], reqs[4]):                          # an image prompt, a text prompt
        inputs = {k: v.cuda() for k, v in req.inputs.items()}
        n = inputs["input_ids"].shape[1]
        n_pad = round_up(n, PREFILL_PAD)
        for _ in range(2):                                  # capture, then a replay of the captured graph
            logits = eng._prefill([1], [req.inputs])[0][0]
        d = decoder_inputs(L.model, inputs)
        cos, sin = eng.rotary(d.embeds, d.position_ids)
        ds = dense_deepstack(d)
        k = [torch.zeros_like(t) for t in eng.k]
        v = [torch.zeros_like(t) for t in eng.v]
        with torch.no_grad():
            x = run_layers(eng.layers, pad_tokens(d.embeds, n_pad), pad_tokens(cos, n_pad), pad_tokens(sin, n_pad),
                           None if ds is None else pad_tokens(ds, n_pad, 2), k, v, torch.tensor([1], device="cuda"),
                           eng.fused)
        graph_out = eng.prefill_graphs[(1, n_pad, 0 if ds is None else ds.shape[0])][1]
        assert torch.equal(graph_out[:, :n], x[:, :n])
        assert all(torch.equal(a[1, :, :n], b[1, :, :n]) for a, b in zip(eng.k + eng.v, k + v))
        # unpadded eager: other GEMM shapes, so bf16 rounding differs (FP8: whole e4m3 steps at times)
        ref = plain._prefill([1], [req.inputs])[0][0]
        st = kl_stats(ref.float()[None].cpu(), logits.float()[None].cpu())
        assert st["kl_max"] < (1e-3 if which == "src" else 1e-2) and st["top1"] == 1.0, st
    assert len(eng.prefill_graphs) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_answers_are_the_same_with_and_without_prefill_graphs(dense_src):
    L = Loaded(load_model(dense_src, "cuda"), load_processor(dense_src, True), True, dense_src)
    reqs = _cuda_requests(L)
    graphs = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4))
    eager = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=12, max_batch=4, prefill_graphs=False))
    got = {r.tag: i for r, i in graphs.generate(reqs)}
    assert len(graphs.prefill_graphs) >= 2 and not eager.prefill_graphs
    assert got == {r.tag: i for r, i in eager.generate(reqs)}


def _left_padded(L: Loaded, inputs: dict[str, torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """The same prompt with ``pad`` pad tokens in front, masked out (a row of a left-padded batch)."""
    tok = getattr(L.processor, "tokenizer", L.processor)
    out = dict(inputs)
    out["input_ids"] = torch.cat([torch.full((1, pad), tok.pad_token_id), inputs["input_ids"]], 1)
    out["attention_mask"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), inputs["attention_mask"]], 1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([torch.zeros(1, pad, dtype=inputs["mm_token_type_ids"].dtype),
                                              inputs["mm_token_type_ids"]], 1)
    return out


def test_padded_prompts_give_transformers_answers(dense_src):
    """Left-padded prompts (an attention mask with zeros), text and image, float32: the engine gives
    Transformers' own greedy answer for the padded input, and the answer of the unpadded prompt;
    a row of a batch that is not one prompt is refused with one line."""
    L = _loaded(dense_src, torch.float32)
    eng = Engine(L.model, [], EngineOptions(max_len=256, max_new_tokens=10, max_batch=3))
    reqs = [_requests(L)[0], _requests(L)[4]]                    # an image prompt, a text prompt
    padded = [Request(_left_padded(L, r.inputs, 5 + 3 * i), r.tag) for i, r in enumerate(reqs)]
    got = {r.tag: ids for r, ids in eng.generate(padded)}
    assert got == {r.tag: ids for r, ids in eng.generate(reqs)}
    for r in padded:
        with torch.no_grad():
            out = L.model.generate(**r.inputs, do_sample=False, max_new_tokens=10, eos_token_id=[])
        assert out[0, r.inputs["input_ids"].shape[1]:].tolist() == got[r.tag], r.tag
    pair = {k: torch.cat([v, v]) for k, v in reqs[1].inputs.items()}
    with pytest.raises(FP8VLError, match="one Request per row"):
        list(eng.generate([Request(pair, "two")]))
