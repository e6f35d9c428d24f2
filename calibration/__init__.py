"""INT8 calibration of an exported cascade: data from the denoising loop, Q/DQ models, quality reports.

Imports onnx, onnxruntime and `runtime`; torch only where it captures calibration data.
"""
