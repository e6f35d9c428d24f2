"""The artifact directory's `manifest.json`: its pydantic schema, reading with checks, and shape helpers.

The runtime reads everything from here (names, dtypes, shapes, latent statistics, the schedule) and never guesses;
the exporter writes the manifest through the same models. An artifact is refused, with a message saying what to
run instead, when its format version is not this one or a file's sha256 does not match.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from runtime.documents import read_document

FORMAT = "walt-export-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Precision = Literal["fp32", "fp16", "int8"]
Variant = Literal["canonical", "plugin", "fallback"]
_DIM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_]\w*)(?:\s*([+-])\s*(\d+))?$")  # 'name', '4*name', '4*name - 3'


class ArtifactError(RuntimeError):
    """An artifact directory that cannot be used; the message says what is wrong and what to do."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorInfo(_Schema):
    name: str
    dtype: Literal["float32", "float16", "int64"]
    shape: tuple[int | str, ...]  # ints are fixed; strings name dynamic dims ('batch', '4*latent_frames - 3')

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, dims) for d in self.shape)


class DataFile(_Schema):
    file: str  # external data beside the model
    sha256: str


class ModelFile(_Schema):
    file: str  # relative to the artifact directory
    sha256: str
    precision: Precision  # of the weights and the compute; inputs and outputs keep the stage's dtypes
    variant: Variant  # canonical: wattn nodes + function body; plugin: no body (TensorRT plugin); fallback: inlined
    external_data: tuple[DataFile, ...] = ()
    window_attention_nodes: int = 0


class StageInfo(_Schema):
    """One exported model and its files."""

    module: str  # the part of the PyTorch cascade it was exported from
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    profile: dict[str, tuple[int, int, int]]  # dynamic dim -> (min, opt, max) for TensorRT
    files: tuple[ModelFile, ...]

    @property
    def precisions(self) -> set[str]:
        """The precisions this stage has files of."""
        return {f.precision for f in self.files}

    def file(self, precision: Precision = "fp32", variant: Variant = "canonical") -> ModelFile:
        for f in self.files:
            if f.precision == precision and f.variant == variant:
                return f
        have = ", ".join(f"{f.precision}/{f.variant}" for f in self.files)
        raise ArtifactError(f"no {precision}/{variant} file for {self.module} (this artifact has: {have}); "
                            "export it with `walt-export onnx ... --fp16` for FP16 files, or run "
                            "`walt-export calibrate --artifacts DIR` for INT8 files")


class LatentInfo(_Schema):
    channels: int
    frames: int
    height: int
    width: int
    mean: tuple[float, ...] | None  # per-channel normalisation of the tokenizer's latent; None = identity
    std: tuple[float, ...] | None


class TextInfo(_Schema):
    max_length: int
    tokenizer_dir: str | None  # the pretrained tokenizer copied into the artifact; None = byte tokenizer


class Manifest(_Schema):
    format: Literal["walt-export-artifact"] = FORMAT
    format_version: int = FORMAT_VERSION
    name: str  # the preset or checkpoint's cascade name
    source: dict[str, str | int | None]  # preset + seed, or checkpoint path + sha256
    config: dict  # the full CascadeConfig as JSON
    frames: int
    height: int
    width: int
    fps: float
    latent: LatentInfo
    text: TextInfo | None
    schedule: dict  # the DiffusionConfig as JSON
    stages: dict[str, StageInfo]  # in pipeline order
    opset: int
    exporter: dict[str, str]  # package -> version

    @property
    def precisions(self) -> set[str]:
        """The precisions any stage has files of."""
        return set().union(*(stage.precisions for stage in self.stages.values()))

    def stage(self, name: str) -> StageInfo:
        if name not in self.stages:
            raise ArtifactError(f"this artifact has no stage {name!r}; stages: {', '.join(self.stages)}")
        return self.stages[name]


def parse_dim(dim: str) -> tuple[int, str, int]:
    """A named dim 'a*name + b' as (a, name, b): 'batch' -> (1, 'batch', 0), '4*t - 3' -> (4, 't', -3)."""
    match = _DIM.match(dim.strip())
    if match is None:
        raise ArtifactError(f"cannot read the dim {dim!r}; expected 'name', 'a*name' or 'a*name +/- b'")
    factor, name, sign, offset = match.groups()
    return int(factor or 1), name, (int(offset) if sign == "+" else -int(offset)) if offset else 0


def resolve_dim(dim: int | str, dims: dict[str, int]) -> int:
    """A fixed dim, or a named one ('batch', '4*latent_frames - 3') evaluated with `dims`."""
    if isinstance(dim, int):
        return dim
    factor, name, offset = parse_dim(dim)
    if name not in dims:
        raise ValueError(f"the dim {dim!r} needs a value for {name!r}")
    return factor * dims[name] + offset


def sha256_of(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and validate `DIR/manifest.json` (format and version checked); files are not hashed here."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an artifact directory (no {MANIFEST}); "
                            "create one with `walt-export onnx --preset NAME --out DIR`")
    data = read_document(path, FORMAT, FORMAT_VERSION, ArtifactError,
                         "re-export the artifact with this version of walt-export (`walt-export onnx ...`)")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise ArtifactError(f"{path} does not match the manifest schema: {problems}") from None


def check_file(directory: str | Path, model: ModelFile) -> Path:
    """The model's path after checking that it and its external data exist and match their sha256."""
    directory = Path(directory)
    for name, expected in [(model.file, model.sha256), *((d.file, d.sha256) for d in model.external_data)]:
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; re-export the artifact (`walt-export onnx ...`)")
        actual = sha256_of(path)
        if actual != expected:
            raise ArtifactError(f"{path} does not match the manifest (sha256 {actual[:12]}..., expected "
                                f"{expected[:12]}...): the file was modified or truncated; re-export the artifact")
    return directory / model.file
