"""The built-in evaluation prompts, and user prompt files (JSONL: {"text", "image"?, "id"?})."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import FP8VLError

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
    for n, line in enumerate(path.read_text().splitlines(), 1):
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
            from skimage import data

            if not hasattr(data, image.split(":", 1)[1]):
                raise FP8VLError(f"{path}:{n}: scikit-image ships no photo named {image.split(':', 1)[1]!r}")
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
    """A prompt's image as RGB PIL: a file (EXIF orientation applied) or a bundled scikit-image photo."""
    from PIL import Image, ImageOps

    if ref.startswith("skimage:"):
        from skimage import data

        name = ref.split(":", 1)[1]
        if not hasattr(data, name):
            raise FP8VLError(f"{ref}: scikit-image ships no photo named {name!r}")
        arr = getattr(data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr  # stereo pairs: the left view
        return Image.fromarray(arr).convert("RGB")
    try:
        with Image.open(ref) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except OSError as e:
        raise FP8VLError(f"{ref}: cannot read image ({e})") from e
