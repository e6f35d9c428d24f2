"""The artifact directory's `manifest.json`: the typed contract between the exporter and the runtime.

The exporter writes it through these pydantic models; the runtime and calibration read only its typed fields (names,
dtypes and shapes of every stage, files, the precision policy, what each denoiser samples, the latent geometry and
statistics, the schedule) and never guess (docs/architecture.md §2). `Manifest.config` is the exporter's own record
of the full config, read only by `walt_export` (to rebuild the PyTorch reference). An artifact is refused, with a
message saying what to run instead, when its format version is not this one or a file's sha256 does not match.
Every path it names is relative to the artifact directory (`RelativePath`) and must still lie inside it once symlinks
are resolved (`artifact_path`); `Manifest.check_files` hashes every file it lists, tokenizer files included.

Version 2 (this one) added the typed per-stage fields (`StageInfo.precision`, `StageInfo.denoiser`), the tokenizer's
factors (`LatentInfo`), a typed schedule and source; a version-1 artifact is refused with its re-export command.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from runtime.documents import read_model
from runtime.errors import WaltExportError

FORMAT = "walt-export-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"

Precision = Literal["fp32", "fp16", "int8"]
Variant = Literal["canonical", "plugin", "fallback", "attention"]
_DIM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_]\w*)(?:\s*([+-])\s*(\d+))?$")  # 'name', '4*name', '4*name - 3'


class ArtifactError(WaltExportError, RuntimeError):
    """An artifact directory that cannot be used; the message says what is wrong and what to do."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _relative_path(value: str) -> str:
    """`value` when it is a '/'-separated relative path with no empty, '..' or backslash part; else ValueError."""
    if value.startswith("/") or "\\" in value or "\0" in value or any(p in ("", "..") for p in value.split("/")):
        raise ValueError("must be a relative path inside the artifact directory (no leading '/', no '..' or empty "
                         "part, no backslash)")
    return value


RelativePath = Annotated[str, AfterValidator(_relative_path)]  # a path the manifest names, relative to its directory


class TensorInfo(_Schema):
    name: str
    dtype: Literal["float32", "float16", "int64"]
    shape: tuple[int | str, ...]  # ints are fixed; strings name dynamic dims ('batch', '4*latent_frames - 3')

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, dims) for d in self.shape)


class DataFile(_Schema):
    file: RelativePath  # relative to the artifact directory: a model's external data, or a tokenizer file
    sha256: str


class ModelFile(_Schema):
    file: RelativePath  # relative to the artifact directory
    sha256: str
    precision: Precision  # of the weights and the compute; inputs and outputs keep the stage's dtypes
    variant: Variant  # canonical: wattn nodes + function body; plugin: no body (TensorRT plugin); fallback: inlined;
    # attention: inlined with the ONNX Attention operator (opset 23)
    external_data: tuple[DataFile, ...] = ()
    window_attention_nodes: int = 0


class PrecisionPolicy(_Schema):
    """Which precisions a stage may run in, and which runs when another is requested (docs/architecture.md §5).

    Decided once, by the exporter (`walt_export.export_specs`), and read by the runtime, `walt-export engines` and
    `walt-export calibrate`: the text encoder is allowed FP32 only, on every backend (T5 overflows in FP16, the fault
    of diffusers#8604, and it is not quantized).
    """

    allowed: tuple[Precision, ...]  # what the stage may run in; FP16/INT8 files exist only for these
    fallback: Precision = "fp32"  # what runs when a precision outside `allowed` is requested
    reason: str = ""  # why a precision is not allowed (for messages and readers of the manifest)

    def resolve(self, requested: Precision) -> Precision:
        """The precision this stage runs in when `requested` is asked for."""
        return requested if requested in self.allowed else self.fallback


class DenoiserInfo(_Schema):
    """What the cascade needs to sample with one denoiser (base, sr1, sr2)."""

    latent_channels: int  # c
    latent_size: tuple[int, int, int]  # (t, h, w) of the latent it denoises
    conditioning: Literal["text", "class", "none"]
    num_classes: int | None = None  # class conditioning: ids 0 .. num_classes - 1
    null_class: int | None = None  # the class id of the unconditional half of classifier-free guidance
    noise_aug_level: float | None = None  # SR: the low-res latent is noised to this fraction of the schedule


class StageInfo(_Schema):
    """One exported model ("stage"), its files, its precision policy and, for a denoiser, what it samples."""

    module: str  # the part of the PyTorch cascade it was exported from
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    profile: dict[str, tuple[int, int, int]]  # dynamic dim -> (min, opt, max) for TensorRT
    files: tuple[ModelFile, ...]
    precision: PrecisionPolicy
    denoiser: DenoiserInfo | None = None  # base, sr1, sr2 only

    @property
    def precisions(self) -> set[str]:
        """The precisions this stage has files of."""
        return {f.precision for f in self.files}

    @property
    def has_window_attention(self) -> bool:
        """Whether its files hold `wattn` nodes (then they come in canonical, plugin and fallback variants)."""
        return any(f.window_attention_nodes for f in self.files)

    def file(self, precision: Precision = "fp32", variant: Variant = "canonical") -> ModelFile:
        for f in self.files:
            if f.precision == precision and f.variant == variant:
                return f
        have = ", ".join(f"{f.precision}/{f.variant}" for f in self.files)
        if precision in self.precisions:  # the precision is there, the variant is not: an older export
            how = (f"this artifact was exported before the {variant} variant existed: re-export it with "
                   "`walt-export onnx`")
        else:
            how = ("export it with `walt-export onnx ... --fp16` for FP16 files, or run `walt-export calibrate "
                   "--artifacts DIR` for INT8 files")
        raise ArtifactError(f"no {precision}/{variant} file for {self.module} (this artifact has: {have}); {how}")


def rows_per_video(stage: StageInfo, guided: bool) -> int:
    """Batch rows one video takes in a stage: 2 in a denoiser with classifier-free guidance (its conditional and
    unconditional rows, one call) and always in the text encoder (the prompt and the empty prompt); else 1."""
    return 2 if stage.module == "text_encoder" or (guided and stage.denoiser is not None) else 1


class LatentInfo(_Schema):
    """The tokenizer's latent of one clip, and how video frames and pixels map to it."""

    channels: int
    frames: int
    height: int
    width: int
    mean: tuple[float, ...] | None  # per-channel normalisation of the tokenizer's latent; None = identity
    std: tuple[float, ...] | None
    temporal_factor: int  # 1 + f (t - 1) frames <-> t latent frames (docs/model_spec.md §2)
    spatial_factor: int  # pixels per latent pixel along H and W


class TextInfo(_Schema):
    max_length: int
    tokenizer_dir: RelativePath | None  # the pretrained tokenizer copied into the artifact; None = byte tokenizer
    tokenizer_files: tuple[DataFile, ...] = ()  # every file of tokenizer_dir ('tokenizer/tokenizer.json') + sha256

    @model_validator(mode="after")
    def _tokenizer_files_are_in_its_directory(self) -> TextInfo:
        if self.tokenizer_dir is None and self.tokenizer_files:
            raise ValueError("tokenizer_files are listed without a tokenizer_dir")
        if self.tokenizer_dir is not None and not self.tokenizer_files:
            raise ValueError(f"tokenizer_dir {self.tokenizer_dir!r} needs tokenizer_files (each file and its sha256)")
        elsewhere = [f.file for f in self.tokenizer_files
                     if PurePosixPath(f.file).parent != PurePosixPath(self.tokenizer_dir)]
        if elsewhere:
            raise ValueError(f"tokenizer_files {elsewhere} are not in tokenizer_dir {self.tokenizer_dir!r}")
        return self


class ScheduleInfo(_Schema):
    """The diffusion schedule the denoisers were trained on and the sampling defaults (docs/model_spec.md §4).

    The exporter's `DiffusionConfig`, as the runtime reads it; the literals are what the runtime's sampler does.
    """

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: Literal["linear"]
    rescale_zero_terminal_snr: bool
    prediction_type: Literal["v"]
    timestep_spacing: Literal["trailing"]
    num_inference_steps: int  # default DDIM steps per denoiser
    guidance_scale: float  # default classifier-free guidance scale


class SourceInfo(_Schema):
    """Where the exported weights came from: a preset and seed, or a checkpoint and its sha256."""

    preset: str | None = None
    seed: int | None = None
    checkpoint: str | None = None
    sha256: str | None = None

    def export_command(self, out: str | Path, fp16: bool = False) -> str:
        """The `walt-export onnx` command that exports these weights into `out` again."""
        if self.checkpoint is not None:
            source = f"--checkpoint {self.checkpoint}"
        elif self.preset is not None:
            source = f"--preset {self.preset} --seed {self.seed or 0}"
        else:
            source = "--preset NAME"
        return f"walt-export onnx {source} --out {out}{' --fp16' if fp16 else ''}"


class Manifest(_Schema):
    format: Literal["walt-export-artifact"] = FORMAT
    format_version: Literal[2] = FORMAT_VERSION
    name: str  # the preset or checkpoint's cascade name
    source: SourceInfo
    config: dict  # the exporter's record of the full CascadeConfig; only walt_export reads it
    frames: int
    height: int
    width: int
    fps: float
    latent: LatentInfo
    text: TextInfo | None
    schedule: ScheduleInfo
    trained_on: Literal["world"] | None = None  # "world": trained on runtime.world, whose captions are its prompts
    stages: dict[str, StageInfo]  # in pipeline order
    opset: int
    exporter: dict[str, str]  # package -> version

    @property
    def precisions(self) -> set[str]:
        """The precisions any stage has files of."""
        return set().union(*(stage.precisions for stage in self.stages.values()))

    def require_files(self, precision: Precision, directory: str | Path, why: str = "") -> None:
        """ArtifactError naming the command that makes them, unless the artifact has files of `precision`.

        Args:
            directory: the artifact's directory (named in the command).
            why: what needs them, added to the message.
        """
        if precision in self.precisions:
            return
        how = {"fp16": f"re-export it with `{self.source.export_command(directory, fp16=True)}`",
               "int8": f"calibrate it with `walt-export calibrate --artifacts {directory}`"}.get(precision, "")
        raise ArtifactError(f"{directory} has no {precision} files{why}; {how}")

    @property
    def denoisers(self) -> dict[str, DenoiserInfo]:
        """The denoisers (base, sr1, sr2 where present), in sampling order."""
        return {name: stage.denoiser for name, stage in self.stages.items() if stage.denoiser is not None}

    def stage(self, name: str) -> StageInfo:
        if name not in self.stages:
            raise ArtifactError(f"this artifact has no stage {name!r}; stages: {', '.join(self.stages)}")
        return self.stages[name]

    def check_files(self, directory: str | Path) -> dict[str, Path]:
        """Check every file this manifest lists (all stages, precisions and variants, their external data, the
        tokenizer's files) with `check_file`; each distinct file is hashed once.

        Returns:
            model file as the manifest names it ('base.plugin.onnx', 'int8/base.onnx') -> its checked path.
        Raises ArtifactError naming the first file that lies outside `directory`, is missing or was modified.
        """
        models = [model for stage in self.stages.values() for model in stage.files]
        files = {(f.file, f.sha256): f for model in models
                 for f in (DataFile(file=model.file, sha256=model.sha256), *model.external_data)}
        paths = {name: check_file(directory, f) for (name, _), f in files.items()}
        self.check_tokenizer(directory)
        return {model.file: paths[model.file] for model in models}

    def check_tokenizer(self, directory: str | Path) -> Path | None:
        """The artifact's tokenizer directory (`directory / text.tokenizer_dir`) after checking that it lies inside
        `directory`, holds only the files `text.tokenizer_files` lists, and that each matches its sha256; None
        when the artifact uses the byte tokenizer or has no text encoder.

        Raises ArtifactError naming the file that lies outside, is missing, modified, or not listed.
        """
        text = self.text
        if text is None or text.tokenizer_dir is None:
            return None
        tokenizer = artifact_path(directory, text.tokenizer_dir)
        listed = {PurePosixPath(f.file).name for f in text.tokenizer_files}
        unlisted = sorted(p.name for p in tokenizer.iterdir() if p.name not in listed) if tokenizer.is_dir() else []
        if unlisted:
            raise ArtifactError(f"{tokenizer} holds files its manifest does not list ({', '.join(unlisted)}), so their "
                                "sha256 cannot be checked; remove them or re-export the artifact")
        for f in text.tokenizer_files:
            check_file(directory, f)
        return tokenizer


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
    """Parse and validate `DIR/manifest.json` (format and version checked); files are not hashed here.

    Raises ArtifactError when it is missing, unreadable, of another format version (the message gives the
    `walt-export onnx` command that re-exports the same weights) or does not match the schema.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an artifact directory (no {MANIFEST}); "
                            "create one with `walt-export onnx --preset NAME --out DIR`")

    def redo(document: dict) -> str:
        return f"re-export it with this version of walt-export: `{_reexport_command(document, directory)}`"

    return read_model(path, Manifest, FORMAT, FORMAT_VERSION, ArtifactError, redo)


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write `DIR/manifest.json` (atomically: a reader sees the old or the new one, never half of one)."""
    from runtime.files import atomic_output

    path = Path(directory) / MANIFEST
    with atomic_output(path) as tmp:
        tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def read_identity(directory: str | Path) -> tuple[str, SourceInfo] | None:
    """(name, source) of the artifact in `directory`, of any format version; None when there is no readable one.

    Lets the exporter replace an artifact of an older version with the same weights.
    """
    try:
        document = json.loads((Path(directory) / MANIFEST).read_text())
        return document["name"], SourceInfo.model_validate(document["source"])
    except (OSError, ValueError, KeyError, TypeError):  # absent, not JSON, or not a manifest
        return None


def _reexport_command(document: dict, directory: str | Path) -> str:
    """The `walt-export onnx` command for the weights a (possibly old) manifest document names."""
    try:
        source = SourceInfo.model_validate(document.get("source") or {})
    except ValidationError:
        source = SourceInfo()
    stages = document.get("stages") if isinstance(document.get("stages"), dict) else {}
    fp16 = any(isinstance(f, dict) and f.get("precision") == "fp16"
               for stage in stages.values() if isinstance(stage, dict) for f in stage.get("files", ()))
    return source.export_command(directory, fp16)


def artifact_path(directory: str | Path, name: str) -> Path:
    """`directory / name` after checking that it lies inside `directory` once symlinks are resolved (it need not
    exist).

    Raises ArtifactError when it resolves outside (a symlink, or a path the schema did not check).
    """
    directory = Path(directory)
    path = directory / name
    real = path.resolve()
    if not real.is_relative_to(directory.resolve()):
        raise ArtifactError(f"{path} resolves outside {directory} (to {real}); the artifact is refused: the files "
                            "an artifact names must lie inside its directory (replace the link by the file itself, or "
                            "re-export the artifact)")
    return path


def check_file(directory: str | Path, entry: ModelFile | DataFile, hashed: bool = True) -> Path:
    """`directory / entry.file` after checking that it and, for a model, its external data lie inside `directory`
    (`artifact_path`), exist and (`hashed`) match their sha256.

    Raises ArtifactError naming the file that resolves outside the directory, is missing, or was modified.
    """
    directory = Path(directory)
    for f in (entry, *(entry.external_data if isinstance(entry, ModelFile) else ())):
        path = artifact_path(directory, f.file)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; re-export the artifact (`walt-export onnx ...`)")
        actual = sha256_of(path) if hashed else f.sha256
        if actual != f.sha256:
            raise ArtifactError(f"{path} does not match the manifest (sha256 {actual[:12]}..., expected "
                                f"{f.sha256[:12]}...): the file was modified or truncated; re-export the artifact")
    return directory / entry.file
