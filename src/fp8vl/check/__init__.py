"""Proving an FP8 copy: ``fp8vl verify`` (verify.py; engines/ runs vLLM's and SGLang's own loaders in
the engine's interpreter), ``fp8vl eval`` (evaluate.py), and both rendered as tables, a report, model
card sections and charts (eval_report.py).

Imports inputs/, runtime/, conversion/ (drift.py's error file), kernels/, checkpoint/ and the base
modules (errors, options, version); nothing above (LAYERS in tests/test_package.py). engines/ runs in
another interpreter with no fp8vl module outside itself, and this ``__init__`` imports nothing.
"""
