"""What a checkpoint is and what of it becomes FP8: the two on-disk formats (formats.py), bounded-memory
safetensors reads and writes (shards.py), finding and checking a source (source.py), which tensors
become FP8 and why (plan.py), what the serving engines need beyond that (compat.py), and the
tensor-parallel sizes vLLM starts it with (tp.py).

The lowest layer: imports only the base modules (errors, options, version). The order of the layers
is LAYERS in tests/test_package.py, which fails on an import of a layer above.
"""
