"""``fp8vl eval``: drift of an FP8 copy from its source, end to end, on text and image prompts.

The source runs first and its results are kept on the CPU (greedy answers, next-token logits on
its own answers, perplexity); then it is freed and the FP8 model is loaded and run on the very same
token sequences. One model on the device at a time: an 8B pair fits a 24 GB GPU. The FP8 side
computes what a server computes: FP8 weights with dynamic 1x128 activation quantization, through
real FP8 GEMMs on GPUs that have them, simulated elsewhere (runtime/fp8_modules.py).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import out_of_memory
from ..runtime.loader import Loaded, check_processor, encode, eos_ids, load_any, model_device
from ..inputs.prompts import Prompt, open_image


@torch.no_grad()
def logits_for(loaded: Loaded, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[T, vocab] float32 logits of one sequence, on the CPU."""
    return loaded.model(**batch).logits[0].float().cpu()


def kl_stats(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> dict:
    """KL(ref || q) in nats (mean and max over positions) and top-1 agreement, over [T, vocab] logits."""
    lp, lq = ref_logits.log_softmax(-1), q_logits.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    top1 = (ref_logits.argmax(-1) == q_logits.argmax(-1)).float()
    return {"tokens": int(kl.numel()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float(top1.mean())}


def compare_models(ref: Loaded, q: Loaded, text: str, image=None) -> dict:
    """Next-token KL and top-1 of two loaded models over one prompt's positions."""
    batch = encode(ref, text, image)
    return kl_stats(logits_for(ref, batch), logits_for(q, {k: v.to(model_device(q)) for k, v in batch.items()}))


def answers(loaded: Loaded, batches: list[dict[str, torch.Tensor]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (EOS excluded) of every prompt, generated together by fp8vl's engine."""
    from ..runtime.engine import Engine, EngineOptions, Request, round_up

    longest = max(b["input_ids"].shape[1] for b in batches)
    opts = EngineOptions(max_len=round_up(longest + max_new_tokens + 1), max_batch=min(len(batches), 32),
                         max_new_tokens=max_new_tokens)
    engine = Engine(loaded.model, eos_ids(loaded), opts)
    out = {req.tag: ids for req, ids in engine.generate(Request(b, i) for i, b in enumerate(batches))}
    return [out[i] for i in range(len(batches))]


def _with_answer(batch: dict[str, torch.Tensor], answer: list[int]) -> dict[str, torch.Tensor]:
    """The prompt batch extended by the answer tokens (text tokens: no new image positions)."""
    if not answer:
        return batch
    dev = batch["input_ids"].device
    ext = torch.tensor([answer], device=dev, dtype=batch["input_ids"].dtype)
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], ext], 1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in batch:
            fill = torch.ones_like(ext) if key == "attention_mask" else torch.zeros_like(ext)
            out[key] = torch.cat([batch[key], fill.to(batch[key].dtype)], 1)
    return out


@torch.no_grad()
def perplexity(loaded: Loaded, text: str) -> float:
    """exp(mean NLL) of the raw text (no chat template)."""
    batch = encode(loaded, text, chat=False)
    logits = logits_for(loaded, batch)[:-1]
    target = batch["input_ids"][0, 1:].cpu()
    return math.exp(float(torch.nn.functional.cross_entropy(logits, target)))


@dataclass
class SideResult:
    """What one model produced for one prompt."""

    answer: list[int]
    logits: torch.Tensor | None    # [answer positions, vocab] on the answer sequence (source side only)
    ppl: float | None


def run_source(loaded: Loaded, prompts: list[Prompt], max_new_tokens: int,
               tick: Callable[[Prompt], None] = lambda p: None) -> list[SideResult]:
    batches = [encode(loaded, p.text, open_image(p.image) if p.image else None) for p in prompts]
    out = []
    for p, batch, answer in zip(prompts, batches, answers(loaded, batches, max_new_tokens)):
        n = batch["input_ids"].shape[1]
        logits = logits_for(loaded, _with_answer(batch, answer))[n - 1: n - 1 + max(1, len(answer))]
        out.append(SideResult(answer, logits, perplexity(loaded, p.text) if not p.image else None))
        tick(p)
    return out


@dataclass
class PromptResult:
    id: str
    kind: str
    kl_mean: float
    kl_max: float
    top1: float
    exact_match: bool
    first_divergence: int | None     # token index where the greedy answers first differ
    source_answer: str
    fp8_answer: str
    ppl_source: float | None = None
    ppl_fp8: float | None = None


@dataclass
class EvalReport:
    source: str
    quantized: str
    runtime: str
    device: str
    max_new_tokens: int
    prompts: list[PromptResult] = field(default_factory=list)

    def summary(self) -> dict[str, dict]:
        out = {}
        for kind in ("text", "image"):
            rs = [r for r in self.prompts if r.kind == kind]
            if not rs:
                continue
            div = [r.first_divergence for r in rs if r.first_divergence is not None]
            ppl = [(r.ppl_source, r.ppl_fp8) for r in rs if r.ppl_source is not None]
            out[kind] = {
                "prompts": len(rs),
                "kl_mean": sum(r.kl_mean for r in rs) / len(rs),
                "kl_max": max(r.kl_max for r in rs),
                "top1": sum(r.top1 for r in rs) / len(rs),
                "greedy_exact_match": sum(r.exact_match for r in rs) / len(rs),
                "mean_first_divergence": sum(div) / len(div) if div else None,
                "ppl_source": math.exp(sum(math.log(a) for a, _ in ppl) / len(ppl)) if ppl else None,
                "ppl_fp8": math.exp(sum(math.log(b) for _, b in ppl) / len(ppl)) if ppl else None,
            }
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2)


def _decode(loaded: Loaded, ids: list[int]) -> str:
    tok = getattr(loaded.processor, "tokenizer", loaded.processor)
    return tok.decode(ids, skip_special_tokens=True)


def _free(loaded: Loaded) -> None:
    """Drop a model so the next one can use the device memory."""
    del loaded.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(source: str | Path, quantized: str | Path, prompts: list[Prompt], device: str = "auto",
             mode: str = "auto", max_new_tokens: int = 32,
             tick: Callable[[], None] = lambda: None, gpu_memory: int | None = None, phases=None) -> EvalReport:
    """Run source then FP8 on the same prompts; ``tick`` is called after each prompt of each side.
    ``device``: auto (a usable CUDA GPU, else the CPU), cpu or cuda; the report names the one that ran.
    ``phases`` (a ``report.Phases``): progress of each model's load (bytes) and of each side's prompts
    of each kind."""
    from ..runtime.engine import limit_gpu_memory
    from ..checkpoint.source import local_folder, locate, resolve
    from ..options import resolve_device

    locate(source), local_folder(quantized)   # both paths checked before anything is downloaded or loaded
    device = resolve_device(device)
    src, q = resolve(source), Path(quantized)
    limit_gpu_memory(device, gpu_memory)
    for folder in (src, q):  # both, before the source side runs for minutes
        check_processor(folder)
    with out_of_memory(device, f"use a smaller --max-new-tokens (now {max_new_tokens}), a GPU with more memory, "
                               "or --device cpu"):
        return _evaluate(src, q, prompts, device, mode, max_new_tokens, _Progress(phases, prompts, tick))


class _Progress:
    """eval's progress: ``phases.start`` per model load and per (side, prompt kind); ``tick`` per prompt."""

    def __init__(self, phases, prompts: list[Prompt], tick: Callable[[], None]):
        self.phases, self.tick, self.live = phases, tick, {}
        self.total = {k: sum(p.kind == k for p in prompts) for k in dict.fromkeys(p.kind for p in prompts)}

    def load(self, side: str, path: Path):
        return self.phases.start(f"{side}: loading {path.name}", None, "B") if self.phases else None

    def side(self, side: str) -> Callable[[Prompt], None]:
        def done(p: Prompt) -> None:
            self.tick()
            if self.phases is None:
                return
            key = (side, p.kind)
            if key not in self.live:
                self.live[key] = [self.phases.start(f"{side}: {p.kind} prompts", self.total[p.kind], "prompts"), 0]
            self.live[key][1] += 1
            self.live[key][0](self.live[key][1])
        return done


def _evaluate(src: Path, q: Path, prompts: list[Prompt], device: str, mode: str, max_new_tokens: int,
              progress: _Progress) -> EvalReport:
    ref = load_any(src, device, progress=progress.load("source", src))
    base = run_source(ref, prompts, max_new_tokens, progress.side("source"))
    texts = [_decode(ref, r.answer) for r in base]
    _free(ref)
    fp8 = load_any(q, device, mode, progress=progress.load("FP8", q))
    tick = progress.side("FP8")
    report = EvalReport(str(src), str(q), fp8.label, device, max_new_tokens)
    batches = [encode(fp8, p.text, open_image(p.image) if p.image else None) for p in prompts]
    for p, b, src_text, batch, answer in zip(prompts, base, texts, batches, answers(fp8, batches, max_new_tokens)):
        n = batch["input_ids"].shape[1]
        logits = logits_for(fp8, _with_answer(batch, b.answer))[n - 1: n - 1 + max(1, len(b.answer))]
        st = kl_stats(b.logits, logits)
        div = next((i for i, (x, y) in enumerate(zip(b.answer, answer)) if x != y),
                   None if len(b.answer) == len(answer) else min(len(b.answer), len(answer)))
        report.prompts.append(PromptResult(
            p.id, p.kind, st["kl_mean"], st["kl_max"], st["top1"], div is None, div, src_text,
            _decode(fp8, answer), b.ppl, perplexity(fp8, p.text) if b.ppl is not None else None))
        tick(p)
    _free(fp8)
    return report
