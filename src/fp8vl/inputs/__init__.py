"""What a model is fed: the built-in prompt sets and user prompt files (prompts.py), and images as
models see them, any file or PIL mode as 8-bit RGB (images.py).

Checking (``fp8vl eval``'s prompts and their images) and the apps (``fp8vl caption``'s prompt and
images) both use it, so it sits below both. Imports only the base modules (errors, options,
version); nothing above (LAYERS in tests/test_package.py).
"""
