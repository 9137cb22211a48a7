"""``python -m fp8vl``: the ``fp8vl`` command."""

from .cli import main

main()
