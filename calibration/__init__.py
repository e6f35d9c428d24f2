"""INT8 calibration of an exported cascade: data from the denoising loop, Q/DQ models, quality reports.

Imports onnx, onnxruntime, `runtime` and the op's torch-free ONNX contract (`walt_export.window_attention.
onnx_contract`); nothing it imports imports torch (a test checks it).
"""
