"""Runners: one small protocol for every backend.

    with runner:
        outputs = runner.infer(feeds)   # dicts of arrays keyed by the manifest's input and output names

The sampling loop is written once against this protocol (Polygraphy's runner shape: activate, infer, deactivate).
Backends: `onnxruntime` (an ONNX file, on the CPU, CUDA or onnxruntime's TensorRT EP) and `tensorrt` (a plan of
`walt-export engines`, run by `runtime.tensorrt_runner.TensorRTRunner` with buffers kept on the GPU). They are
imported lazily, so `import runtime` needs neither onnxruntime nor TensorRT.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.errors import UsageError, import_optional
from runtime.manifest import ModelFile, Precision, StageInfo


class Runner(Protocol):
    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeRunner:
    """An onnxruntime session over one ONNX file.

    Args:
        path: the model file (its external data beside it).
        providers: onnxruntime execution providers in order of preference, e.g.
            ("CUDAExecutionProvider", "CPUExecutionProvider"); the CPU one alone by default.
        threads: intra-op threads; 0 lets onnxruntime decide.
        memory_arena: keep activations in onnxruntime's CPU memory arena between calls, one arena shared by every
            such session of the process (`wants_memory_arena`); off by default, so activations go back to the
            system after every call.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 memory_arena: bool = False):
        self.path = Path(path)
        self.providers = tuple(providers)
        self.threads = threads
        self.memory_arena = memory_arena
        self.session = None

    def __enter__(self) -> OnnxRuntimeRunner:
        ort = import_optional("onnxruntime", "pip install 'walt-export[cpu]' (or [gpu] for onnxruntime-gpu)")

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3  # errors only
        options.enable_cpu_mem_arena = self.memory_arena
        if self.memory_arena and "CPUExecutionProvider" in self.providers:
            _register_shared_arena(ort)
            options.add_session_config_entry("session.use_env_allocators", "1")
        self.session = ort.InferenceSession(str(self.path), options, providers=list(self.providers))
        if self.providers[0] not in self.session.get_providers():  # listed, but it could not start (no GPU)
            raise UsageError(f"{self.path.name}: onnxruntime could not start {self.providers[0]} (is there a usable "
                             f"GPU?) and would run on {', '.join(self.session.get_providers())}; use --device cpu")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        return self

    def __exit__(self, *exc: object) -> None:
        self.session = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise RuntimeError("use the runner inside `with runner:`")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name} needs the inputs {missing}; got {sorted(feeds)}")
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))


BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_PRECISION = {"onnxruntime": "fp32", "tensorrt": "fp16"}  # TensorRT runs plans, which are fp16 or int8
_PROVIDERS = {  # device -> onnxruntime execution providers, in order of preference
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def check_device(device: str) -> tuple[str, ...]:
    """onnxruntime's execution providers for `device` (cpu, cuda, tensorrt), after checking that this onnxruntime
    build has the device's own provider (onnxruntime has only the CPU one; onnxruntime-gpu adds CUDA and TensorRT).

    Raises UsageError for an unknown device or one this onnxruntime cannot run on (instead of a silent CPU run).
    """
    if device not in _PROVIDERS:
        raise UsageError(f"unknown device {device!r} for onnxruntime; devices: {', '.join(_PROVIDERS)}")
    ort = import_optional("onnxruntime", "pip install 'walt-export[cpu]' (or [gpu] for onnxruntime-gpu)")
    available = ort.get_available_providers()
    if _PROVIDERS[device][0] not in available:
        raise UsageError(f"--device {device} needs onnxruntime's {_PROVIDERS[device][0]}, which this onnxruntime "
                         f"lacks (it has {', '.join(available)}): install onnxruntime-gpu instead of onnxruntime "
                         "(never both; `make EXTRAS=torch,gpu,t5 ...`), or use --device cpu")
    return _PROVIDERS[device]


_arena_lock = threading.Lock()
_arena_registered = False


def _register_shared_arena(ort) -> None:
    """Register, once per process, the CPU memory arena every session with `memory_arena` shares.

    Shared, the arena grows to the largest working memory of one call of any of those sessions (the denoisers run
    one after another), not to the sum of one arena per session; it extends by what is requested
    (kSameAsRequested), not to the next power of two. Measured at `tiny` (three denoisers, docs/architecture.md §4):
    +0.49 GiB held, against +0.73 GiB with one arena per session, equally fast."""
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _arena_registered = True


def onnxruntime_file(stage: StageInfo, precision: Precision, device: str = "cpu") -> ModelFile:
    """The file onnxruntime runs for a stage at `precision` (the one its policy resolved) on `device`: the attention
    variant where the stage has one, on the CPU and CUDA EPs (each window attention one `Attention` kernel;
    BENCHMARKS.md has the speed-up), else the canonical file (stages without window attention, artifacts exported
    before the variant existed, and onnxruntime's TensorRT EP, whose TensorRT may not build `Attention` in FP32)."""
    has_attention = any(f.variant == "attention" and f.precision == precision for f in stage.files)
    return stage.file(precision, "attention" if has_attention and device != "tensorrt" else "canonical")


def wants_memory_arena(stage: StageInfo, low_memory: bool = False) -> bool:
    """Whether onnxruntime keeps its CPU memory arena for a stage: the denoisers, yes (except in low-memory mode,
    where nothing is held between stages); the text encoder and the tokenizer, no.

    A denoiser runs every step on the same shapes. Without the arena each call maps its activations afresh (about
    39k page faults per call at `tiny`); with it they stay mapped, at the cost of holding the call's peak working
    memory between calls (docs/architecture.md §4 has the figures). The tokenizer and the text encoder run once or
    twice per clip with video-sized activations, which go back to the system after each call."""
    return stage.denoiser is not None and not low_memory


def make_runner(backend: str, path: str | Path, device: str = "cpu", threads: int = 0,
                memory_arena: bool = False) -> Runner:
    """A runner for one model file: `onnxruntime` on a device (cpu, cuda, or tensorrt = its TensorRT EP) with
    `threads` and, if asked, its CPU memory arena (`wants_memory_arena`); `tensorrt` for a plan
    (`runtime.engine_registry.find_plan`) on the current CUDA GPU, where `device`, `threads` and `memory_arena` do
    not apply."""
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, check_device(device), threads, memory_arena)
    if backend == "tensorrt":
        from runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(path)
    raise UsageError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
