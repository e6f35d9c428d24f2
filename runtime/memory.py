"""What a generation holds in memory, per stage: `Pipeline(..., memory_report=True)`, `generate --memory-report`.

Host memory is the process's resident set, read from Linux's /proc/self/status (VmRSS; VmHWM, its peak, which
writing 5 to /proc/self/clear_refs resets to the current RSS):
- a stage's `opened` is the RSS growth while its runner opened (onnxruntime: the session's weights and buffers);
- its `peak` is the highest RSS while one of its calls ran (the peak reset before the call, read after it), so the
  stage's working memory on top of everything still held at the time;
- the run's `peak` is the highest RSS of the process since the report started (the peaks read before each reset).
Device memory is what a TensorRT engine says it needs (`TensorRTRunner.device_memory`): the activation memory of
its execution context and the plan's size (the weights it loads); the GPU itself is not sampled.

Without /proc (not Linux) the report has no figures (None). The peak is the process's: two pipelines measuring in
one process at once would reset each other's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

MIB = 2**20


def read_status(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status in bytes ('VmRSS' resident, 'VmHWM' its peak), or
    None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageMemory(BaseModel):
    """One stage's memory in one run (bytes; None where unmeasurable), over every time it ran."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    opens: int = 0  # how often its runner was opened (low-memory mode reopens it for every clip)
    opened: int | None = None  # RSS growth while its runner opened, the largest of its openings
    peak: int | None = None  # highest RSS while one of its calls ran
    device_activations: int | None = None  # TensorRT: the execution context's device memory
    device_plan: int | None = None  # TensorRT: bytes of the plan (its weights)


class MemoryReport(BaseModel):
    """Memory of one run (bytes; None where unmeasurable): the RSS when it started, its peak, per stage."""

    model_config = ConfigDict(extra="forbid")

    low_memory: bool
    start: int | None  # RSS when the report started
    peak: int | None  # the highest RSS since then
    stages: list[StageMemory]

    def table(self) -> str:
        """The report as a text table in MiB."""
        def mib(value: int | None) -> str:
            return "-" if value is None else f"{value / MIB:.0f}"

        rows = [f"{'stage':<24}{'opens':>6}{'opened MiB':>12}{'peak RSS MiB':>14}{'device MiB':>12}"]
        for s in self.stages:
            device = None if s.device_activations is None else s.device_activations + (s.device_plan or 0)
            rows.append(f"{s.stage:<24}{s.opens:>6}{mib(s.opened):>12}{mib(s.peak):>14}{mib(device):>12}")
        rows.append(f"peak RSS {mib(self.peak)} MiB (at the start {mib(self.start)} MiB)"
                    f"{', low-memory mode' if self.low_memory else ''}")
        rows.append("opened: RSS growth while its runner opened (0 where it reused memory an earlier stage freed); "
                    "peak RSS: the highest while it ran")
        return "\n".join(rows)


class MemoryMonitor:
    """Records each stage's memory while a pipeline runs; `report()` gives the MemoryReport."""

    def __init__(self, low_memory: bool):
        self.low_memory = low_memory
        self.start = read_status("VmRSS")
        self.stages: dict[str, StageMemory] = {}
        self._peak = self.start
        self._lock = threading.Lock()

    def _stage(self, name: str) -> StageMemory:
        return self.stages.setdefault(name, StageMemory(stage=name))

    def _fold_peak(self) -> int | None:
        """The process's peak RSS since the last reset, folded into the run's peak."""
        peak = read_status("VmHWM")
        if peak is not None and self._peak is not None:
            self._peak = max(self._peak, peak)
        return peak

    @contextlib.contextmanager
    def opening(self, name: str) -> Iterator[None]:
        """Around the opening of a stage's runner: records its RSS growth."""
        before = read_status("VmRSS")
        yield
        after = read_status("VmRSS")
        with self._lock:
            stage = self._stage(name)
            stage.opens += 1
            if before is not None and after is not None:
                stage.opened = max(stage.opened or 0, after - before)

    def device(self, name: str, activations: int, plan: int) -> None:
        """A TensorRT engine's device memory (bytes of activations and of the plan)."""
        with self._lock:
            stage = self._stage(name)
            stage.device_activations, stage.device_plan = activations, plan

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[None]:
        """Around one call of a stage's runner: its peak RSS (VmHWM reset before the call)."""
        with self._lock:
            self._fold_peak()
            measurable = reset_peak()
        try:
            yield
        finally:
            with self._lock:
                peak = self._fold_peak()
                stage = self._stage(name)
                if measurable and peak is not None:
                    stage.peak = max(stage.peak or 0, peak)

    def report(self) -> MemoryReport:
        with self._lock:
            self._fold_peak()
            return MemoryReport(low_memory=self.low_memory, start=self.start, peak=self._peak,
                                stages=[s.model_copy() for s in self.stages.values()])
