"""The `wattn::WindowAttention3D` TensorRT plugin: the Triton kernel behind TensorRT's Python plugin API (QDP).

`register_plugin()` registers, once per process, a plugin named `WindowAttention3D` in namespace `wattn`, version
"1" (QDP's default), as the op contract requires (docs/window_attention_op.md §4), with the fields `window`
(int32[3], -1 = full extent) and `scale` (float). TensorRT's ONNX parser maps every `wattn` node of a model's
*plugin* variant to it; build engines with `walt-export engines --attention plugin` after registering (the engine
builder does it). The implementation is JIT: TensorRT calls back into Python with device buffers and the stream, and
the kernel runs on that stream; engines that use it need this module imported (and registered) wherever they are
deserialized.

Requires TensorRT >= 10.9 with `tensorrt.plugin` (not TensorRT-RTX, which has no plugins, and not JetPack 6's
TensorRT 10.3: there the route is a C++ IPluginV3 with the same name, namespace, version and fields, loaded by
`trtexec --dynamicPlugins` or `IPluginRegistry.load_library`; see docs/jetpack6_plugin.md).

An ahead-of-time implementation is registered too (`trtp.aot_impl`, TensorRT >= 10.9): the same kernel compiled to
PTX by `kernel.compile_aot` with the scale compiled in and the shapes passed as symbolic int32
extras, so engines built with it run without Python (trtexec, C++). TensorRT picks AOT or JIT per its
`PREFER_AOT_PYTHON_PLUGINS` / `PREFER_JIT_PYTHON_PLUGINS` builder flags. The PTX compiles on a CPU (tested); its
launch by TensorRT is unverified, and Triton 3.x kernels carry two trailing scratch-pointer parameters that
TensorRT does not pass (unused at size 0): the first thing to check on a GPU.
QDP has no optional inputs: the plugin takes the relative-position bias as its 4th input, so models exported
without a bias must use the fallback variant.

Written against the documented API (TensorRT's `tensorrt.plugin` docs and its quickly_deployable_plugins sample);
it has not run here: no full TensorRT or GPU on the development machines.
"""

import logging
from typing import List, Tuple, Union  # QDP validates the hints as objects: no `from __future__ import annotations` here

from walt_export.window_attention.onnx_contract import OP_DOMAIN, OP_TYPE

log = logging.getLogger(__name__)

PLUGIN_ID = f"{OP_DOMAIN}::{OP_TYPE}"
_registered = False


def register_plugin() -> None:
    """Register the plugin's description, type combinations and JIT implementation with TensorRT (idempotent)."""
    global _registered
    if _registered:
        return
    import numpy as np
    import numpy.typing as npt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc,
                 window: npt.NDArray[np.int32], scale: float) -> trtp.TensorDesc:
        return q.like()  # same shape and dtype as q

    @trtp.autotune(PLUGIN_ID)
    def combinations(q, k, v, bias, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16")]

    @trtp.impl(PLUGIN_ID)
    def run(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, bias: trtp.Tensor, window: npt.NDArray[np.int32],
            scale: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from walt_export.window_attention.kernel import window_attention_triton

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tq, tk, tv, tb = (torch.as_tensor(t, device="cuda") for t in (q, k, v, bias))
            out = torch.as_tensor(outputs[0], device="cuda")
            window_attention_triton(tq, tk, tv, tuple(int(w) for w in window), float(scale), tb, out=out)

    @trtp.aot_impl(PLUGIN_ID)
    def compile_ptx(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, bias: trtp.TensorDesc,
                    window: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.TensorDesc],
                    tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                          trtp.SymExprs]:
        import tensorrt as trt

        from walt_export.window_attention.kernel import compile_aot

        shape = [q.shape_expr[i] for i in range(5)]  # N, T, H, W, d
        head_dim = _constant(shape[4])
        if head_dim is None:
            raise ValueError("the wattn plugin needs a static head dim")
        sizes = [shape[1 + i] if int(window[i]) == -1 else int(window[i]) for i in range(3)]
        known = [_constant(x) for x in sizes]
        length = None if None in known else known[0] * known[1] * known[2]
        kernel = compile_aot("fp16" if q.dtype == trt.float16 else "fp32", scale, head_dim, length)
        t, h, w = (trtp.SymInt32(x) for x in shape[1:4])
        wt, wh, ww = (trtp.SymInt32(x) for x in sizes)
        nh, nw, volume = h // wh, w // ww, wt * wh * ww
        extras = [t, h, w, trtp.SymInt32(shape[4]), trtp.SymInt32(bias.shape_expr[0]), wt, wh, ww, nh, nw, volume]
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.SymInt32(shape[0]) * (t // wt) * nh * nw
        params.grid_y = trtp.cdiv(volume, kernel.block_m)
        params.block_x = kernel.num_warps * 32
        params.shared_mem = kernel.shared_bytes
        return kernel.name.encode(), kernel.ptx.encode(), params, trtp.SymIntExprs.from_tuple(extras)

    _registered = True
    log.info("registered the TensorRT plugin %s (version 1, JIT and AOT Triton implementations)", PLUGIN_ID)


def _constant(dim) -> int | None:
    """A shape expression's value when it is known at build time."""
    if isinstance(dim, int):
        return dim
    return int(dim.constant_value) if dim.is_constant else None
