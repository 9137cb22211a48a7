"""``fp8vl serve``: start an OpenAI-compatible server for a checkpoint with the planned flags."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from ..errors import FP8VLError
from .vram import VramPlan, vllm_args

ENGINES = ("vllm", "transformers")
INSTALL = {"vllm": "pip install 'fp8vl[serve]'  (or: pip install vllm)",
           "transformers": "pip install 'transformers[serving]'"}


def serve_command(model_dir: str | Path, engine: str = "vllm", plan: VramPlan | None = None,
                  host: str = "127.0.0.1", port: int = 8000, extra: list[str] | None = None,
                  enforce_eager: bool = False) -> list[str]:
    """The exact command line; ``extra`` is passed through after fp8vl's own flags."""
    if engine not in ENGINES:
        raise FP8VLError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    model_dir = str(Path(model_dir))
    if engine == "vllm":
        if plan is None:
            raise FP8VLError("vllm serve needs a plan (GPU memory); give --gpu NAME or --vram SIZE")
        cmd = ["vllm", "serve", model_dir, "--host", host, "--port", str(port), *vllm_args(plan, enforce_eager)]
    else:
        # `transformers serve DIR` loads DIR at start-up instead of on the first request
        cmd = ["transformers", "serve", model_dir, "--host", host, "--port", str(port)]
    return cmd + list(extra or [])


def shell_lines(cmd: list[str], width: int = 100) -> list[str]:
    """``cmd`` shell-quoted, in lines of at most ``width`` characters where the words allow: a line
    breaks before an option (a word starting with -), every line but the last ends in " \\" and the
    next is indented, so the lines pasted into a shell are the one command."""
    groups: list[list[str]] = []
    for word in map(shlex.quote, cmd):
        if groups and not word.startswith("-"):
            groups[-1].append(word)      # the program with its arguments, an option with its value
        else:
            groups.append([word])
    lines = [" ".join(groups[0])]
    for group in map(" ".join, groups[1:]):
        if len(lines[-1]) + 1 + len(group) + 2 > width:
            lines[-1] += " \\"
            lines.append("  " + group)
        else:
            lines[-1] += " " + group
    return lines


def run(cmd: list[str]) -> int:
    """Run the server in the foreground; its exit code is ours."""
    if shutil.which(cmd[0]) is None:
        raise FP8VLError(f"`{cmd[0]}` is not installed: {INSTALL.get(cmd[0], 'install it')}")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
