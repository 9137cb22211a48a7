"""The one error type fp8vl raises for bad input; the CLI prints its message without a traceback."""


class FP8VLError(Exception):
    """A problem the user can fix: the message names the file or tensor and says how."""
