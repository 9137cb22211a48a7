"""Making the FP8 copy, and undoing it: ``fp8vl.quantize`` itself (convert.py), the output planned and
written as chunk jobs (output.py, writer.py), OUTPUT's folder (staging.py), a hub id converted while
it downloads (hub.py, fetch.py), the error measured while converting (drift.py), the model card
(card.py), and ``fp8vl dequantize`` (dequantize.py).

Named ``conversion``, not ``quantize``: ``fp8vl.quantize`` is the public function (the package's
``__getattr__`` imports it on first use), and importing a subpackage binds it as an attribute of its
parent, so ``fp8vl.quantize`` would become the subpackage and hide the function.

Imports kernels/, checkpoint/ and the base modules (errors, options, version); nothing above
(LAYERS in tests/test_package.py).
"""
