"""The `wattn::WindowAttention3D` TensorRT plugin: the Triton kernel behind TensorRT's Python plugin API (QDP).

`register_plugin()` registers, once per process, a plugin named `WindowAttention3D` in namespace `wattn`, version
"1" (QDP's default), as design.md §3 requires, with the fields `window` (int32[3], -1 = full extent) and `scale`
(float). TensorRT's ONNX parser maps every `wattn` node of a model's *plugin* variant to it; build engines with
`walt-export engines --attention plugin` after registering (the engine builder does it). The implementation is JIT:
TensorRT calls back into Python with device buffers and the stream, and the kernel runs on that stream; engines
that use it need this module imported (and registered) wherever they are deserialized.

Requires TensorRT >= 10.9 with `tensorrt.plugin` (not TensorRT-RTX, which has no plugins, and not JetPack 6's
TensorRT 10.3: there the route is a C++ IPluginV3 with the same name, namespace, version and fields, loaded by
`trtexec --dynamicPlugins` or `IPluginRegistry.load_library`). Not done yet: an ahead-of-time (PTX) implementation
(`trtp.aot_impl`), which needs the kernel's float `scale` as a compile-time constant or scaled into q beforehand.
QDP has no optional inputs: the plugin takes the relative-position bias as its 4th input, so models exported
without a bias must use the fallback variant.

Written against the documented API (TensorRT's `tensorrt.plugin` docs and its quickly_deployable_plugins sample);
it has not run here: no full TensorRT or GPU on the development machines.
"""

import logging
from typing import List, Tuple  # QDP validates the hints as objects: no `from __future__ import annotations` here

from walt_export.window_attention import OP_DOMAIN, OP_TYPE

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

        from walt_export.window_attention_kernel import window_attention_triton

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tq, tk, tv, tb = (torch.as_tensor(t, device="cuda") for t in (q, k, v, bias))
            out = torch.as_tensor(outputs[0], device="cuda")
            window_attention_triton(tq, tk, tv, tuple(int(w) for w in window), float(scale), tb, out=out)

    _registered = True
    log.info("registered the TensorRT plugin %s (version 1, JIT Triton implementation)", PLUGIN_ID)
