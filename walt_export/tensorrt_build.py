"""Parse an exported ONNX model with TensorRT's ONNX parser and build a serialized engine with its profile.

Works with full TensorRT (`tensorrt`, GPU machines) and TensorRT-RTX (`tensorrt_rtx`, which also builds on a CPU
ahead of time, without plugins), through Polygraphy's loaders, which handle both. The optimization profile comes
from the manifest: every input's min/opt/max shape from the stage's dynamic-dim profile. Networks are strongly
typed (the precision is the ONNX file's) except on TensorRT 10.x with its FP16 flag.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from runtime.engine_registry import import_tensorrt
from runtime.files import atomic_output
from runtime.manifest import StageInfo

log = logging.getLogger(__name__)


class EngineBuildError(RuntimeError):
    """The ONNX parser or the builder refused a model; the message carries TensorRT's own errors."""


def profile_shapes(stage: StageInfo) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """input name -> (min, opt, max) shapes, from the stage's dynamic-dim profile."""
    dims = [{name: bounds[i] for name, bounds in stage.profile.items()} for i in range(3)]
    return {t.name: tuple(t.concrete(d) for d in dims) for t in stage.inputs}  # type: ignore[misc]


def build_engine(onnx_path: str | Path, stage: StageInfo, trt: ModuleType | None = None,
                 workspace_bytes: int | None = None, fp16_flag: bool = False,
                 timing_cache: str | Path | None = None) -> bytes:
    """Parse `onnx_path` (external data beside it) and build a serialized engine for the stage's profile.

    Built with Polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig -> EngineBytesFromNetwork), for
    TensorRT or TensorRT-RTX alike.

    Args:
        fp16_flag: TensorRT 10.x only: a weakly typed network with the FP16 builder flag (FP32 ONNX in, FP16
            kernels allowed). Otherwise the network is strongly typed: the ONNX file's types are the engine's.
        timing_cache: a file read before the build (if it exists) and written back after it (full TensorRT).
    """
    trt = trt or import_tensorrt()
    loaders, logger = _polygraphy(trt)
    profile = loaders.Profile()
    for name, (low, opt, high) in profile_shapes(stage).items():
        profile.add(name, low, opt, high)
    if timing_cache is not None and trt.__name__ == "tensorrt_rtx":
        log.info("ignoring the timing cache %s: TensorRT-RTX has none (its timing-cache calls are no-ops)", timing_cache)
        timing_cache = None
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not fp16_flag
    with _polygraphy_errors(logger, f"TensorRT could not build an engine from {Path(onnx_path).name}"):
        network = loaders.NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
        config = loaders.CreateConfig(
            fp16=fp16_flag, profiles=[profile],
            memory_pool_limits=None if workspace_bytes is None else {trt.MemoryPoolType.WORKSPACE: workspace_bytes},
            load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).is_file() else None,
        )
        if timing_cache is None:
            engine = loaders.EngineBytesFromNetwork(network, config)()
        else:
            with atomic_output(timing_cache) as tmp:
                engine = loaders.EngineBytesFromNetwork(network, config, save_timing_cache=str(tmp))()
    log.info("built an engine from %s: %d bytes", Path(onnx_path).name, engine.nbytes)
    return bytes(engine)


def network_layers(onnx_path: str | Path, trt: ModuleType | None = None) -> list[tuple[str, str]]:
    """(name, layer type) of every layer TensorRT's parser makes of a file (what the engine is built from;
    inspecting the built engine itself needs a GPU)."""
    loaders, logger = _polygraphy(trt or import_tensorrt())
    with _polygraphy_errors(logger, f"TensorRT cannot parse {Path(onnx_path).name}"):
        _, network, _ = loaders.NetworkFromOnnxPath(str(onnx_path))()
    return [(network.get_layer(i).name, str(network.get_layer(i).type).split(".")[-1]) for i in range(network.num_layers)]


@contextlib.contextmanager
def _polygraphy_errors(logger, failure: str) -> Iterator[None]:
    """Polygraphy's console output captured (TensorRT's messages pass through it): on success it goes to the debug
    log; Polygraphy's failure (PolygraphyException) becomes an EngineBuildError carrying TensorRT's error lines."""
    from polygraphy.exception import PolygraphyException

    output = io.StringIO()
    try:
        with logger.verbosity(logger.INFO if log.isEnabledFor(logging.DEBUG) else logger.WARNING), \
                contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            yield
    except PolygraphyException as e:
        errors = [line.strip() for line in output.getvalue().splitlines() if line.startswith(("[E]", "[!]"))]
        raise EngineBuildError(f"{failure}: {'; '.join(errors) or e}") from None
    finally:
        if output.getvalue().strip():
            log.debug("polygraphy: %s", output.getvalue().strip())


def _polygraphy(trt: ModuleType):
    """Polygraphy's TensorRT loaders bound to `trt` (it picks TensorRT-RTX by a flag read when its TensorRT
    backend is first imported), and its logger."""
    import polygraphy.config
    from polygraphy.logger import G_LOGGER

    rtx = trt.__name__ == "tensorrt_rtx"
    if "polygraphy.backend.trt" in sys.modules and polygraphy.config.USE_TENSORRT_RTX != rtx:
        raise ImportError(f"Polygraphy is already bound to {'TensorRT-RTX' if not rtx else 'TensorRT'} in this "
                          f"process; use one TensorRT per process")
    polygraphy.config.USE_TENSORRT_RTX = rtx
    from polygraphy.backend import trt as loaders

    return loaders, G_LOGGER
