"""The walt-export runtime: runs an exported cascade without PyTorch (numpy, pydantic; PyAV and onnxruntime lazily).

    from runtime import Pipeline
    with Pipeline.from_artifacts("artifacts/tiny") as pipeline:
        pipeline.generate("a corgi surfing", seed=0).save("corgi.mp4")

Nothing under `runtime/` imports torch.
"""

from runtime.manifest import ArtifactError, Manifest, read_manifest
from runtime.pipeline import Pipeline, Video

__all__ = ["ArtifactError", "Manifest", "Pipeline", "Video", "read_manifest"]
