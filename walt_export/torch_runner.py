"""The PyTorch reference runner: the modules an artifact was exported from, behind the runner protocol, so the
runtime's cascade and every exported file can be checked against PyTorch.

    with torch_pipeline("artifacts/tiny") as pipeline:      # the same Pipeline, PyTorch modules as runners
        video = pipeline.generate("a corgi", seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.manifest import ArtifactError, Manifest, read_manifest, sha256_of
from runtime.pipeline import Pipeline
from walt_export.cascade import build_component
from walt_export.config import CascadeConfig
from walt_export.export_specs import ExportSpec, export_specs


class TorchRunner:
    """Runs `spec.call(module, *inputs)` on float32 CPU tensors; feeds and outputs keyed by the spec's names."""

    def __init__(self, module: nn.Module, spec: ExportSpec):
        self.module, self.spec = module.eval(), spec

    def __enter__(self) -> TorchRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @torch.no_grad()
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [t.name for t in self.spec.inputs if t.name not in feeds]
        if missing:
            raise ValueError(f"{self.spec.name} needs the inputs {missing}; got {sorted(feeds)}")
        # copies: the pipeline marks the feeds that stay the same every step read-only, which torch warns about
        inputs = [torch.from_numpy(np.array(feeds[t.name])) for t in self.spec.inputs]
        outputs = self.spec.call(self.module, *inputs)
        return {t.name: out.numpy() for t, out in zip(self.spec.outputs, outputs, strict=True)}


def reference_components(manifest: Manifest, checkpoint: str | Path | None = None
                         ) -> tuple[CascadeConfig, Callable[[str], nn.Module | None]]:
    """(config, component name -> PyTorch module) of the cascade an artifact was exported from.

    From its checkpoint (sha256 checked; `checkpoint` overrides the recorded path when it moved) or its preset
    config and seed (then one component is built per call). Raises ArtifactError when the checkpoint is missing or
    is not the one the artifact was exported from.
    """
    source = manifest.source
    if source.checkpoint is not None or checkpoint is not None:
        from walt_export.checkpoint import load

        path = Path(checkpoint or source.checkpoint)
        if not path.is_file():
            raise ArtifactError(f"the artifact was exported from {path}, which is missing; pass --checkpoint PATH")
        if source.sha256 and sha256_of(path) != source.sha256:
            raise ArtifactError(f"{path} is not the checkpoint this artifact was exported from (sha256 differs)")
        cascade = load(path)
        return cascade.config, lambda name: getattr(cascade, name)
    cfg = CascadeConfig.model_validate(manifest.config)
    return cfg, lambda name: build_component(cfg, name, seed=source.seed or 0)


def torch_pipeline(directory: str | Path, checkpoint: str | Path | None = None) -> Pipeline:
    """A `Pipeline` over an artifact whose runners are the PyTorch modules it was exported from."""
    manifest = read_manifest(directory)
    cfg, components = reference_components(manifest, checkpoint)
    specs = export_specs(cfg)
    component = cache(components)

    def runner_for(name: str) -> TorchRunner:
        spec = specs[name]
        return TorchRunner(spec.module_of(component(spec.component)), spec)

    return Pipeline(manifest, runner_for, directory, backend="torch", precision="fp32")
