"""The one base class of user-facing failures, and the kinds that belong to no single module.

A `WaltExportError` is a mistake the user can fix: a bad config, checkpoint, artifact, request, jobs file, an
engine TensorRT refuses, a missing optional package, no GPU. Its message says what was wrong and what to do, so
both CLIs print it as one line and exit 1. Any other exception is a bug and keeps its traceback; `-v` shows the
traceback of both (docs/architecture.md §8). Each module defines its own kinds next to the code that raises them
(`ConfigError`, `CheckpointError`, `ArtifactError`, `JobsError`, `EngineBuildError`, `CudaError`); they subclass
this base, and keep the builtin base they had (ValueError, RuntimeError) for callers that catch those.
"""

from __future__ import annotations


class WaltExportError(Exception):
    """A failure the user can fix; the message says what was wrong and what to do instead."""


class RequestError(WaltExportError, ValueError):
    """A generation request that does not fit the artifact (conditioning, length, first-frame image)."""


class MissingDependencyError(WaltExportError, ImportError):
    """An optional package is not installed; the message names the extra (or command) that installs it."""


class UsageError(WaltExportError, ValueError):
    """A setting a command or function cannot use (a device name, a calibration gate, an attention path); the
    message lists the valid ones."""


def import_optional(module: str, install: str):
    """`importlib.import_module(module)`, or MissingDependencyError saying what installs it (`install`, e.g.
    "pip install 'walt-export[calibration]'")."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{module} is not installed: {install}") from e
