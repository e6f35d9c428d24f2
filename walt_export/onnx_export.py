"""ONNX export of a whole cascade into an artifact directory (docs/architecture.md §2, §5).

    DIR/manifest.json                       names, dtypes, shapes, files + sha256, latent stats, schedule, versions
    DIR/<model>.onnx                        canonical: `wattn::WindowAttention3D` nodes + their function body
    DIR/<model>.plugin.onnx                 (denoisers) body stripped: TensorRT uses the plugin
    DIR/<model>.fallback.onnx               (denoisers) body inlined: no custom op
    DIR/<model>.fp16[.plugin|.fallback].onnx    with --fp16, for stages whose precision policy allows FP16:
                                            float16 weights and compute, float32 inputs/outputs
    DIR/tokenizer/                          the text tokenizer's files, for a pretrained T5

Models come from `export_specs` (names, dynamic dims, precision policy, denoiser facts), which the manifest records.
A model larger than `EXTERNAL_DATA_BYTES` keeps its weights in `<file>.data` beside it (ONNX's protobuf limit is 2
GB); its plugin and fallback variants share that file. Everything is written into a temporary directory beside `DIR`
and renamed onto it when complete.
"""

from __future__ import annotations

import gc
import importlib.metadata
import itertools
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

from runtime.files import artifact_lock, check_output, remove_staging, replace_directory, staging_directory
from runtime.manifest import (
    ArtifactError,
    DataFile,
    LatentInfo,
    Manifest,
    ModelFile,
    ScheduleInfo,
    SourceInfo,
    StageInfo,
    TextInfo,
    parse_dim,
    read_identity,
    sha256_of,
    write_manifest,
)
from walt_export.config import CascadeConfig
from walt_export.export_specs import ExportSpec, export_specs
from walt_export.onnx_files import save_model
from walt_export.onnx_fp16 import write_fp16_files
from walt_export.window_attention.onnx_contract import (
    check_model,
    onnx_function,
    register_onnx_schema,
    window_attention_nodes,
    write_attention_variants,
)
from walt_export.window_attention.op import onnx_translation

log = logging.getLogger(__name__)

OPSET = 20  # default-domain opset of every model (and of the wattn function bodies)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to external data (ONNX's hard limit is 2 GB)
SAMPLE_SEED = 0  # seed of the sample inputs traced by the exporter
_TRACE_KEYS = {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}
DERIVED = ("engines", "int8", "verify.json")  # what later commands add to an artifact directory


def export_model(module: torch.nn.Module, spec: ExportSpec, path: Path,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> onnx.ModelProto:
    """Export `module` as `spec` to `path` (canonical: wattn nodes + function body) and return the model.

    The returned proto has no weights in memory when they went to external data (`path.name + '.data'`).
    """
    register_onnx_schema()
    wrapper = spec.wrap(module).eval()
    sample = spec.sample_inputs(torch.Generator().manual_seed(SAMPLE_SEED))
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > external_data_bytes
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            wrapper, sample, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=(_dynamic_shapes(spec),), custom_translation_table=onnx_translation(),
        )
    if external:
        program.save(str(path), external_data=True)
        del program
        model = onnx.load(str(path), load_external_data=False)
    else:
        model = program.model_proto
    _name_dims(model, spec)
    _drop_traces(model)
    nodes = window_attention_nodes(model)
    if nodes:
        arities = {len([i for i in n.input if i]) for n in nodes}
        if len(arities) != 1:
            raise ValueError(f"{spec.name}: window-attention nodes with and without a bias in one model")
        model.functions.append(onnx_function(OPSET, with_bias=arities == {4}))
    save_model(model, path)
    check_model(path)
    log.info("exported %s (%d wattn nodes) in %.1f s", path.name, len(nodes), time.perf_counter() - start)
    return model


def _dynamic_shapes(spec: ExportSpec) -> tuple[dict[int, object], ...]:
    """torch.export dims of the positional inputs (the wrapper takes *inputs) for every named dim ('4*latent_frames - 3' becomes 4 * Dim - 3)."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for tensor in spec.inputs:
        axes = {}
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                factor, name, offset = parse_dim(dim)
                if name not in dims:
                    low, _, high = spec.profile[name]
                    dims[name] = torch.export.Dim(name, min=low, max=max(high, 4096))
                axes[axis] = dims[name] if (factor, offset) == (1, 0) else factor * dims[name] + offset
        shapes.append(axes)
    return tuple(shapes)


def _name_dims(model: onnx.ModelProto, spec: ExportSpec) -> None:
    """Write the spec's dims onto the graph's inputs and outputs (the exporter's own names are s0, s1, ...)."""
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            raise ValueError(f"{spec.name}: exported {names}, the spec says {[t.name for t in tensors]}")
        for value, tensor in zip(values, tensors, strict=True):
            dims = value.type.tensor_type.shape.dim
            if len(dims) != len(tensor.shape):
                raise ValueError(f"{spec.name}.{tensor.name}: exported rank {len(dims)}, the spec says {tensor.shape}")
            for dim, want in zip(dims, tensor.shape, strict=True):
                if isinstance(want, int):
                    if dim.HasField("dim_value") and dim.dim_value != want:
                        raise ValueError(f"{spec.name}.{tensor.name}: exported {dim.dim_value}, the spec says {want}")
                    dim.dim_value = want
                else:
                    dim.dim_param = want


def _drop_traces(model: onnx.ModelProto) -> None:
    """Remove the exporter's per-node Python stack traces and FX dumps (local paths, half the graph's bytes);
    the module name scopes stay."""
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _TRACE_KEYS]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def write_variants(spec: ExportSpec, canonical: onnx.ModelProto, directory: Path, fp16: bool) -> list[ModelFile]:
    """Write the derived variants of a canonical model already saved in `directory`; returns every file's entry.

    FP16 files are written when `fp16` is set and the stage's precision policy allows FP16.
    """
    hashes: dict[str, str] = {}  # data file -> sha256: the plugin and fallback variants share their canonical's
    files = write_attention_variants(canonical, directory / f"{spec.name}.onnx", "fp32", hashes)
    if fp16 and "fp16" in spec.precision.allowed:
        files += write_fp16_files(spec.name, canonical, directory, hashes=hashes)
    return files


# ---------------------------------------------------------------------------------------------------- artifacts
def export_artifacts(cfg: CascadeConfig, components: Callable[[str], nn.Module | None], out: str | Path,
                     source: SourceInfo | dict, fp16: bool = False,
                     external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Manifest:
    """Export every model of a cascade into the artifact directory `out` and return its manifest.

    Args:
        cfg: the cascade's config.
        components: name (`cascade.COMPONENTS`) -> the PyTorch module, eval mode, CPU. Called once per component,
            which is released before the next, so a cascade larger than memory exports one part at a time.
        out: the artifact directory; it must not exist, be empty, or hold an artifact of the same source.
        source: where the weights came from ({"preset": name, "seed": n} or {"checkpoint": path, "sha256": h});
            `verify` rebuilds the reference from it.
        fp16: also write FP16 variants of every stage whose precision policy allows FP16.
    """
    out = Path(out)
    source = SourceInfo.model_validate(source)
    specs = export_specs(cfg)
    with _staging(out, cfg.name, source) as tmp:
        stages = {}
        for component, group in itertools.groupby(specs.values(), key=lambda spec: spec.component):
            group = list(group)
            module = components(component)
            canonical = {spec.name: export_model(spec.module_of(module), spec, tmp / f"{spec.name}.onnx",
                                                 external_data_bytes) for spec in group}
            del module  # the variants are ONNX transformations: free the weights first
            gc.collect()
            for spec in group:
                stages[spec.name] = StageInfo(
                    module=spec.module, inputs=spec.inputs, outputs=spec.outputs, profile=spec.profile,
                    files=tuple(write_variants(spec, canonical.pop(spec.name), tmp, fp16)),
                    precision=spec.precision, denoiser=spec.denoiser,
                )
        manifest = _manifest(cfg, source, stages, tmp)
        write_manifest(tmp, manifest)
    log.info("wrote %s: %s", out, ", ".join(stages))
    return manifest


def _manifest(cfg: CascadeConfig, source: SourceInfo, stages: dict[str, StageInfo], directory: Path) -> Manifest:
    tk, te = cfg.tokenizer, cfg.text_encoder
    c, t, h, w = tk.latent_shape(cfg.frames, cfg.height, cfg.width)
    text = None
    if te is not None:
        tokenizer_dir, tokenizer_files = None, []
        if te.pretrained_dir is not None:
            tokenizer_dir = "tokenizer"
            (directory / tokenizer_dir).mkdir()
            for name in ("tokenizer.json", "spiece.model"):
                if (Path(te.pretrained_dir) / name).is_file():
                    file = f"{tokenizer_dir}/{name}"
                    shutil.copy2(Path(te.pretrained_dir) / name, directory / file)
                    tokenizer_files.append(DataFile(file=file, sha256=sha256_of(directory / file)))
            if not tokenizer_files:
                raise ArtifactError(f"{te.pretrained_dir} has no tokenizer.json or spiece.model; copy the T5 "
                                    "checkpoint's tokenizer files beside its weights")
        text = TextInfo(max_length=te.max_length, tokenizer_dir=tokenizer_dir, tokenizer_files=tuple(tokenizer_files))
    return Manifest(
        name=cfg.name, source=source, config=cfg.model_dump(mode="json"),
        frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps,
        latent=LatentInfo(channels=c, frames=t, height=h, width=w, mean=tk.latent_mean, std=tk.latent_std,
                          temporal_factor=tk.temporal_factor, spatial_factor=tk.spatial_factor),
        text=text, schedule=ScheduleInfo(**cfg.diffusion.model_dump()), trained_on=cfg.trained_on, stages=stages,
        opset=OPSET,
        exporter={name: _version(name) for name in ("walt-export", "torch", "onnx", "onnxscript", "onnxruntime")},
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@contextmanager
def _staging(out: Path, name: str, source: SourceInfo) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed onto it when the block succeeds, removed when it fails.

    `out` may be new, empty, or hold an artifact (of any format version) of the same weights, which is replaced.
    Held under the artifact's lock (one writer at a time; BusyError otherwise), which also makes the staging
    directories of a killed export (`.NAME.*.tmp`) safe to remove first.
    """
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"{out} is a file; pass a directory path as --out")
        existing = read_identity(out)
        if existing is not None:
            if existing != (name, source):
                other = ", ".join(f"{k}={v}" for k, v in existing[1].model_dump(exclude_none=True).items())
                raise ArtifactError(f"{out} already holds another artifact ({existing[0]}, {other}); "
                                    "pass a new --out directory or delete that one first")
            derived = sorted(p.name for p in out.iterdir() if p.name in DERIVED)
            if derived:  # they belong to the files being replaced
                log.warning("re-exporting %s replaces it as a whole: %s will be gone (rebuild with `walt-export "
                            "verify`, `calibrate`, `engines`)", out, ", ".join(derived))
        elif any(out.iterdir()):
            raise ArtifactError(f"{out} exists and is not an artifact directory; pass a new or empty --out directory")
    check_output(out, "--out", "directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(out):
        remove_staging(out)
        tmp = staging_directory(out)
        try:
            yield tmp
            replace_directory(tmp, out)  # an empty directory or the same artifact is replaced as a whole
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
