"""Parse an exported ONNX model with TensorRT's ONNX parser and build a serialized engine with its profile.

Works with full TensorRT (`tensorrt`, GPU machines) and TensorRT-RTX (`tensorrt_rtx`, which also builds on a CPU
ahead of time, without plugins). The optimization profile comes from the manifest: every input's min/opt/max
shape from the stage's dynamic-dim profile. Networks are strongly typed: the precision is the ONNX file's.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

from runtime.manifest import StageInfo

log = logging.getLogger(__name__)

TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")  # in order of preference


class EngineBuildError(RuntimeError):
    """The ONNX parser or the builder refused a model; the message carries TensorRT's own errors."""


def import_tensorrt(name: str | None = None) -> ModuleType:
    """`tensorrt`, else `tensorrt_rtx` (or the one named); ImportError saying how to install one."""
    for module in (name,) if name else TENSORRT_MODULES:
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise ImportError(f"no TensorRT found (tried {', '.join((name,) if name else TENSORRT_MODULES)}): install "
                      "TensorRT on a GPU machine, or `pip install tensorrt-rtx` to build engines on a CPU")


def profile_shapes(stage: StageInfo) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """input name -> (min, opt, max) shapes, from the stage's dynamic-dim profile."""
    dims = [{name: bounds[i] for name, bounds in stage.profile.items()} for i in range(3)]
    return {t.name: tuple(t.concrete(d) for d in dims) for t in stage.inputs}  # type: ignore[misc]


def build_engine(onnx_path: str | Path, stage: StageInfo, trt: ModuleType | None = None,
                 workspace_bytes: int | None = None) -> bytes:
    """Parse `onnx_path` (external data beside it) and build a serialized engine for the stage's profile."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(stage).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {Path(onnx_path).name} (see its log above)")
    log.info("built an engine from %s: %d layers, %d bytes", Path(onnx_path).name, network.num_layers, engine.nbytes)
    return bytes(engine)
