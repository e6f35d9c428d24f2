"""What a generation holds in memory, per stage: `Pipeline(..., memory_report=True)`, `generate --memory-report`.

Host memory is the process's resident set (RSS, through psutil):
- a stage's `opened` is the RSS growth while its runner opened (onnxruntime: the session's weights and buffers);
- its `peak` is the highest RSS sampled (every `SAMPLE_SECONDS`) while its runner ran, so the stage's working
  memory on top of everything still held at the time;
- the run's `peak` is the kernel's high-water mark of the process (`ru_maxrss`), which no sampling can miss.
Device memory is what a TensorRT engine says it needs (`TensorRTRunner.device_memory`): the activation memory of
its execution context (`ICudaEngine.device_memory_size_v2`) and the plan's size (the weights it loads); the GPU
itself is not sampled.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

SAMPLE_SECONDS = 0.002  # RSS sampling period while a stage runs
MIB = 2**20


class StageMemory(BaseModel):
    """One stage's memory in one run (bytes); opened and peak are the sums and maxima over every time it ran."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    opens: int = 0  # how often its runner was opened (low-memory mode reopens it for every clip)
    opened: int = 0  # RSS growth while its runner opened, the largest of its openings
    peak: int = 0  # highest RSS sampled while it ran
    device_activations: int | None = None  # TensorRT: the execution context's device memory
    device_plan: int | None = None  # TensorRT: bytes of the plan (its weights)


class MemoryReport(BaseModel):
    """Memory of one generation (bytes): the RSS before any stage opened, the process's peak RSS, per stage."""

    model_config = ConfigDict(extra="forbid")

    low_memory: bool
    start: int  # RSS when the report started
    peak: int  # the process's peak RSS (ru_maxrss), from its start
    stages: list[StageMemory]

    def table(self) -> str:
        """The report as a text table in MiB."""
        rows = [f"{'stage':<24}{'opens':>6}{'opened MiB':>12}{'peak RSS MiB':>14}{'device MiB':>12}"]
        for s in self.stages:
            device = "" if s.device_activations is None else \
                f"{(s.device_activations + (s.device_plan or 0)) / MIB:.0f}"
            rows.append(f"{s.stage:<24}{s.opens:>6}{s.opened / MIB:>12.0f}{s.peak / MIB:>14.0f}{device:>12}")
        rows.append(f"process peak RSS {self.peak / MIB:.0f} MiB (RSS at the start {self.start / MIB:.0f} MiB)"
                    f"{', low-memory mode' if self.low_memory else ''}")
        return "\n".join(rows)


def rss() -> int:
    """This process's resident set in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's peak resident set since it started, in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMonitor:
    """Records each stage's memory while a pipeline runs; `report()` gives the MemoryReport."""

    def __init__(self, low_memory: bool):
        self.low_memory = low_memory
        self.start = rss()
        self.stages: dict[str, StageMemory] = {}
        self._lock = threading.Lock()

    def _stage(self, name: str) -> StageMemory:
        return self.stages.setdefault(name, StageMemory(stage=name))

    @contextlib.contextmanager
    def opening(self, name: str) -> Iterator[None]:
        """Around the opening of a stage's runner: records its RSS growth."""
        before = rss()
        yield
        with self._lock:
            stage = self._stage(name)
            stage.opens += 1
            stage.opened = max(stage.opened, rss() - before)

    def device(self, name: str, activations: int, plan: int) -> None:
        """A TensorRT engine's device memory (bytes of activations and of the plan)."""
        with self._lock:
            stage = self._stage(name)
            stage.device_activations, stage.device_plan = activations, plan

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[None]:
        """Around one call of a stage's runner: samples RSS in a thread until the call returns."""
        done = threading.Event()
        highest = [rss()]

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                highest[0] = max(highest[0], rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            highest[0] = max(highest[0], rss())
            with self._lock:
                stage = self._stage(name)
                stage.peak = max(stage.peak, highest[0])

    def report(self) -> MemoryReport:
        with self._lock:
            return MemoryReport(low_memory=self.low_memory, start=self.start, peak=peak_rss(),
                                stages=[s.model_copy() for s in self.stages.values()])
