"""``caption --model``: fp8vl's engine in this process, its inputs prepared ahead by worker processes.

Each image is decoded, resized and encoded by the model's processor (a few tens of ms of CPU per
photo) off the engine's thread: in ``workers`` processes (spawned before the model loads, so their
start and their first images overlap the load; in threads, the processor's Python and the engine's
own loop would share one interpreter lock), or with ``workers=0`` in two threads of this process.
The read-ahead is bounded (2 x the engine's slots + 2 prepared prompts: ~6 MB each at 512 px) and
the engine takes prompts as they come, with continuous batching; captions come back as they finish.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

from .caption_options import CaptionOptions, _Result, clean_caption
from ..errors import FP8VLError, out_of_memory

_PROCESSOR: dict = {}   # a worker's own processor, loaded once by _start_worker


def default_workers() -> int:
    """Image workers for ``workers=None``: half the cores up to 8, none (threads) on 1-3 cores,
    where the engine needs the cores itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores < 4 else min(8, cores // 2)


def _start_worker(model: str) -> None:
    # Ctrl-C reaches the whole process group: the run itself stops the pool, so a worker must not
    # die on its own with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..runtime.loader import Loaded, load_processor

    _PROCESSOR["loaded"] = Loaded(None, load_processor(model, True), True, Path(model))


def _prepare(path: Path, prompt: str, max_side: int, loaded=None) -> tuple[Path, float, dict | None, str | None]:
    """(path, start time, model inputs as numpy arrays or None, error or None) for one image."""
    from ..inputs.images import load_image
    from ..runtime.loader import encode

    t0 = time.time()
    try:
        inputs = encode(loaded or _PROCESSOR["loaded"], prompt, load_image(path, max_side), device="cpu")
    except FP8VLError as e:
        return path, t0, None, str(e)
    # numpy arrays cross the process boundary by value (torch's shared-memory tensors would hold
    # one file descriptor each for as long as the read-ahead keeps them)
    return path, t0, {k: v.numpy() for k, v in inputs.items()}, None


def _pool(opts: CaptionOptions, workers: int) -> Executor:
    if workers == 0:
        return ThreadPoolExecutor(2, thread_name_prefix="fp8vl-encode")
    import multiprocessing

    # spawn: this process is about to initialise CUDA, which a forked child must not inherit
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(str(opts.model),))


def local_backend(todo: list[Path], opts: CaptionOptions, info: dict) -> Iterator[_Result]:
    """Caption ``todo`` in this process (see the module docstring); ``info`` gets the model's label
    and the load time."""
    workers = default_workers() if opts.workers is None else opts.workers
    # the workers first: their own imports (torch, the processor: seconds) and first images then run
    # beside this process's imports and the model load
    pool = _pool(opts, workers)
    waiting: deque[Future] = deque()
    try:
        ahead = 2 * (opts.batch_size or 64) + 2          # until the engine's slots are known
        rest = iter(todo)
        loaded_here = None

        def submit(n: int) -> None:
            for path in (p for _, p in zip(range(n), rest)):
                waiting.append(pool.submit(_prepare, path, opts.prompt, opts.max_side, loaded_here))

        if workers:
            submit(ahead)
        import torch

        from ..runtime.engine import Engine, EngineOptions, Request, limit_gpu_memory, round_up
        from ..runtime.loader import encode, eos_ids, load_any

        limit_gpu_memory(opts.device, opts.gpu_memory)
        fix = ("use a smaller --batch-size, a lower --max-tokens or --max-side, or --gpu-memory below what other "
               "programs leave free; the captions written so far are kept")
        with out_of_memory(opts.device, fix):
            t0 = time.perf_counter()
            loaded = load_any(opts.model, opts.device, opts.mode, info.get("loading"))
            info["model"] = f"{opts.model} ({loaded.label})"
            if not workers:
                loaded_here = loaded
                submit(ahead)
            tok = getattr(loaded.processor, "tokenizer", loaded.processor)
            # the longest prompt: a square image at max_side (resizing never upscales, so none is longer)
            from PIL import Image

            longest = encode(loaded, opts.prompt, Image.new("RGB", (opts.max_side, opts.max_side)))
            eopts = EngineOptions(max_len=round_up(longest["input_ids"].shape[1] + opts.max_tokens + 1),
                                  max_batch=opts.batch_size, max_new_tokens=opts.max_tokens,
                                  temperature=opts.temperature, batch_invariant=opts.batch_invariant)
            engine = Engine(loaded.model, eos_ids(loaded), eopts)
            info["load_seconds"] = time.perf_counter() - t0
            ahead = 2 * engine.batch + 2
            failed: list[_Result] = []

            def requests() -> Iterator[Request]:
                while waiting:
                    try:
                        path, start, arrays, error = waiting.popleft().result()
                    except BrokenProcessPool as e:
                        raise FP8VLError("an image worker process died (out of memory?); run again with "
                                         "--workers 0 to prepare images in this process") from e
                    submit(ahead - len(waiting))
                    if arrays is None:
                        failed.append(_Result(path, error=error, broken=True))
                        continue
                    yield Request({k: torch.from_numpy(v) for k, v in arrays.items()}, (path, start))

            for req, ids in engine.generate(requests()):
                while failed:
                    yield failed.pop(0)
                path, start = req.tag
                text = clean_caption(tok.decode(ids, skip_special_tokens=True), opts.trigger)
                yield _Result(path, text or None, len(ids), time.time() - start,
                              None if text else "the model returned an empty caption")
            yield from failed
    finally:
        for f in waiting:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
