"""fp8vl: FP8 (E4M3, 128x128 block) copies of vision-language models, verified and ready to serve."""

from .errors import FP8VLError
from .options import QuantizeOptions
from .version import __version__

__all__ = ["FP8VLError", "QuantizeOptions", "Result", "quantize", "__version__"]


def __getattr__(name: str):
    """``quantize`` and ``Result`` are imported on first use (PEP 562): they need torch, which takes
    seconds to import, and ``fp8vl --help``, ``plan``, ``serve`` and ``doctor`` do not."""
    if name in ("quantize", "Result"):
        from .conversion import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
