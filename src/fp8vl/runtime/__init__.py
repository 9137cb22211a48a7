"""Running an FP8 checkpoint in plain PyTorch: FP8Linear and FP8Experts (fp8_modules.py), any
checkpoint loaded straight onto the device (loader.py), fp8vl's view of a decoder layer (layers.py),
the prefill through those layers (prefill.py), and the generation engine (engine.py).

Imports kernels/, checkpoint/ and the base modules (errors, options, version); conversion/, the layer
just below, it does not need. Nothing above (LAYERS in tests/test_package.py).
"""
