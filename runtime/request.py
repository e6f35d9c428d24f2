"""What one generation asks for, checked once for every way in: `Pipeline.generate`, `python -m runtime generate`
and each line of a `render` jobs file (docs/architecture.md §8).

`Request` checks types and ranges (strictly: `frames="17"`, `steps=2.5`, a NaN guidance or a negative seed are
refused, naming the field); `Pipeline.check` then checks what must fit the artifact (conditioning, length,
denoiser names, steps within the schedule, the image). The annotated types below are the single definition of
each range (also of the other flags both CLIs share, `Threads`, `Count`, `Gigabytes`): the CLIs parse their flags
with `parse_as`, so `--seed -1` is refused as "argument --seed: ...".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from runtime.errors import RequestError, UsageError, describe_validation

# The largest seed numpy's and torch's generators both take (torch.manual_seed unpacks a signed 64-bit integer).
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Steps = Annotated[int, Field(ge=1)]  # DDIM steps; the upper bound (the training schedule's length) is per artifact
Guidance = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]  # classifier-free guidance scale; 1: none, 0: uncond.
Frames = Annotated[int, Field(ge=1)]  # the lengths an artifact makes are checked by `Pipeline.check`
ClassId = Annotated[int, Field(ge=0)]
Threads = Annotated[int, Field(ge=0)]  # CPU threads per model; 0: the backend decides
Count = Annotated[int, Field(ge=1)]  # how many: batch sizes, calibration generations and timesteps
Gigabytes = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a memory limit in GiB (TensorRT's workspace)


def _one_or_per_denoiser(kind: object) -> BeforeValidator:
    """A setting for every denoiser (one value) or per denoiser ({"base": 50, "sr1": 20}), each value of `kind`;
    the denoiser names are checked against the artifact by `Pipeline.check`."""
    scalar = TypeAdapter(kind)

    def check(value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            return _strict(value)
        if not all(isinstance(name, str) for name in value):
            raise ValueError("per-denoiser settings are keyed by denoiser name")
        return {name: _strict(v, f"{name!r}: ") for name, v in value.items()}

    def _strict(value: object, where: str = "") -> object:
        try:
            return scalar.validate_python(value, strict=True)
        except ValidationError as e:
            got = f", got {value!r}" if where else ""
            raise ValueError(f"{where}{e.errors()[0]['msg']}{got}") from None

    return BeforeValidator(check)


def _utf8(text: str) -> str:
    """Refuse text that is not valid Unicode (e.g. a command-line argument of invalid UTF-8 bytes, which Python
    keeps as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"is not valid UTF-8 text (byte 0x{bad.hex()} at character {e.start})") from None
    return text


Prompt = Annotated[str, AfterValidator(_utf8)]


class Request(BaseModel):
    """One generation: conditioning, seed, sampling settings, length and first frame. All optional settings
    default to the artifact's (manifest schedule, one clip)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: Prompt | None = None  # text-to-video artifacts
    class_id: ClassId | None = None  # class-conditional artifacts
    seed: Seed = 0  # seeds every noise draw
    steps: Annotated[Any, _one_or_per_denoiser(Steps)] = None  # int, or {denoiser: int}
    guidance: Annotated[Any, _one_or_per_denoiser(Guidance)] = None  # float, or {denoiser: float}
    frames: Frames | None = None  # video length; default one clip
    image: str | None = None  # path of the first frame (image-to-video)

    @classmethod
    def parse(cls, **values: object) -> Request:
        """A Request of keyword values (None: the default), or RequestError naming each bad field."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise RequestError(describe_validation(e)) from None


def check_setting(kind: object, value: Any, what: str) -> Any:
    """`value` checked strictly as `kind` (one of the annotated types above), for a library argument the CLIs
    check with `parse_as`; UsageError "`what`: the problem (got value)" otherwise."""
    try:
        return TypeAdapter(kind).validate_python(value, strict=True)
    except ValidationError as e:
        raise UsageError(f"{what}: {describe_validation(e)}") from None


def parse_as(kind: object) -> Callable[[str], Any]:
    """An argparse `type=` parsing a command-line string as `kind` (one of the annotated types above), so a value
    out of range is reported as argparse reports a bad type: "argument --seed: expected ..., got '-1'"."""
    adapter = TypeAdapter(kind)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_strings(text)
        except ValidationError as e:
            raise argparse.ArgumentTypeError(f"{e.errors()[0]['msg'].lower()}, got {text!r}") from None

    return parse
