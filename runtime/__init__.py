"""The walt-export runtime: runs an exported cascade without PyTorch (numpy, pydantic; PyAV and onnxruntime lazily).

    from runtime import Pipeline
    with Pipeline.from_artifacts("artifacts/tiny") as pipeline:
        pipeline.generate("a corgi surfing", seed=0).save("corgi.mp4")

Nothing under `runtime/` imports torch. The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.lazy_exports import lazy_exports

_EXPORTS = {
    "ArtifactError": "runtime.manifest", "Manifest": "runtime.manifest", "read_manifest": "runtime.manifest",
    "Pipeline": "runtime.pipeline", "Video": "runtime.pipeline", "WaltExportError": "runtime.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from runtime.errors import WaltExportError
    from runtime.manifest import ArtifactError, Manifest, read_manifest
    from runtime.pipeline import Pipeline, Video

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
