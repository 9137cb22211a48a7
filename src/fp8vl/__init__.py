"""fp8vl: FP8 (E4M3, 128x128 block) copies of vision-language models, verified and ready to serve."""

__version__ = "0.1.0"

from .convert import Result, quantize  # noqa: E402
from .errors import FP8VLError  # noqa: E402
from .options import QuantizeOptions  # noqa: E402

__all__ = ["FP8VLError", "QuantizeOptions", "Result", "quantize", "__version__"]
