"""Offline build: export models to ONNX / OpenVINO / TensorRT, quantize, check parity, write the Triton repository.

This is the project's `build` package (see ARCHITECTURE.md); PyPA's `build` is never installed in
the project's environment, and `tests/test_layout.py` checks that this one is the one imported.
"""
