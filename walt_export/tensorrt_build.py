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

from runtime.files import atomic_output
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
                 workspace_bytes: int | None = None, fp16_flag: bool = False,
                 timing_cache: str | Path | None = None) -> bytes:
    """Parse `onnx_path` (external data beside it) and build a serialized engine for the stage's profile.

    Args:
        fp16_flag: TensorRT 10.x only: a weakly typed network with the FP16 builder flag (FP32 ONNX in, FP16
            kernels allowed). Otherwise the network is strongly typed: the ONNX file's types are the engine's.
        timing_cache: a file read before the build (if it exists) and written back after it (full TensorRT).
    """
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not fp16_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = None
    if timing_cache is not None and trt.__name__ == "tensorrt_rtx":
        log.info("ignoring the timing cache %s: TensorRT-RTX has none (its timing-cache calls are no-ops)", timing_cache)
    elif timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(stage).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {Path(onnx_path).name} (see its log above)")
    if cache is not None:
        with atomic_output(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built an engine from %s: %d layers, %d bytes", Path(onnx_path).name, network.num_layers, engine.nbytes)
    return bytes(engine)


def network_layers(onnx_path: str | Path, trt: ModuleType | None = None) -> list[tuple[str, str]]:
    """(name, layer type) of every layer TensorRT's parser makes of a file (what the engine is built from;
    inspecting the built engine itself needs a GPU)."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT cannot parse {Path(onnx_path).name}")
    return [(network.get_layer(i).name, str(network.get_layer(i).type).split(".")[-1]) for i in range(network.num_layers)]
