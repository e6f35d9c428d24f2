"""Versioned JSON documents (the artifact manifest, checkpoint configs): read, and check format and version."""

from __future__ import annotations

import json
from pathlib import Path


def read_document(path: Path, fmt: str, version: int, error: type[Exception], redo: str) -> dict:
    """The JSON object in `path` after checking its "format" and "format_version".

    Raises `error` with a message that ends in `redo` (what to run instead) when the file is not valid JSON,
    is another kind of document, or has another format version.
    """
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not readable JSON ({e}); {redo}") from None
    if not isinstance(document, dict) or document.get("format") != fmt:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise error(f"{path} is not a {fmt} document (format {found!r}); {redo}")
    if document.get("format_version") != version:
        raise error(f"{path} has format version {document.get('format_version')}, this version of walt-export "
                    f"reads version {version}; {redo}")
    return document
