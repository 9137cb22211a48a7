"""FP8 block numerics and the GPU kernels, pure tensor-in/tensor-out: block quantize/dequantize and
activation quantization (numerics.py), the FP8 GEMMs (gemm.py; the Triton kernels in gemm_kernels.py)
and the decode attention block (attention.py; the Triton kernels in attention_kernels.py).

Imports checkpoint/ only (the 128 block is a format fact: numerics.py takes BLOCK from formats.py); the
base modules (errors, options, version) it may use too; nothing above (LAYERS in tests/test_package.py).
"""
