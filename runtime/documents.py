"""Versioned JSON documents (the artifact manifest, the engine registry, checkpoint configs): read, and check
format and version."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from runtime.errors import describe_validation

Document = TypeVar("Document", bound=BaseModel)


def read_document(path: Path, fmt: str, version: int, error: type[Exception],
                  redo: str | Callable[[dict], str]) -> dict:
    """The JSON object in `path` after checking its "format" and "format_version".

    Raises `error` with a message that ends in `redo` (what to run instead; a function of the document where the
    command depends on it) when the file is not valid JSON, is another kind of document, or has another format
    version.
    """
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not readable JSON ({e}); {_instead(redo, None)}") from None
    if not isinstance(document, dict) or document.get("format") != fmt:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise error(f"{path} is not a {fmt} document (format {found!r}); {_instead(redo, document)}")
    if document.get("format_version") != version:
        raise error(f"{path} has format version {document.get('format_version')}, this version of walt-export "
                    f"reads version {version}; {_instead(redo, document)}")
    return document


def read_model(path: Path, schema: type[Document], fmt: str, version: int, error: type[Exception],
               redo: str | Callable[[dict], str]) -> Document:
    """`read_document`, then validated as `schema`; `error` naming the first problems when it does not match."""
    document = read_document(path, fmt, version, error, redo)
    try:
        return schema.model_validate(document)
    except ValidationError as e:
        raise error(f"{path} does not match the {fmt} schema: {describe_validation(e)}; "
                    f"{_instead(redo, document)}") from None


def _instead(redo: str | Callable[[dict], str], document: object) -> str:
    """What to run instead: `redo` itself, or `redo` of the document (of {} when it is not a JSON object)."""
    return redo if isinstance(redo, str) else redo(document if isinstance(document, dict) else {})
