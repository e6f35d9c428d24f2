"""Saving ONNX files and listing their external data; onnx is imported when called, torch never (calibration
writes its files through here).

A model larger than protobuf's 2 GB limit keeps its weights in `<file>.data` beside it (ONNX external data); the
plugin and fallback variants of a model refer to their canonical's data file instead of copying it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def save_model(model: onnx.ModelProto, path: Path, data: str | None = None) -> None:
    """Save a model; `data` names a new external-data file for in-memory weights (existing references are kept)."""
    import onnx

    if data is not None:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def data_files(model: onnx.ModelProto) -> list[str]:
    """The external-data files a model's initializers refer to (relative to the model's directory)."""
    import onnx

    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)
