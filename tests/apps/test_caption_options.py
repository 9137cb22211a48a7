"""The caption text as both backends write it; the options' device."""

import pytest

from fp8vl.apps.caption_options import CaptionOptions, clean_caption
from fp8vl.errors import FP8VLError


def test_clean_caption():
    assert clean_caption("  A cat\n on a sofa.  ") == "A cat on a sofa."
    assert clean_caption("A cat.", "ohwx") == "ohwx, A cat."
    assert clean_caption("A cat.", "ohwx, ") == "ohwx, A cat."
    assert clean_caption("<think>hmm\nlet me see</think>\nA cat.", "ohwx") == "ohwx, A cat."
    assert clean_caption("   ", "ohwx") == "" and clean_caption(None) == ""


def test_in_process_device_auto_is_settled_when_the_options_are_made(monkeypatch):
    """CaptionOptions' device defaults to auto, as the CLI's: in-process it becomes the device that runs
    (so the memory cap, the load and the summary all see it); with a server it is not looked at."""
    import fp8vl.options as options

    monkeypatch.setattr(options, "_cuda_unusable", lambda device: None)                # a usable GPU
    assert CaptionOptions(model="m").device == "cuda"
    monkeypatch.setattr(options, "_cuda_unusable", lambda device: "no GPU here")       # none
    assert CaptionOptions(model="m").device == "cpu" and CaptionOptions(model="m", device="cpu").device == "cpu"
    with pytest.raises(FP8VLError, match="^--device cuda: no GPU here; run on the CPU with --device cpu"):
        CaptionOptions(model="m", device="cuda")
    assert CaptionOptions(endpoint="http://127.0.0.1:8000/v1", device="cuda").device == "cuda"
