"""The TensorRT backend: a plan of `walt-export engines` run with buffers that stay on the GPU between calls.

    plan = find_plan(artifact_dir, "base", "fp16", trt)       # runtime.engine_registry: checked for this machine
    with TensorRTRunner(plan) as runner:
        outputs = runner.infer(feeds)   # numpy in, numpy out (copies the caller owns), keyed by the manifest's names

`__enter__` deserializes the plan and creates one execution context and one CUDA stream. Each `infer` checks the
feeds against the engine's inputs (names, dtypes, shapes within its profile), sets the input shapes (only when they
changed), sizes the device buffers from the shapes the context resolves, copies the inputs to the GPU, executes,
copies the outputs back and synchronizes the stream.

Device buffers: one per input and output, allocated on first use and reused by every later call; a buffer is
reallocated only when a call needs more bytes than it holds (a larger batch), and never shrinks.

Input copies are skipped for a feed that is the very same array object as on the previous call and frozen
(`is_frozen`: read-only, and so is every array it views), since its bytes are still on the GPU: making an array
read-only is the caller's promise not to change it. This relies on the engine not writing its inputs, which holds
for engines without plugins that alias an input to an output (ours have none).

CUDA graphs (`cuda_graph=True`): with full TensorRT, the second call in a row with the same input shapes captures
`execute_async_v3` into a graph and launches it (the first call runs it normally, which TensorRT needs after a shape
change before a capture); later calls replay the graph while the shapes stay the same, and new shapes drop it and
start the cycle again. A graph records buffer addresses, so buffers must not move while it is replayed: a buffer
that grows drops the graph too. An engine that cannot be captured (a warning says why) runs without graphs.
TensorRT-RTX, whose JIT specialises kernels per shape (and whose engines allow stream capture only when built with
REQUIRE_USER_ALLOCATION), captures graphs itself: the runner asks for its WHOLE_GRAPH_CAPTURE strategy instead.

TensorRT (`tensorrt`, else `tensorrt_rtx`) and cuda-python (`cuda.bindings.runtime`, as TensorRT's own samples
use it) are imported in `__enter__`. The parts that need no GPU are plain functions: `check_feeds`, `buffer_plan`,
`buffers_to_grow`, `is_frozen`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from runtime.engine_registry import import_tensorrt
from runtime.errors import MissingDependencyError, WaltExportError
from runtime.manifest import ArtifactError

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
REBUILD = "rebuild it on this machine with `walt-export engines --artifacts DIR`"
_LOGGERS: dict[str, Any] = {}  # TensorRT module name -> its forwarding logger (see `_forwarding_logger`)


class CudaError(WaltExportError, RuntimeError):
    """A CUDA runtime call failed, or there is no CUDA device; the message names the call and CUDA's error."""


@dataclass(frozen=True)
class EngineTensor:
    """One input or output of an engine, as the engine declares it."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: Shape  # -1 marks a dynamic dim
    profile: tuple[Shape, Shape, Shape] | None = None  # dynamic inputs: (min, opt, max) of optimization profile 0


@dataclass(frozen=True)
class Buffer:
    """What one device buffer holds for a call."""

    shape: Shape
    dtype: np.dtype
    nbytes: int  # at least 1, so that every tensor, even an empty one, gets an address


def check_feeds(tensors: Sequence[EngineTensor], feeds: Mapping[str, np.ndarray],
                engine: str = "the engine") -> dict[str, np.ndarray]:
    """The engine's inputs taken from `feeds`: C-contiguous, of the engine's dtypes, shapes checked.

    A dtype is converted only where no value can change (numpy's "safe" casts, e.g. float16 -> float32); others,
    such as float64 -> float32, raise TypeError instead of rounding silently. Missing inputs and shapes the engine
    does not take raise ValueError. Feeds the engine does not take are ignored (as onnxruntime's runner does).
    """
    inputs = [tensor for tensor in tensors if tensor.is_input]
    missing = [tensor.name for tensor in inputs if tensor.name not in feeds]
    if missing:
        raise ValueError(f"{engine} needs the inputs {missing}; got {sorted(feeds)}")
    arrays = {}
    for tensor in inputs:
        array = np.asarray(feeds[tensor.name])
        if array.dtype != tensor.dtype:
            if not np.can_cast(array.dtype, tensor.dtype, casting="safe"):
                raise TypeError(f"{engine}: input {tensor.name!r} is {array.dtype}, the engine takes {tensor.dtype}; "
                                f"convert it first (.astype(np.{tensor.dtype})): feeds are cast only where no value "
                                "can change")
            array = array.astype(tensor.dtype)
        _check_shape(tensor, array.shape, engine)
        arrays[tensor.name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    return arrays


def _check_shape(tensor: EngineTensor, shape: Shape, engine: str) -> None:
    if len(shape) != len(tensor.shape) or any(d not in (-1, s) for d, s in zip(tensor.shape, shape, strict=True)):
        pattern = str(tuple("?" if d < 0 else d for d in tensor.shape)).replace("'", "")  # (?, 8, 3, 4, 4)
        raise ValueError(f"{engine}: input {tensor.name!r} has shape {shape}, the engine takes {pattern} "
                         "(? = any size within its profile)")
    if tensor.profile is not None:
        low, _, high = tensor.profile
        if not all(lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
            if low[0] == high[0] and shape[0] != low[0]:  # a static batch (walt-export engines --profile static)
                how = (f"it was built with a static profile at batch {low[0]}: rebuild the plans with `walt-export "
                       "engines --artifacts DIR --profile static --batch N` for N videos per call (the denoisers and "
                       "the text encoder take 2N rows, the tokenizer N), or with `--profile dynamic`")
            else:
                how = "the manifest's profile: export and build for other sizes"
            raise ValueError(f"{engine}: input {tensor.name!r} has shape {shape}, outside the engine's profile "
                             f"{low} .. {high} ({how})")


def buffer_plan(tensors: Sequence[EngineTensor], shapes: Mapping[str, Shape],
                engine: str = "the engine") -> dict[str, Buffer]:
    """name -> Buffer for every input and output, given this call's shapes (inputs: the feeds'; outputs: those the
    execution context resolved from them). An output whose shape depends on the data (-1) raises ValueError."""
    plan = {}
    for tensor in tensors:
        shape = tuple(int(d) for d in shapes[tensor.name])
        if any(d < 0 for d in shape):
            raise ValueError(f"{engine}: output {tensor.name!r} has a data-dependent shape {shape}; this runner needs "
                             "output shapes that follow from the input shapes")
        plan[tensor.name] = Buffer(shape, tensor.dtype, max(math.prod(shape) * tensor.dtype.itemsize, 1))
    return plan


def buffers_to_grow(capacity: Mapping[str, int], plan: Mapping[str, Buffer]) -> list[str]:
    """Names whose device buffer must be (re)allocated: none yet, or fewer bytes (`capacity`) than the call needs."""
    return [name for name, buffer in plan.items() if capacity.get(name, 0) < buffer.nbytes]


def is_frozen(array: Any) -> bool:
    """Whether an array can be trusted not to change: read-only, and so is every array it views (a read-only view
    of a writable array still changes with it). Arrays over other buffers (bytes, mmap, ...) are not trusted."""
    while array is not None:
        if not isinstance(array, np.ndarray) or array.flags.writeable:
            return False
        array = array.base
    return True


class TensorRTRunner:
    """One TensorRT plan on the current CUDA device (see the module docstring for buffers, copies and graphs).

    Args:
        plan_path: a plan built for this machine (`runtime.engine_registry.find_plan` finds and checks it).
        cuda_graph: replay CUDA graphs while input shapes repeat.
        trt: the TensorRT module that built the plan; default `import_tensorrt()` (tensorrt, else tensorrt_rtx).
    """

    def __init__(self, plan_path: str | Path, cuda_graph: bool = False, trt: ModuleType | None = None):
        self.path = Path(plan_path)
        self.cuda_graph = cuda_graph
        self._trt = trt
        self.tensors: list[EngineTensor] = []
        self._cudart = self._logger = self._runtime = self._engine = self._context = self._stream = None
        self._stream_address = 0  # the stream as TensorRT takes it
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes allocated)
        self._on_device: dict[str, np.ndarray] = {}  # name -> the frozen feed whose bytes are in its buffer
        self._input_shapes: dict[str, Shape] | None = None  # as last set on the context
        self._capture = False  # capture graphs ourselves (full TensorRT with cuda_graph)
        self._graph = None  # the executable graph for the current shapes and buffers
        self._ran = False  # execute_async_v3 ran since the shapes or buffers last changed

    # ------------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> TensorRTRunner:
        trt = self._trt or import_tensorrt()
        try:
            from cuda.bindings import runtime as cudart
        except ImportError as error:
            raise MissingDependencyError(
                "the TensorRT backend needs cuda-python: `pip install 'walt-export[tensorrt]'` (its major version "
                "must match your CUDA: 'cuda-python>=12.6.1,<13' for CUDA 12)") from error
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count == 0:
            reason = cudart.cudaGetErrorName(err)[1].decode() if err != cudart.cudaError_t.cudaSuccess else "0 devices"
            raise CudaError(f"no CUDA device (cudaGetDeviceCount: {reason}): the TensorRT backend needs a GPU; "
                            "use --backend onnxruntime")
        self._cudart = cudart
        try:
            self._open(trt)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _open(self, trt: ModuleType) -> None:
        if not self.path.is_file():
            raise ArtifactError(f"no TensorRT plan at {self.path}; build it with `walt-export engines --artifacts DIR`")
        self._logger = _forwarding_logger(trt)
        self._logger.errors.clear()
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"{trt.__name__} {trt.__version__} cannot deserialize {self.path.name} "
                                f"({self._errors()}); {REBUILD}")
        self.tensors = engine_tensors(self._engine, trt, self.path.name)
        if self.cuda_graph and hasattr(trt, "CudaGraphStrategy"):  # TensorRT-RTX: its own graph capture
            config = self._engine.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self._context = self._engine.create_execution_context(config)
        else:
            self._context = self._engine.create_execution_context()
            self._capture = self.cuda_graph
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.path.name} "
                               f"({self._errors()}); is the GPU out of memory?")
        self._stream = self._cuda("cudaStreamCreate")
        self._stream_address = _address(self._stream)

    def __exit__(self, *exc: object) -> None:
        """Free the graph, device buffers, stream and context (best effort: failures are logged, not raised)."""
        if self._cudart is not None:
            releases = [("cudaStreamSynchronize", self._stream)] if self._stream is not None else []
            releases += [("cudaGraphExecDestroy", self._graph)] if self._graph is not None else []
            releases += [("cudaFree", pointer) for pointer, _ in self._buffers.values()]
            releases += [("cudaStreamDestroy", self._stream)] if self._stream is not None else []
            for call, handle in releases:
                try:
                    self._cuda(call, handle)
                except CudaError as error:
                    log.warning("%s", error)
        self._graph = self._stream = self._input_shapes = None
        self._ran = False
        self._buffers.clear()
        self._on_device.clear()
        self._context = self._engine = self._runtime = None  # in this order: a context before its engine

    @property
    def allocated(self) -> dict[str, int]:
        """Bytes allocated on the device per input and output (they only grow; freed by `__exit__`)."""
        return {name: nbytes for name, (_, nbytes) in self._buffers.items()}

    @property
    def device_memory(self) -> tuple[int, int]:
        """(activation bytes of the execution context, bytes of the plan): what the engine says it needs on the
        device (`ICudaEngine.device_memory_size_v2`, TensorRT >= 10; the plan holds the weights it loads), for
        `runtime.memory`. Inputs and outputs (`allocated`) come on top."""
        engine = self._engine
        activations = engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else \
            engine.device_memory_size
        return int(activations), self.path.stat().st_size

    # ------------------------------------------------------------------------------------------------ inference
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise RuntimeError("use the runner inside `with runner:`")
        arrays = check_feeds(self.tensors, feeds, self.path.name)
        self._logger.errors.clear()  # keep only this call's TensorRT errors for its exceptions
        shapes = {name: array.shape for name, array in arrays.items()}
        if shapes != self._input_shapes:
            self._set_input_shapes(shapes)
        resolved = shapes | {s.name: tuple(self._context.get_tensor_shape(s.name)) for s in self.tensors
                             if not s.is_input}
        plan = buffer_plan(self.tensors, resolved, self.path.name)
        grow = buffers_to_grow(self.allocated, plan)
        if grow:
            self._grow(grow, plan)
        kind = self._cudart.cudaMemcpyKind
        for name, array in arrays.items():
            feed = feeds[name]
            if feed is self._on_device.get(name) and is_frozen(feed):
                continue
            if array.nbytes:  # pageable memory: CUDA stages it before returning, so `array` may go after this call
                self._cuda("cudaMemcpyAsync", self._buffers[name][0], array.ctypes.data, array.nbytes,
                           kind.cudaMemcpyHostToDevice, self._stream)
            self._on_device.pop(name, None)
            if is_frozen(feed):
                self._on_device[name] = feed
        self._execute()
        outputs = {}
        for tensor in self.tensors:
            if not tensor.is_input:
                host = np.empty(plan[tensor.name].shape, tensor.dtype)
                if host.nbytes:
                    self._cuda("cudaMemcpyAsync", host.ctypes.data, self._buffers[tensor.name][0], host.nbytes,
                               kind.cudaMemcpyDeviceToHost, self._stream)
                outputs[tensor.name] = host
        self._cuda("cudaStreamSynchronize", self._stream)
        return outputs

    def _set_input_shapes(self, shapes: dict[str, Shape]) -> None:
        self._input_shapes = None  # until every shape is set
        self._drop_graph()  # captured for the old shapes
        for name, shape in shapes.items():
            if not self._context.set_input_shape(name, shape):
                raise ValueError(f"{self.path.name}: TensorRT refused the shape {shape} of {name!r} ({self._errors()})")
        unresolved = self._context.infer_shapes()
        if unresolved:
            raise ValueError(f"{self.path.name}: TensorRT cannot resolve the shapes of {unresolved} ({self._errors()})")
        self._input_shapes = shapes

    def _grow(self, names: list[str], plan: dict[str, Buffer]) -> None:
        """(Re)allocate these buffers (cudaFree waits for the device, so no work in flight still uses them)."""
        self._drop_graph()  # it recorded the old addresses
        for name in names:
            if name in self._buffers:
                self._cuda("cudaFree", self._buffers.pop(name)[0])
            pointer = self._cuda("cudaMalloc", plan[name].nbytes)
            self._buffers[name] = (pointer, plan[name].nbytes)
            self._on_device.pop(name, None)
            if not self._context.set_tensor_address(name, pointer):
                raise RuntimeError(f"{self.path.name}: TensorRT refused the address of {name!r} ({self._errors()})")
        log.debug("%s: allocated %s", self.path.name, ", ".join(f"{n} {plan[n].nbytes} B" for n in names))

    def _execute(self) -> None:
        if self._graph is None and self._capture and self._ran:  # these shapes ran once: capture them now
            self._capture_graph()
        if self._graph is not None:
            self._cuda("cudaGraphLaunch", self._graph, self._stream)
            return
        if not self._context.execute_async_v3(self._stream_address):
            raise RuntimeError(f"TensorRT failed to execute {self.path.name} ({self._errors()})")
        self._ran = True

    def _capture_graph(self) -> None:
        """Record one execute_async_v3 into an executable graph (TensorRT developer guide, "CUDA Graphs")."""
        cudart = self._cudart
        self._cuda("cudaStreamBeginCapture", self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
        executed = self._context.execute_async_v3(self._stream_address)
        err, graph = cudart.cudaStreamEndCapture(self._stream)
        if not executed or err != cudart.cudaError_t.cudaSuccess:
            if err == cudart.cudaError_t.cudaSuccess:
                self._cuda("cudaGraphDestroy", graph)
                reason = self._errors() or "execute_async_v3 failed while capturing"
            else:
                reason = f"cudaStreamEndCapture: {cudart.cudaGetErrorName(err)[1].decode()}; {self._errors()}"
            cudart.cudaGetLastError()  # clear the capture's error, so that it does not surface in later calls
            log.warning("%s cannot be captured into a CUDA graph (%s): running it without graphs", self.path.name,
                        reason)
            self._capture = False
            return
        try:
            self._graph = self._cuda("cudaGraphInstantiate", graph, 0)
        finally:
            self._cuda("cudaGraphDestroy", graph)  # the executable graph does not need it
        log.debug("%s: captured a CUDA graph for %s", self.path.name, self._input_shapes)

    def _drop_graph(self) -> None:
        if self._graph is not None:
            graph, self._graph = self._graph, None
            self._cuda("cudaGraphExecDestroy", graph)
        self._ran = False

    # ------------------------------------------------------------------------------------------------ helpers
    def _cuda(self, call: str, *args: Any) -> Any:
        """cudart.<call>(*args)'s value (cuda-python returns (error, value...)); CudaError naming the call."""
        err, *values = getattr(self._cudart, call)(*args)
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise CudaError(f"{self.path.name}: {call} failed: {self._cudart.cudaGetErrorName(err)[1].decode()}")
        return values[0] if values else None

    def _errors(self) -> str:
        return self._logger.take_errors() if self._logger is not None else ""


def engine_tensors(engine: Any, trt: ModuleType, name: str) -> list[EngineTensor]:
    """The inputs and outputs of a deserialized engine, in its order; ArtifactError for tensors numpy cannot feed."""
    tensors = []
    for i in range(engine.num_io_tensors):
        tensor = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
        if engine.get_tensor_location(tensor) != trt.TensorLocation.DEVICE:
            raise ArtifactError(f"{name}: {tensor!r} is a host (shape) tensor, which this runner does not handle; "
                                "export the model with shapes as ordinary inputs")
        try:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
        except TypeError:
            raise ArtifactError(f"{name}: {tensor!r} is {engine.get_tensor_dtype(tensor)}, which numpy cannot hold; "
                                "export float32/float16/int64 inputs and outputs") from None
        shape = tuple(engine.get_tensor_shape(tensor))
        profile = None
        if is_input and -1 in shape:  # walt-export engines builds one optimization profile
            profile = tuple(tuple(dims) for dims in engine.get_tensor_profile_shape(tensor, 0))
        tensors.append(EngineTensor(tensor, is_input, dtype, shape, profile))
    return tensors


def _address(handle: Any) -> int:
    """The address behind a cuda-python handle, as TensorRT takes it (`int(handle)` is deprecated since 12.9.1)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python < 12.9.1
        return int(handle)
    return get_cuda_native_handle(handle)


def _forwarding_logger(trt: ModuleType) -> Any:
    """The TensorRT logger of this process for `trt`: forwards to `logging` (TensorRT's own prints to stderr) and
    keeps the errors so that exceptions can quote them. One per module, kept forever: TensorRT takes the first
    logger it is given as its global one, so a logger must outlive every runtime that used it."""
    if trt.__name__ in _LOGGERS:
        return _LOGGERS[trt.__name__]
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG}  # VERBOSE: dropped

    class ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level: Any, message: str) -> None:
            if level in levels:
                log.log(levels[level], "TensorRT: %s", message)
            if levels.get(level, 0) >= logging.ERROR:
                self.errors.append(message)

        def take_errors(self) -> str:
            errors, self.errors = "; ".join(self.errors), []
            return errors

    return _LOGGERS.setdefault(trt.__name__, ForwardingLogger())
