"""The caption text as both backends write it."""

from fp8vl.apps.caption_options import clean_caption


def test_clean_caption():
    assert clean_caption("  A cat\n on a sofa.  ") == "A cat on a sofa."
    assert clean_caption("A cat.", "ohwx") == "ohwx, A cat."
    assert clean_caption("A cat.", "ohwx, ") == "ohwx, A cat."
    assert clean_caption("<think>hmm\nlet me see</think>\nA cat.", "ohwx") == "ohwx, A cat."
    assert clean_caption("   ", "ohwx") == "" and clean_caption(None) == ""
