"""fp8vl demo: its work folder is replaced only when the demo made it."""

from __future__ import annotations

import pytest
from rich.console import Console

from fp8vl.apps.demo import STAMP, run_demo
from fp8vl.errors import FP8VLError


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(FP8VLError, match="not made by `fp8vl demo`"):
        run_demo(tmp_path, Console(quiet=True))
    assert (tmp_path / "thesis.tex").read_text() == "years of work" and not (tmp_path / STAMP).exists()
