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


def describe_validation(error, limit: int = 5) -> str:
    """A pydantic ValidationError as one line: `field.sub: message (got value)` per problem, the first `limit`."""
    problems = []
    for err in error.errors()[:limit]:
        where = ".".join(map(str, err["loc"]))
        shown = repr(err["input"])
        got = "" if err["type"] == "missing" or isinstance(err["input"], dict) else \
            f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}{got}" if where else f"{message}{got}")
    more = len(error.errors()) - limit
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def import_optional(module: str, install: str):
    """`importlib.import_module(module)`, or MissingDependencyError saying what installs it (`install`, e.g.
    "pip install 'walt-export[calibration]'")."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{module} is not installed: {install}") from e
