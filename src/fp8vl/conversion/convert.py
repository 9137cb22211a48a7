"""``fp8vl quantize``: a BF16 checkpoint (folder or hub id) into an FP8 block-128 one.

A local folder: check every shard's header, plan, write the output in a staging folder (output.py),
rename it into place. A hub id goes through hub.py, which downloads and converts shard by shard.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .hub import quantize_hub
from ..options import QuantizeOptions
from ..checkpoint.source import locate, open_checkpoint, resolve
from .staging import Staging, bytes_to_write, check_paths, copy_files, other_files

if TYPE_CHECKING:
    from .output import Result

__all__ = ["Result", "quantize"]


def __getattr__(name: str):
    # output.py imports torch: loaded when a conversion needs it (hub.py: once a shard downloads)
    if name == "Result":
        from .output import Result
        return Result
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantize(source: str | Path, output: str | Path | None, opts: QuantizeOptions = QuantizeOptions(),
             progress: Callable[[int, int], None] | None = None, command: str | None = None,
             on_plan: Callable[[Result], None] | None = None) -> Result:
    """Convert ``source`` (folder or hub id) to FP8 in ``output``; with ``opts.dry_run``, only plan.

    ``on_plan(result)`` is called once the plan is made, before anything is written;
    ``progress(done_bytes, total_bytes)`` as jobs finish. ``command`` is accepted for older callers
    and unused: the card rebuilds the command from ``opts``, without local paths. A hub id is
    downloaded and converted shard by shard (hub.py); offline, it is taken from the local cache.
    """
    t0 = time.perf_counter()
    # The arguments first, before any hub request or heavy import: a refusal (a missing folder, an
    # OUTPUT that exists) comes at once, not after the seconds torch takes to import.
    found = locate(source)
    out = Path(output).expanduser().resolve() if output is not None else None
    if out is not None:
        check_paths(found if isinstance(found, Path) else None, out, opts.overwrite)
    if isinstance(found, str):
        res = quantize_hub(found, output, opts, progress, on_plan)
        if res is not None:
            return res
    src = resolve(source, opts.revision)   # a hub id the hub did not answer for: from the local cache
    if out is not None:
        check_paths(src, out, opts.overwrite)
    ckpt = open_checkpoint(src)
    from .output import plan_conversion, write_output   # torch: only once the source is known to be good

    res, units, scale_dtype = plan_conversion(ckpt, out, opts)
    if on_plan is not None:
        on_plan(res)
    if opts.dry_run or out is None:
        return res
    copied, res.skipped = other_files(src, ckpt.weight_files)
    need = bytes_to_write(src, copied, res.bytes_out, sum(len(u) for u in units))
    with Staging(src, out, opts.overwrite) as stage:
        tmp = stage.begin(need)
        copy_files(src, tmp, copied)
        res.copied = copied
        write_output(tmp, ckpt, res, units, scale_dtype, opts, progress, t0)
        stage.commit()
    res.seconds = time.perf_counter() - t0   # the final rename included (the card has the time before it)
    return res
