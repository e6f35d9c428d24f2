"""The window-attention op `wattn::WindowAttention3D`, in one place (docs/window_attention_op.md):

    onnx_contract   the ONNX node, schema, function body and the canonical/plugin/fallback variants (torch-free)
    op              the torch custom op `wattn::window_attention3d`: the eager reference the models call
    kernel          the op as a Triton flash-attention kernel (the plugin's implementation)
    plugin          the TensorRT plugin (tensorrt.plugin, JIT and ahead-of-time)

Importing this package imports nothing heavy: import the module you need.
"""
