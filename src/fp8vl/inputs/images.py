"""Images as models see them: any file or PIL mode -> 8-bit RGB, values scaled by the mode's range.

PIL's own ``convert("RGB")`` clips wider modes instead of scaling them: a mid-grey 16-bit PNG
(32768 of 65535) becomes 255, white. Here 16-bit and 32-bit integer and float images are scaled
to 0-255 first; transparency goes onto white (what a captioner should describe is the drawing,
not a black background). Shared by ``caption`` (load_image: also shrunk to the side sent) and by
``eval``'s prompt images.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FP8VLError

ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def _to_8bit(a, mode: str):
    """A single-channel array of a wide mode -> uint8 0-255 (shape kept).

    I;16*: 0-65535. I (int32, how older Pillow opens 16-bit PNGs): 0-65535 when the values fit
    it, else the image's own min-max. F (float32): 0-1 when the values fit it, as they are when they
    fit 0-255, else min-max; NaN as 0.
    """
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    a = np.where(np.isnan(a), 0.0, a)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif not (mode == "F" and lo >= 0 and hi <= 255):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(im):
    """8-bit RGB copy of a PIL image of any mode, transparency composited on white."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        gray = _to_8bit(np.asarray(im), im.mode)
        rgb = Image.fromarray(gray).convert("RGB")
        t = im.info.get("transparency")   # a 16-bit PNG's tRNS: one grey value is transparent
        if isinstance(t, int):
            keep = Image.fromarray(np.where(np.asarray(im) == t, 0, 255).astype(np.uint8))
            rgb = Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), keep)
        return rgb
    if im.mode == "La":  # premultiplied: PIL converts it only to LA
        im = im.convert("LA")
    if im.mode in ALPHA or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def open_rgb(path: str | Path):
    """An image file as 8-bit RGB, EXIF orientation applied; FP8VLError naming the file if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # any decoder failure: the caller decides whether the batch goes on
        raise FP8VLError(f"{path}: cannot read image ({type(e).__name__}: {e}); replace or remove it") from e


def load_image(path: str | Path, max_side: int = 512):
    """8-bit RGB PIL image as :func:`open_rgb` gives it (EXIF orientation applied, transparency on
    white), shrunk so that its longer side is <= ``max_side`` (never upscaled)."""
    from PIL import Image

    im = open_rgb(path)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im
