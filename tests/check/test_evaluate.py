"""``fp8vl eval``: drift figures checked against an independent computation.

The reference here is written plainly: Transformers' own processor and model for the BF16 source,
``fp8vl.runtime.loader.load_fp8_model(mode="w8a8")`` for the FP8 side (its numerics are judged against
plain float32 math in runtime/test_fp8_modules.py), greedy answers from ``generate``, and KL / top-1 /
perplexity computed in float64 from the logits. fp8vl's report must carry the same figures.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fp8vl.errors import FP8VLError
from fp8vl.check.evaluate import evaluate
from fp8vl.inputs.prompts import Prompt, builtin, load_jsonl, open_image
from helpers import astronaut, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = "Explain in two sentences why the sky is blue."
IMAGE_Q = "What is the person in this picture wearing?"
NEW_TOKENS = 6
EVAL_BEGIN, EVAL_END = "<!-- fp8vl:eval -->", "<!-- /fp8vl:eval -->"


# ---------------------------------------------------------------- the independent reference

class Reference:
    """Source via Transformers, FP8 via load_fp8_model(w8a8); figures in float64."""

    def __init__(self, src: Path, fp8: Path):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from fp8vl.runtime.loader import load_fp8_model

        self.proc = AutoProcessor.from_pretrained(src)
        self.src = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16, device_map="cpu").eval()
        self.fp8 = load_fp8_model(fp8, "cpu", "w8a8")
        eos = json.loads((src / "generation_config.json").read_text())["eos_token_id"]
        self.eos = eos if isinstance(eos, list) else [eos]

    def inputs(self, text: str, image=None) -> dict[str, torch.Tensor]:
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        chat = self.proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        return dict(self.proc(text=[chat], images=[image] if image is not None else None, return_tensors="pt"))

    @torch.no_grad()
    def greedy(self, model, batch, max_new_tokens: int) -> list[int]:
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.eos,
                             temperature=None, top_p=None, top_k=None)
        return out[0, batch["input_ids"].shape[1]:].tolist()

    def decode(self, ids: list[int]) -> str:
        return self.proc.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def figures(self, text: str, image=None, max_new_tokens: int = NEW_TOKENS) -> dict:
        """KL(source || FP8) and top-1 over the positions that predict the source's greedy answer."""
        batch = self.inputs(text, image)
        n = batch["input_ids"].shape[1]
        answer = self.greedy(self.src, batch, max_new_tokens)
        assert answer, "the source produced no token"
        ext = dict(batch)
        tail = torch.tensor([answer])
        ext["input_ids"] = torch.cat([batch["input_ids"], tail], 1)
        ext["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], 1)
        if "mm_token_type_ids" in batch:   # answer tokens are text tokens
            ext["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tail)], 1)
        span = slice(n - 1, n - 1 + len(answer))
        lp = self.src(**ext).logits[0, span].double().log_softmax(-1)
        lq = self.fp8(**ext).logits[0, span].double().log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        fp8_answer = self.greedy(self.fp8, batch, max_new_tokens)
        return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                "top1": float((lp.argmax(-1) == lq.argmax(-1)).double().mean()),
                "answer": answer, "fp8_answer_ids": fp8_answer,
                "source_answer": self.decode(answer), "fp8_answer": self.decode(fp8_answer)}

    @torch.no_grad()
    def perplexity(self, model, text: str) -> float:
        ids = self.proc.tokenizer(text, return_tensors="pt")["input_ids"]
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        return math.exp(float(-logp.gather(1, ids[0, 1:, None]).mean()))


@pytest.fixture(scope="module")
def reference(dense_fp8) -> Reference:
    return Reference(dense_fp8.src, dense_fp8.out)


@pytest.fixture(scope="module")
def dense_report(dense_fp8):
    prompts = [Prompt("sky", TEXT), Prompt("astronaut", IMAGE_Q, "skimage:astronaut")]
    return evaluate(dense_fp8.src, dense_fp8.out, prompts, device="cpu", mode="w8a8", max_new_tokens=NEW_TOKENS)


def summarize(prompts: list[dict]) -> dict:
    """The summary of the report these per-prompt figures belong to (EvalReport.summary itself is
    checked on figures with known answers in test_summary_of_known_figures)."""
    from fp8vl.check.evaluate import EvalReport, PromptResult

    r = EvalReport("s", "q", "runtime", "cpu", NEW_TOKENS, [PromptResult(**p) for p in prompts])
    return r.summary()


def test_summary_of_known_figures():
    """Means, maxima, the share of exact answers, the mean first divergence over diverging prompts,
    and geometric-mean perplexities, on figures whose answers are known: (2*2)^0.5 = 2 ... """
    from fp8vl.check.evaluate import EvalReport, PromptResult

    r = EvalReport("s", "q", "runtime", "cpu", 8, [
        PromptResult("a", "text", 0.1, 0.5, 1.0, True, None, "x", "x", 2.0, 1.0),
        PromptResult("b", "text", 0.3, 0.9, 0.5, False, 3, "x", "y", 8.0, 16.0),
        PromptResult("c", "image", 0.25, 0.25, 0.75, False, 1, "x", "y"),
    ])
    s = r.summary()
    assert s["text"] == pytest.approx({"prompts": 2, "kl_mean": 0.2, "kl_max": 0.9, "top1": 0.75,
                                       "greedy_exact_match": 0.5, "mean_first_divergence": 3.0,
                                       "ppl_source": 4.0, "ppl_fp8": 4.0})
    assert s["image"] == {"prompts": 1, "kl_mean": 0.25, "kl_max": 0.25, "top1": 0.75, "greedy_exact_match": 0.0,
                          "mean_first_divergence": 1.0, "ppl_source": None, "ppl_fp8": None}


def assert_summary(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for kind, w in want.items():
        assert set(got[kind]) == set(w)
        for key, value in w.items():
            if value is None:
                assert got[kind][key] is None, (kind, key)
            else:
                assert got[kind][key] == pytest.approx(value, rel=1e-12), (kind, key)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------- a model against itself

@pytest.mark.parametrize("which", ["bf16 source", "fp8 copy"])
def test_a_model_against_itself_has_zero_kl_and_full_agreement(dense_fp8, which):
    model = dense_fp8.src if which == "bf16 source" else dense_fp8.out
    prompts = [Prompt("sky", TEXT), Prompt("astronaut", IMAGE_Q, "skimage:astronaut")]
    r = evaluate(model, model, prompts, device="cpu", max_new_tokens=NEW_TOKENS)
    assert [(p.id, p.kind) for p in r.prompts] == [("sky", "text"), ("astronaut", "image")]
    for p in r.prompts:
        assert p.kl_mean < 1e-9 and p.kl_max < 1e-9
        assert p.top1 == 1.0 and p.exact_match and p.first_divergence is None
        assert p.source_answer == p.fp8_answer and p.source_answer != ""
    assert r.prompts[0].ppl_source == r.prompts[0].ppl_fp8 > 1
    assert r.prompts[1].ppl_source is None
    for s in r.summary().values():
        assert s["kl_max"] < 1e-9 and s["top1"] == 1.0 and s["greedy_exact_match"] == 1.0


# ---------------------------------------------------------------- source vs FP8, recomputed

def test_source_vs_fp8_kl_top1_and_answers_match_an_independent_computation(dense_report, reference):
    assert dense_report.runtime == "fp8 w8a8" and dense_report.max_new_tokens == NEW_TOKENS
    got = {p.id: p for p in dense_report.prompts}
    for pid, text, image in (("sky", TEXT, None), ("astronaut", IMAGE_Q, astronaut())):
        want = reference.figures(text, image)
        p = got[pid]
        assert p.kind == ("image" if image is not None else "text")
        assert p.kl_mean == pytest.approx(want["kl_mean"], rel=1e-5), pid
        assert p.kl_max == pytest.approx(want["kl_max"], rel=1e-5), pid
        assert p.top1 == pytest.approx(want["top1"], abs=1e-6), pid
        assert p.kl_mean > 0                      # FP8 is not the source
        assert p.source_answer == want["source_answer"] and p.fp8_answer == want["fp8_answer"]
        div = first_divergence(want["answer"], want["fp8_answer_ids"])
        assert p.exact_match == (div is None) and p.first_divergence == div


def test_perplexity_of_a_text_matches_an_independent_computation(dense_report, reference):
    p = next(p for p in dense_report.prompts if p.kind == "text")
    assert p.ppl_source == pytest.approx(reference.perplexity(reference.src, TEXT), rel=1e-5)
    assert p.ppl_fp8 == pytest.approx(reference.perplexity(reference.fp8, TEXT), rel=1e-5)
    assert p.ppl_source != p.ppl_fp8


def test_report_summary_and_json_agree_with_the_prompts(dense_report):
    data = json.loads(dense_report.to_json())
    assert [p["id"] for p in data["prompts"]] == ["sky", "astronaut"]
    assert_summary(data["summary"], summarize(data["prompts"]))
    assert data["summary"]["text"]["kl_mean"] > 0 and data["summary"]["image"]["kl_mean"] > 0


# ---------------------------------------------------------------- prompt files

def test_prompt_file_resolves_images_relative_to_itself(tmp_path):
    from PIL import Image
    from skimage import data

    (tmp_path / "img").mkdir()
    Image.fromarray(data.coffee()).save(tmp_path / "img" / "coffee.png")
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join([json.dumps({"id": "sky", "text": TEXT}), "",
                            json.dumps({"text": "What is this?", "image": "img/coffee.png"}),
                            json.dumps({"text": "And this?", "image": "skimage:astronaut"})]) + "\n")
    got = load_jsonl(f)
    assert [(p.id, p.kind) for p in got] == [("sky", "text"), ("prompts-3", "image"), ("prompts-4", "image")]
    assert Path(got[1].image) == tmp_path / "img" / "coffee.png"
    assert got[2].image == "skimage:astronaut"


def test_builtin_prompts_take_limit_of_each_kind():
    got = builtin(limit=2)
    assert [p.kind for p in got] == ["text", "text", "image", "image"]
    assert len({p.id for p in got}) == 4 and all(p.image.startswith("skimage:") for p in got[2:])
    everything = builtin()
    assert len(everything) > 4 and len({p.id for p in everything}) == len(everything)


BAD_LINES = {
    "not json": "{text: 'no quotes'}",
    "no text field": json.dumps({"prompt": "hello"}),
    "a list": json.dumps(["hello"]),
    "a string": json.dumps("hello"),
    "image file missing": json.dumps({"text": "What is this?", "image": "nowhere/missing.png"}),
    "text not a string": json.dumps({"text": 5}),
    "text null": json.dumps({"text": None}),
    "image not a string": json.dumps({"text": "What is this?", "image": 5}),
    "unknown scikit-image photo": json.dumps({"text": "What is this?", "image": "skimage:no_such_photo"}),
    "scikit-image downloader": json.dumps({"text": "What is this?", "image": "skimage:download_all"}),
    "scikit-image data needing a download": json.dumps({"text": "What is this?", "image": "skimage:brain"}),
}


def _bad_file(tmp_path: Path, line: str) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"id": "ok", "text": TEXT}) + "\n\n" + line + "\n")   # the bad line is line 3
    return f


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_prompt_line_raises_an_error_naming_file_and_line(tmp_path, case):
    f = _bad_file(tmp_path, BAD_LINES[case])
    with pytest.raises(FP8VLError) as e:
        load_jsonl(f)
    assert f"{f}:3:" in str(e.value) and "\n" not in str(e.value)
    if "scikit-image" in case:                                     # the error lists the photos there are
        assert "astronaut" in str(e.value) and "download_all" not in str(e.value).split("use one of")[1]


def test_skimage_downloader_is_never_called_through_open_image():
    with pytest.raises(FP8VLError, match="astronaut"):
        open_image("skimage:download_all")


def test_prompt_file_not_utf8_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(FP8VLError) as e:
        load_jsonl(f)
    assert str(f) in str(e.value) and "UTF-8" in str(e.value) and "line 2" in str(e.value)
    r = run_cli("eval", tmp_path, tmp_path, "--prompts", f, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(f) in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the command

def test_eval_command_with_prompt_file_report_and_card(dense_fp8, reference, tmp_path):
    from PIL import Image
    from skimage import data

    work = tmp_path / "prompts"
    (work / "img").mkdir(parents=True)
    Image.fromarray(data.coffee()).save(work / "img" / "coffee.png")
    pf = work / "set.jsonl"
    pf.write_text(json.dumps({"id": "sky", "text": TEXT}) + "\n"
                  + json.dumps({"id": "cup", "text": "What drink is shown?", "image": "img/coffee.png"}) + "\n")
    quant = tmp_path / "quant"
    shutil.copytree(dense_fp8.out, quant)
    card_before = (quant / "README.md").read_text()
    cwd = tmp_path / "elsewhere"           # the image path is relative to the prompt file, not the cwd
    cwd.mkdir()
    rep, js = tmp_path / "report", tmp_path / "all.json"
    r = run_cli("eval", dense_fp8.src, quant, "--prompts", pf, "--max-new-tokens", NEW_TOKENS, "--json", js,
                "--report", rep, "--update-card", cwd=cwd, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "sky" in r.stdout and "cup" in r.stdout     # per-prompt table with the ids
    # progress in a log (stdout is a pipe here): each model's load and each side's prompts by kind
    for line in (f"source: loading {dense_fp8.src.name}: ", f"FP8: loading {quant.name}: ",
                 "source: text prompts: 1/1 prompts", "source: image prompts: 1/1 prompts",
                 "FP8: text prompts: 1/1 prompts", "FP8: image prompts: 1/1 prompts"):
        assert line in r.stdout, (line, r.stdout[:2000])

    results = json.loads((rep / "results.json").read_text())
    assert results == json.loads(js.read_text())
    prompts = results["prompts"]
    assert [(p["id"], p["kind"]) for p in prompts] == [("sky", "text"), ("cup", "image")]
    assert_summary(results["summary"], summarize(prompts))

    # the text prompt's figures, recomputed independently
    want = reference.figures(TEXT)
    assert prompts[0]["kl_mean"] == pytest.approx(want["kl_mean"], rel=1e-4)
    assert prompts[0]["source_answer"] == want["source_answer"]
    with Image.open(work / "img" / "coffee.png") as im:
        want_img = reference.figures("What drink is shown?", im.convert("RGB"))
    assert prompts[1]["kl_mean"] == pytest.approx(want_img["kl_mean"], rel=1e-4)
    assert prompts[0]["ppl_source"] == pytest.approx(reference.perplexity(reference.src, TEXT), rel=1e-5)

    # report.md, plots
    md = (rep / "report.md").read_text()
    for p in prompts:
        assert f"| {p['id']} | {p['kl_mean']:.4f} | {p['top1']:.2f} |" in md
    assert "![KL per prompt](kl_per_prompt.png)" in md
    for png in ("kl_per_prompt.png", "sqnr_per_tensor.png"):
        assert (rep / png).read_bytes()[:8] == PNG_MAGIC
        with Image.open(rep / png) as im:
            im.load()
            assert im.format == "PNG" and im.width > 100 and im.height > 100

    # the model card: the eval section, once, with the summary figures; the rest kept
    card = (quant / "README.md").read_text()
    assert card.startswith(card_before.rstrip("\n"))
    assert card.count(EVAL_BEGIN) == 1 and card.count(EVAL_END) == 1
    section = card.split(EVAL_BEGIN, 1)[1].split(EVAL_END, 1)[0]
    for kind, s in summarize(prompts).items():
        assert f"| {kind} | {s['prompts']} | {s['kl_mean']:.5f} | {s['kl_max']:.4f} | {s['top1']:.3f} |" in section
    assert f"{len(prompts)} prompts" in section


@pytest.mark.parametrize("remove,missing", [
    (("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"), "image processor"),
    (("tokenizer.json", "tokenizer_config.json"), "tokenizer"),     # Transformers would build an empty one
])
def test_eval_against_a_folder_without_its_processor_is_one_line(dense_fp8, tmp_path, remove, missing):
    quant = tmp_path / "quant"
    shutil.copytree(dense_fp8.out, quant)
    for name in remove:
        (quant / name).unlink()
    r = run_cli("eval", dense_fp8.src, quant, "--limit", "1", "--max-new-tokens", "2", cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert str(quant) in r.stderr and missing in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.strip() == ""                                  # refused before the source side ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA out-of-memory needs a GPU")
def test_eval_out_of_gpu_memory_is_one_line_with_the_fix(dense_fp8):
    """A real CUDA OOM: this process may use 1 MiB of the GPU, so the source model cannot load."""
    torch.cuda.set_per_process_memory_fraction(2**20 / torch.cuda.get_device_properties(0).total_memory)
    try:
        with pytest.raises(FP8VLError) as e:
            evaluate(dense_fp8.src, dense_fp8.out, [Prompt("sky", TEXT)], device="cuda", max_new_tokens=2)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("out of memory on cuda") and "--max-new-tokens" in msg
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


# ---------------------------------------------------------------- --device auto (the default)

def test_device_auto_is_the_gpu_where_one_can_be_used_else_the_cpu(monkeypatch):
    import fp8vl.options as options

    assert options.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():       # this machine: auto is the CPU, cuda a one-line refusal
        assert options.resolve_device("auto") == "cpu"
        with pytest.raises(FP8VLError, match=r"^--device cuda: .*--device cpu") as e:
            options.resolve_device("cuda")
        assert "\n" not in str(e.value)
    # a GPU PyTorch counts but cannot initialise (an old driver, busy in exclusive mode): auto takes the
    # CPU, cuda is refused with the reason
    monkeypatch.setattr(options, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nmore")))
    assert options.resolve_device("auto") == "cpu"
    with pytest.raises(FP8VLError, match=r"cannot be initialised \(CUDA error: all CUDA-capable devices are busy"):
        options.resolve_device("cuda")
    with pytest.raises(FP8VLError, match=r"there is no GPU 1 \(PyTorch sees 1\)"):
        options.resolve_device("cuda:1")
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: None)     # one that works
    assert options.resolve_device("auto") == "cuda" and options.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(FP8VLError, match="unknown device 'gpu'"):
        options.resolve_device("gpu")


def test_eval_runs_on_the_device_auto_picks_and_the_report_names_it(dense_fp8, monkeypatch):
    """The API mirrors the CLI: evaluate's device defaults to auto, settled before anything loads."""
    import fp8vl.check.evaluate as ev
    import fp8vl.options as options

    monkeypatch.setattr(ev, "_evaluate", lambda src, q, prompts, device, *a: device)
    monkeypatch.setattr(options, "_cuda_unusable", lambda device: None)                # a usable GPU
    assert evaluate(dense_fp8.src, dense_fp8.out, []) == "cuda"
    monkeypatch.setattr(options, "_cuda_unusable", lambda device: "no GPU")            # none
    assert evaluate(dense_fp8.src, dense_fp8.out, []) == "cpu"
    assert evaluate(dense_fp8.src, dense_fp8.out, [], device="cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a usable GPU")
def test_eval_device_cuda_without_a_gpu_is_one_line_with_the_fix(dense_fp8, tmp_path):
    r = run_cli("eval", dense_fp8.src, dense_fp8.out, "--device", "cuda", "--limit", "1", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert lines[0].startswith("error: --device cuda: ") and "--device cpu" in lines[0], lines
