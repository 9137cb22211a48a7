"""The jobs that put the layers below to work: batch captioning (caption.py; its server backend
caption_server.py; what both backends share, caption_options.py), ``fp8vl doctor`` (doctor.py),
``fp8vl demo`` (demo.py), and the tiny real-architecture models the demo starts from and the tests
and benchmarks build (tiny.py).

Imports report.py (the demo prints the plan, summary and verify tables), serving/, check/, inputs/,
runtime/, conversion/, checkpoint/ and the base modules; only cli.py and the package's ``__init__``
and ``__main__`` sit above (LAYERS in tests/test_package.py).
"""
