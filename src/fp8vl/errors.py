"""The one error type fp8vl raises for bad input; the CLI prints its message without a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class FP8VLError(Exception):
    """A problem the user can fix: the message names the file or tensor and says how."""


class InternalError(RuntimeError):
    """An invariant of fp8vl's own broke (what it wrote is not what it planned): a bug, not bad
    input. The CLI lets its traceback through, for the bug report."""

    def __init__(self, what: str):
        super().__init__(f"fp8vl bug, please report it: {what}")


@contextmanager
def out_of_memory(device: str, fix: str) -> Iterator[None]:
    """Inside: torch running out of device memory becomes one FP8VLError saying ``fix``.

    torch is not imported here: if it was never imported, nothing inside can have raised its error."""
    try:
        yield
    except Exception as e:
        torch = sys.modules.get("torch")
        # torch.OutOfMemoryError (CUDA, XPU, MPS) since torch 2.5; torch.cuda.OutOfMemoryError before
        oom = torch and (getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError)
        if not oom or not isinstance(e, oom):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        raise FP8VLError(f"out of memory on {device} ({first}); {fix}") from e
