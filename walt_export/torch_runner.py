"""The PyTorch reference behind the runner protocol, so the runtime's cascade can be checked end to end.

    with torch_pipeline("artifacts/tiny") as pipeline:      # the same Pipeline, PyTorch modules as runners
        video = pipeline.generate("a corgi", seed=0)
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline
from walt_export.export_specs import ExportSpec, export_specs
from walt_export.verify import reference_components


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
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in self.spec.inputs]
        outputs = self.spec.call(self.module, *inputs)
        return {t.name: out.numpy() for t, out in zip(self.spec.outputs, outputs)}


def torch_pipeline(directory: str | Path, checkpoint: str | Path | None = None) -> Pipeline:
    """A `Pipeline` over an artifact whose runners are the PyTorch modules it was exported from."""
    manifest = read_manifest(directory)
    cfg, components = reference_components(manifest, checkpoint)
    specs = export_specs(cfg)
    component = cache(components)

    def runner_for(name: str) -> TorchRunner:
        spec = specs[name]
        return TorchRunner(spec.module_of(component(spec.component)), spec)

    return Pipeline(manifest, runner_for, directory)
