"""What ``fp8vl caption``'s two backends share: the one options object (CLI flags mirror its fields),
the per-image result each backend yields, the caption text as it is written, and the run's summary.

Its own module so that caption.py (the run, the in-process backend) and caption_server.py (the
OpenAI-compatible backend) both import it without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs.prompts import CAPTION
from ..options import resolve_device


@dataclass(frozen=True)
class CaptionOptions:
    endpoint: str | None = None      # OpenAI-compatible base URL (http://127.0.0.1:8000/v1); None: in-process
    model: str | None = None         # server: model name (default: first of /v1/models); local: model folder
    prompt: str = CAPTION
    trigger: str | None = None       # put before each caption ("ohwx" -> "ohwx, <caption>")
    max_side: int = 512              # longer image side sent to the model (never upscaled)
    concurrency: int = 8             # requests in flight (server backend)
    max_tokens: int = 128
    temperature: float = 0.0         # 0: greedy, the same caption on every run
    txt: bool = True                 # sidecar IMAGE.txt, the layout LoRA trainers read
    jsonl: Path | None = None        # append {file, caption, tokens, seconds} a line
    csv: Path | None = None          # ImageFolder metadata.csv (file_name relative to its folder)
    overwrite: bool = False          # recaption images that already have a caption
    retries: int = 4                 # extra attempts on connection errors, timeouts, 429 and 5xx
    backoff: float = 0.5             # first retry delay in seconds; doubles each time, with jitter
    timeout: float = 120.0           # seconds per request
    api_key: str | None = None       # default: $OPENAI_API_KEY, else "EMPTY"
    device: str = "auto"             # local backend: auto (a usable CUDA GPU, else the CPU), cpu or cuda
    mode: str = "auto"               # local backend FP8 runtime: auto, scaled_mm, triton, w8a8 or dequant
    batch_size: int | None = None    # local backend: sequences decoded together (None: as many as fit)
    batch_invariant: bool = False    # local backend on CUDA: captions independent of the batch (slower;
                                     # the CPU is invariant anyway): EngineOptions.batch_invariant
    gpu_memory: int | None = None    # local backend: bytes of GPU memory the run may use (None: the card)
    workers: int | None = None       # local backend: image decode/processor worker processes (0: two
                                     # threads in this process; None: caption_local.default_workers)
    retry_failed: bool = False       # try again the images an earlier run recorded as failed

    def __post_init__(self) -> None:
        # In-process, the device is settled here, so every part of the run (the memory cap, the load,
        # the summary) sees the one that runs; "cuda" without a usable GPU is refused before any work.
        # Only with a model: the default options (caption()'s default argument) must not import torch.
        if self.endpoint is None and self.model:
            object.__setattr__(self, "device", resolve_device(self.device))


@dataclass
class CaptionSummary:
    done: int = 0                    # images captioned by this run
    skipped: int = 0                 # already captioned, left alone
    failed: list[tuple[Path, str]] = field(default_factory=list)   # (image, reason)
    tokens: int = 0                  # generated tokens
    seconds: float = 0.0             # wall time of the run, model loading included
    model: str = ""
    load_seconds: float = 0.0        # in-process: loading the model and sizing the engine (part of seconds)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def captioning_images_per_s(self) -> float:
        """images/s once the model is loaded (the rate a long run converges to)."""
        busy = self.seconds - self.load_seconds
        return self.done / busy if busy > 0 else 0.0


@dataclass
class _Result:
    path: Path
    caption: str | None = None
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    down: bool = False               # failed because the server could not be reached
    broken: bool = False             # failed because the image itself cannot be read (recorded: not retried)


def clean_caption(text: str | None, trigger: str | None = None) -> str:
    """One line: reasoning blocks dropped, whitespace collapsed, trigger in front ("", if nothing left)."""
    text = " ".join(re.sub(r"<think>.*?</think>", "", text or "", flags=re.S).split())
    if not text or not trigger or not trigger.strip():
        return text
    t = trigger.strip()
    return f"{t}{' ' if t[-1] in ',;:.' else ', '}{text}"
