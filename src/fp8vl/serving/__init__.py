"""Planning and starting a server: the GPUs fp8vl plans for and the FP8 path vLLM takes on each
(gpus.py), the vLLM memory plan (vram.py, ``fp8vl plan``), and the server command (serve.py,
``fp8vl serve``).

Imports checkpoint/ and the base modules (errors, options, version). It sits above check/ and below
report.py, which renders its plans (LAYERS in tests/test_package.py); nothing above.
"""
