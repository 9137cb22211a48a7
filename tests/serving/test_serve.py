"""``fp8vl serve``: the exact server command (vLLM with the plan's flags, or Transformers), and running it."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fp8vl import FP8VLError
from fp8vl.serving.gpus import GIB, GPU, lookup
from fp8vl.serving.serve import INSTALL, run, serve_command
from fp8vl.apps.tiny import write_header_only
from fp8vl.serving.vram import plan_vram
from helpers import FP8VL, cli_env, run_cli
from test_vram import ckpt_8b, qwen3_vl_8b_config  # noqa: F401  (module fixture)

FLAGS_WITH_VALUES = {"--host", "--port", "--max-model-len", "--gpu-memory-utilization", "--max-num-seqs",
                     "--max-num-batched-tokens", "--tensor-parallel-size", "--kv-cache-dtype",
                     "--limit-mm-per-prompt", "--mm-processor-kwargs"}


@pytest.fixture(scope="module")
def text_8b(tmp_path_factory) -> Path:
    """A text-only Qwen3-8B-shaped FP8 checkpoint (header only): no vision flags expected."""
    tc = qwen3_vl_8b_config()["text_config"]
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "tie_word_embeddings": False,
           **{k: v for k, v in tc.items() if k != "model_type"}}
    h, i, v, hd = tc["hidden_size"], tc["intermediate_size"], tc["vocab_size"], tc["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(tc["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, shp in (("self_attn.q_proj", (32 * hd, h)), ("self_attn.k_proj", (8 * hd, h)),
                          ("self_attn.v_proj", (8 * hd, h)), ("self_attn.o_proj", (h, 32 * hd)),
                          ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))):
            shapes[p + name + ".weight"] = shp
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return write_header_only(tmp_path_factory.mktemp("hdr-text") / "Qwen3-8B-FP8", cfg, shapes)


def parse_vllm(cmd: list[str], model: Path) -> tuple[dict[str, str | None], list[str]]:
    """fp8vl's flags as {flag: value} (None for a switch) and whatever follows them."""
    assert cmd[:3] == ["vllm", "serve", str(model)]
    flags: dict[str, str | None] = {}
    i = 3
    while i < len(cmd) and (cmd[i] in FLAGS_WITH_VALUES or cmd[i] == "--enforce-eager"):
        assert cmd[i] not in flags, f"{cmd[i]} given twice"
        if cmd[i] == "--enforce-eager":
            flags[cmd[i]], i = None, i + 1
        else:
            flags[cmd[i]], i = cmd[i + 1], i + 2
    return flags, cmd[i:]


CASES = {   # model, GPU, tp, kv cache dtype, utilization, max pixels, images per prompt, enforce eager
    "8b-4080": ("ckpt_8b", "RTX 4080", 1, "auto", 0.9, 512 * 512, 1, False),
    "8b-4090-tp2-fp8kv": ("ckpt_8b", "RTX 4090", 2, "fp8", 0.85, 1024 * 1024, 2, False),
    "8b-3090-eager": ("ckpt_8b", "RTX 3090", 1, "auto", 0.95, 448 * 448, 3, True),
    "tiny-l4": ("tiny", "L4", 1, "auto", 0.8, 256 * 256, 1, False),
    "text-5090-fp8kv": ("text_8b", "RTX 5090", 1, "fp8", 0.9, 512 * 512, 1, False),
}


@pytest.mark.parametrize("case", CASES)
def test_vllm_command_carries_exactly_the_plans_flags(case, request, dense_fp8):
    which, gpu_name, tp, kv, util, pixels, images, eager = CASES[case]
    model = dense_fp8.out if which == "tiny" else request.getfixturevalue(which)
    vision = "vision_config" in json.loads((model / "config.json").read_text())
    p = plan_vram(model, lookup(gpu_name), tp=tp, utilization=util, max_pixels=pixels, images_per_prompt=images,
                  kv_cache_dtype=kv, enforce_eager=eager)
    extra = ["--seed", "7", "--served-model-name", "m"]
    cmd = serve_command(model, "vllm", p, "0.0.0.0", 8123, extra, enforce_eager=eager)
    flags, rest = parse_vllm(cmd, model)
    assert rest == extra                                   # passed through, last
    expected = {"--host", "--port", "--max-model-len", "--gpu-memory-utilization", "--max-num-seqs",
                "--max-num-batched-tokens"}
    expected |= {"--tensor-parallel-size"} if tp > 1 else set()
    expected |= {"--kv-cache-dtype"} if kv == "fp8" else set()
    expected |= {"--limit-mm-per-prompt", "--mm-processor-kwargs"} if vision else set()
    expected |= {"--enforce-eager"} if eager else set()
    assert set(flags) == expected
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "8123"
    assert int(flags["--max-model-len"]) == p.max_model_len >= 1024
    assert float(flags["--gpu-memory-utilization"]) == util
    assert int(flags["--max-num-seqs"]) == p.max_num_seqs
    assert int(flags["--max-num-batched-tokens"]) == 4096
    if tp > 1:
        assert int(flags["--tensor-parallel-size"]) == tp
    if kv == "fp8":
        assert flags["--kv-cache-dtype"] == "fp8"
    if vision:
        assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": images, "video": 0}
        assert json.loads(flags["--mm-processor-kwargs"]) == {"max_pixels": pixels}


def test_more_pixels_per_image_cost_kv_tokens(ckpt_8b):
    small = plan_vram(ckpt_8b, lookup("RTX 4090"), max_pixels=256 * 256)
    big = plan_vram(ckpt_8b, lookup("RTX 4090"), max_pixels=1280 * 1280)
    assert big.vision_tokens > small.vision_tokens and big.kv_tokens < small.kv_tokens


def test_transformers_engine_command():
    cmd = serve_command("/models/x-fp8", "transformers", None, "0.0.0.0", 9001, ["--log-level", "debug"])
    assert cmd == ["transformers", "serve", "/models/x-fp8", "--host", "0.0.0.0", "--port", "9001",
                   "--log-level", "debug"]


def test_vllm_without_a_plan_and_unknown_engine_are_refused():
    with pytest.raises(FP8VLError, match="--gpu"):
        serve_command("/models/x", "vllm", None)
    with pytest.raises(FP8VLError, match="sglang"):
        serve_command("/models/x", "sglang", None)


# ---------------------------------------------------------------- the command line

def printed_command(stdout: str, width: int = 120) -> list[str]:
    """The server command at the end of ``stdout`` as a shell reads it when pasted: every line but the
    last ends in " \\" (a continuation), the lines fit ``width`` (the CLI's piped console), and the shell
    joins them (backslash-newline removed) before splitting."""
    lines = stdout.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(("vllm serve ", "transformers serve ")))
    lines = lines[start:]
    assert all(line.endswith(" \\") for line in lines[:-1]) and not lines[-1].endswith("\\"), lines
    assert all(len(line) <= width for line in lines), lines
    return shlex.split("\n".join(lines).replace("\\\n", ""))


def one_line(r) -> list[str]:
    """The command ``serve --dry-run`` printed, and nothing else."""
    assert r.returncode == 0, r.stderr
    cmd = printed_command(r.stdout)
    assert r.stdout.lstrip().startswith(" ".join(cmd[:2])), r.stdout
    return cmd


def test_shell_lines_paste_back_into_the_command_at_any_width():
    from fp8vl.serving.serve import shell_lines

    cmd = ["vllm", "serve", "/models/my model [v2]", "--port", "8000", "--limit-mm-per-prompt",
           '{"image": 1, "video": 0}', "--served-model-name", "it's", "--enforce-eager", "--seed", "-1"]
    for width in (10, 40, 80, 120, 1000):
        lines = shell_lines(cmd, width)
        assert shlex.split("\n".join(lines).replace("\\\n", "")) == cmd, (width, lines)
        assert all(line.endswith(" \\") for line in lines[:-1]) and not lines[-1].endswith("\\")
        # a line is longer than the width only where one option with its value is
        assert all(len(line) <= width or line.count(" --") <= 1 for line in lines), (width, lines)
    assert len(shell_lines(cmd, 1000)) == 1 and shell_lines(cmd, 40)[1].startswith("  --port 8000")


def test_plan_prints_the_vllm_command_so_it_pastes_and_is_the_one_serve_runs(ckpt_8b, tmp_path):
    r = run_cli("plan", ckpt_8b, "--gpu", "RTX 4080", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert printed_command(r.stdout) == serve_command(ckpt_8b, "vllm", plan_vram(ckpt_8b, lookup("RTX 4080")))
    assert r.stdout.rstrip().splitlines()[-2].endswith(" \\")   # longer than 120 columns: continued


def test_cli_dry_run_prints_the_api_command_with_passthrough_args_last(ckpt_8b, tmp_path):
    r = run_cli("serve", ckpt_8b, "--dry-run", "--gpu", "RTX 4090", "--tp", "2", "--kv-cache-dtype", "fp8",
                "--max-pixels", "802816", "--images-per-prompt", "2", "--gpu-memory-utilization", "0.85",
                "--host", "0.0.0.0", "--port", "8123", "--", "--seed", "3", "--served-model-name", "qwen",
                cwd=tmp_path)
    p = plan_vram(ckpt_8b, lookup("RTX 4090"), tp=2, utilization=0.85, max_pixels=802816, images_per_prompt=2,
                  kv_cache_dtype="fp8")
    assert one_line(r) == serve_command(ckpt_8b, "vllm", p, "0.0.0.0", 8123,
                                        ["--seed", "3", "--served-model-name", "qwen"])


def test_cli_dry_run_with_vram_and_cc_on_the_tiny_model(dense_fp8, tmp_path):
    r = run_cli("serve", dense_fp8.out, "--dry-run", "--vram", "16GiB", "--cc", "8.9", "--enforce-eager",
                cwd=tmp_path)
    p = plan_vram(dense_fp8.out, GPU("16GiB GPU", 16 * GIB, (8, 9)), enforce_eager=True)
    cmd = one_line(r)
    assert cmd == serve_command(dense_fp8.out, "vllm", p, enforce_eager=True)
    flags, rest = parse_vllm(cmd, dense_fp8.out)
    assert rest == [] and int(flags["--max-model-len"]) == 2048     # the tiny model's context limit


def test_cli_transformers_engine_needs_no_gpu(dense_fp8, tmp_path):
    r = run_cli("serve", dense_fp8.out, "--dry-run", "--engine", "transformers", "--host", "0.0.0.0",
                "--port", "9000", "--", "--log-level", "info", cwd=tmp_path)
    assert one_line(r) == ["transformers", "serve", str(dense_fp8.out), "--host", "0.0.0.0", "--port", "9000",
                           "--log-level", "info"]


# ---------------------------------------------------------------- running it

def test_run_a_missing_binary_raises_fp8vl_error_naming_it():
    with pytest.raises(FP8VLError, match="`definitely-not-installed-xyz` is not installed"):
        run(["definitely-not-installed-xyz", "--help"])


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_run_without_the_server_installed_gives_the_pip_hint(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))       # an empty PATH: the server cannot be found
    with pytest.raises(FP8VLError) as e:
        run([engine, "serve", "/models/x"])
    assert f"`{engine}` is not installed" in str(e.value) and INSTALL[engine] in str(e.value)
    assert "pip install" in INSTALL[engine]


@pytest.mark.parametrize("binary,code", [("true", 0), ("false", 1)])
def test_run_returns_the_servers_exit_code(binary, code):
    assert run([binary]) == code


@pytest.fixture(scope="module")
def cli_without_vllm(ckpt_8b, tmp_path_factory):
    """`fp8vl serve` (not a dry run) where no vllm is on PATH."""
    empty = tmp_path_factory.mktemp("empty-path")
    exe = [str(FP8VL)] if FP8VL.exists() else [sys.executable, "-m", "fp8vl.cli"]
    return subprocess.run([*exe, "serve", str(ckpt_8b), "--gpu", "RTX 4080"], capture_output=True, text=True,
                          env=dict(cli_env(), PATH=str(empty)), cwd=empty, timeout=120)


def test_cli_serve_without_vllm_exits_2_with_one_line(cli_without_vllm):
    r = cli_without_vllm
    assert r.returncode == 2, r.stderr
    assert printed_command(r.stdout)[:2] == ["vllm", "serve"]   # the command it tried
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `vllm` is not installed")
    assert "pip install vllm" in lines[0] and "Traceback" not in r.stderr


def test_cli_serve_without_vllm_prints_the_extra_in_the_pip_hint(cli_without_vllm):
    assert INSTALL["vllm"] in cli_without_vllm.stderr
