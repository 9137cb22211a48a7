"""``fp8vl caption``'s server backend: any OpenAI-compatible server (vLLM, SGLang, ``transformers serve``).

Each image, EXIF-rotated and shrunk so its longer side is at most ``max_side``, goes as a base64 JPEG
data URL next to the prompt; ``concurrency`` requests in flight; connection errors, timeouts, 429, 5xx
and 200s whose body is not the JSON asked for (an HTML page from a proxy, an empty or cut-off body)
are retried with exponential backoff and jitter. An image that still fails after the retries is
reported and the batch goes on; when the server stops answering altogether (``DOWN_AFTER`` images in
a row lost to connection errors or timeouts), the images not yet sent are reported too. Results are
yielded as they arrive; caption.py writes them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from .caption_options import CaptionOptions, _Result, clean_caption
from ..errors import FP8VLError
from ..inputs.images import load_image

DOWN_AFTER = 3  # consecutive images lost to connection errors or timeouts: the server is gone, stop sending


def image_data_url(image, quality: int = 90) -> str:
    """A PIL image as a base64 JPEG data URL, the form OpenAI-compatible servers take."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _base_url(endpoint: str) -> str:
    u = urlsplit(endpoint)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise FP8VLError(f"--endpoint {endpoint}: expected a URL like http://127.0.0.1:8000/v1")
    return endpoint.rstrip("/") + ("/v1" if u.path in ("", "/") else "")


class BadReply(Exception):
    """A 2xx answer whose body is not what was asked for: an HTML page from a proxy, an empty or cut-off
    body, JSON of another shape. Retried like a 5xx: the server (or what stands before it) is answering."""


def _json_reply(raw, shape: Callable[[dict], object]):
    """``shape(body)`` of a raw openai response; any failure to read it is a :class:`BadReply`."""
    text = raw.text
    try:
        return shape(json.loads(text))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        snippet = " ".join(text[:80].split()) or "an empty body"
        raise BadReply(f"server answered {raw.status_code} with a body that is not the JSON asked for "
                       f"({snippet!r}{'...' if len(text) > 80 else ''})") from e


def _completion(body: dict) -> tuple[str | None, int]:
    """(message text, completion tokens) of a chat completion body; raises on any other shape."""
    choices = body["choices"]
    text = choices[0]["message"]["content"] if choices else None
    tokens = int((body.get("usage") or {}).get("completion_tokens") or 0)
    if text is not None and not isinstance(text, str):
        raise TypeError(f"message content is {type(text).__name__}")
    return text, tokens


def _retry(call: Callable, opts: CaptionOptions, stop: threading.Event):
    """``call()`` with retries on connection errors, timeouts, 429, 5xx and bad replies (exponential
    backoff, jitter); gives up at once when ``stop`` is set."""
    import openai

    for attempt in range(opts.retries + 1):
        try:
            return call()
        except (openai.APIConnectionError, openai.APIStatusError, BadReply) as e:
            status = getattr(e, "status_code", None)
            if (status is not None and status < 500 and status not in (408, 429)) or attempt == opts.retries:
                raise
            if stop.wait(min(60.0, opts.backoff * 2 ** attempt * random.uniform(0.5, 1.5))):
                raise


def _failure(path: Path, e: Exception, opts: CaptionOptions, seconds: float) -> _Result:
    import openai

    if isinstance(e, openai.APIStatusError):
        return _Result(path, seconds=seconds, error=f"server answered {e.status_code}: {e.message}")
    if isinstance(e, BadReply):
        return _Result(path, seconds=seconds, error=f"{e} (after {opts.retries + 1} attempts)")
    # connection errors and timeouts (APITimeoutError is an APIConnectionError) both say "not answering"
    return _Result(path, seconds=seconds, error=f"{opts.endpoint}: {e} (after {opts.retries + 1} attempts)",
                   down=True)


def _server_one(client, model: str, path: Path, opts: CaptionOptions, stop: threading.Event) -> _Result:
    import openai

    t0 = time.perf_counter()
    if stop.is_set():
        return _Result(path, error=f"not sent: {opts.endpoint} stopped answering; rerun to caption it")
    try:
        url = image_data_url(load_image(path, opts.max_side))
    except FP8VLError as e:
        return _Result(path, error=str(e), broken=True)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": opts.prompt}]}]
    try:
        text, tokens = _retry(lambda: _json_reply(client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=opts.max_tokens, temperature=opts.temperature),
            _completion), opts, stop)
    except (openai.APIError, BadReply) as e:
        return _failure(path, e, opts, time.perf_counter() - t0)
    text = clean_caption(text, opts.trigger)
    return _Result(path, text or None, tokens, time.perf_counter() - t0,
                   None if text else "the model returned an empty caption")


def _serve(todo: list[Path], opts: CaptionOptions, info: dict) -> Iterator[_Result]:
    """Results in the order they arrive, from ``concurrency`` worker threads.

    The workers are daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's
    threads at exit, so a request blocked on a hung server would hold Ctrl-C for up to the timeout.
    On close (end, error, Ctrl-C) the client is closed and no further request is sent."""
    from openai import OpenAI

    client = OpenAI(base_url=_base_url(opts.endpoint), api_key=opts.api_key or os.environ.get("OPENAI_API_KEY")
                    or "EMPTY", timeout=opts.timeout, max_retries=0)
    stop = threading.Event()
    try:
        try:
            ids = _retry(lambda: _json_reply(client.models.with_raw_response.list(),
                                             lambda body: [str(m["id"]) for m in body["data"]]), opts, stop)
        except Exception as e:
            raise FP8VLError(f"{opts.endpoint}: cannot list models ({e}); start the server or fix --endpoint") from e
        model = info["model"] = opts.model or (ids[0] if ids else None)
        if not model:
            raise FP8VLError(f"{opts.endpoint}: the server lists no model; pass --model NAME")
        lock, down, pending = threading.Lock(), [0], iter(todo)
        results: queue.SimpleQueue = queue.SimpleQueue()

        def work() -> None:
            while True:
                with lock:
                    path = next(pending, None)
                if path is None:
                    return
                try:
                    r = _server_one(client, model, path, opts, stop)
                except BaseException as e:  # handed to the main thread, which re-raises it
                    results.put(e)
                    return
                with lock:  # counted as results come, so that no later image is sent to a dead server
                    down[0] = down[0] + 1 if r.down else 0 if r.caption else down[0]
                    if down[0] >= DOWN_AFTER:
                        stop.set()
                results.put(r)

        for i in range(min(opts.concurrency, len(todo))):
            threading.Thread(target=work, name=f"fp8vl-caption-{i}", daemon=True).start()
        for _ in todo:
            r = results.get()
            if isinstance(r, BaseException):
                raise r
            yield r
    finally:
        stop.set()
        client.close()  # in-flight requests end with the connections; the daemon threads are not waited for

