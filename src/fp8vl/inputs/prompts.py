"""The built-in evaluation prompts, and user prompt files (JSONL: {"text", "image"?, "id"?})."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FP8VLError

CAPTION = "Describe this image concisely with key subjects, setting, and actions. Return one detailed sentence."

TEXT = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Translate into French: 'The train leaves at seven in the morning.'",
    "List three differences between a virus and a bacterium.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "If a car travels 120 km in 1.5 hours, what is its average speed? Show the steps.",
    "Give me a short recipe for a vegetarian tomato soup.",
    "What are the main causes of inflation in a modern economy?",
    "Describe the water cycle for a ten-year-old.",
    "Write a polite email declining a meeting invitation.",
    "Compare the memory use of FP8 and BF16 weights for an 8-billion-parameter model.",
    "What is 17 times 23? Answer with the number only.",
    "Name five planets of the solar system in order from the sun.",
    "Write a limerick about a cat who learned to code.",
    "Explain what a hash table is and when to use one.",
    "What happened during the French Revolution in 1789?",
    "Give three tips for writing a good commit message.",
    "Solve for x: 3x + 7 = 22.",
    "Describe the taste of a ripe mango to someone who has never eaten one.",
    "What is photosynthesis? Answer in one sentence.",
    "Write the opening line of a mystery novel set in a lighthouse.",
    "Explain the difference between precision and recall.",
]

# (scikit-image photo, prompt): captioning first, then questions about the picture.
IMAGE = [
    ("astronaut", CAPTION),
    ("chelsea", CAPTION),
    ("coffee", CAPTION),
    ("rocket", CAPTION),
    ("stereo_motorcycle", CAPTION),
    ("hubble_deep_field", CAPTION),
    ("astronaut", "What is the person in this picture wearing?"),
    ("chelsea", "What animal is this, and what color is its fur?"),
    ("coffee", "What drink is shown, and what is it served in?"),
    ("rocket", "Is the rocket on the ground or in flight? Explain briefly."),
    ("retina", "What kind of medical image is this?"),
    ("camera", "What is the man in this black-and-white photo doing?"),
]


# The photographs that ship inside scikit-image (no download): "skimage:NAME" takes only these.
PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
          "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
          "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "stereo_motorcycle", "text")


def _photo_name(ref: str) -> str:
    """NAME of "skimage:NAME", checked against :data:`PHOTOS` (``skimage.data`` also has downloaders)."""
    name = ref.split(":", 1)[1]
    if name not in PHOTOS:
        raise FP8VLError(f"{ref}: not a photo bundled with scikit-image; use one of: {', '.join(PHOTOS)}")
    return name


def read_utf8(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file, or one FP8VLError naming it (missing, unreadable, or not UTF-8 and where)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FP8VLError(f"{path}: cannot read this {what} ({e.strerror or e})") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise FP8VLError(f"{path}: {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); "
                         f"save it as UTF-8") from e


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    image: str | None = None  # a file path, or "skimage:NAME" for a bundled photo

    @property
    def kind(self) -> str:
        return "image" if self.image else "text"


def builtin(limit: int | None = None) -> list[Prompt]:
    """The built-in set: ``limit`` of each kind (all when None)."""
    text = TEXT[:limit] if limit else TEXT
    image = IMAGE[:limit] if limit else IMAGE
    return ([Prompt(f"text-{i:02d}", t) for i, t in enumerate(text)]
            + [Prompt(f"image-{i:02d}-{p}", q, f"skimage:{p}") for i, (p, q) in enumerate(image)])


def load_jsonl(path: str | Path) -> list[Prompt]:
    """One JSON object a line: {"text": ..., "image": optional path (relative to the file), "id": optional}."""
    path = Path(path)
    if not path.is_file():
        raise FP8VLError(f"{path}: no such prompt file")
    out = []
    for n, line in enumerate(read_utf8(path, "prompt file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            text = d["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise FP8VLError(f"{path}:{n}: expected a JSON object with a \"text\" field ({e})") from e
        image = d.get("image")
        if not isinstance(text, str) or not text.strip():
            raise FP8VLError(f"{path}:{n}: \"text\" must be a non-empty string")
        if image is not None and not isinstance(image, str):
            raise FP8VLError(f"{path}:{n}: \"image\" must be a path (a string)")
        if image and image.startswith("skimage:"):
            try:
                _photo_name(image)
            except FP8VLError as e:
                raise FP8VLError(f"{path}:{n}: {e}") from None
        elif image:
            ip = (path.parent / image) if not Path(image).is_absolute() else Path(image)
            if not ip.is_file():
                raise FP8VLError(f"{path}:{n}: image {image} not found")
            image = str(ip)
        out.append(Prompt(str(d.get("id", f"{path.stem}-{n}")), text, image))
    if not out:
        raise FP8VLError(f"{path}: no prompts")
    return out


def open_image(ref: str):
    """A prompt's image as 8-bit RGB PIL: a file (EXIF orientation applied) or a bundled scikit-image photo."""
    from .images import open_rgb, to_rgb

    if ref.startswith("skimage:"):
        import numpy as np
        from PIL import Image
        from skimage import data

        arr = getattr(data, _photo_name(ref))()
        arr = arr[0] if isinstance(arr, tuple) else arr  # stereo pairs: the left view
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype.kind == "f":  # shepp_logan_phantom: float64 in 0-1; PIL takes float32 ("F")
            arr = arr.astype(np.float32)
        return to_rgb(Image.fromarray(arr))
    return open_rgb(ref)
