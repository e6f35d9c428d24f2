"""Prompt -> token ids for the text encoder, with numpy only (no torch), shared by exporter and runtime.

Two tokenizers: the byte-level one of the small presets (nothing to download, ByT5's id layout) and a
checkpoint's own tokenizer files (`tokenizer.json`, read with the `tokenizers` package, or SentencePiece's
`spiece.model`). Both return fixed-length `(ids, mask)` int64 arrays, padded with 0 and ending in end-of-sequence.
A prompt longer than the text encoder reads is cut, with a warning that shows the text kept.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.errors import import_optional
from runtime.manifest import ArtifactError

log = logging.getLogger(__name__)

_shown = reprlib.Repr()  # the kept text of a cut prompt, elided in the middle past 160 characters
_shown.maxstring = 160


class TextTokenizer(Protocol):
    max_length: int

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns ids and attention mask, both int64 of shape (len(texts), max_length)."""
        ...


def _pack(sequences: list[list[int]], max_length: int, eos_id: int, pad_id: int,
          decode: Callable[[list[int]], str]) -> tuple[np.ndarray, np.ndarray]:
    """Truncate each sequence to max_length - 1 tokens, append end-of-sequence and pad to max_length.

    Returns ids and attention mask, both int64 of shape (len(sequences), max_length). Each truncated sequence logs
    one warning with its length and `decode` (kept token ids -> text) of what the text encoder reads."""
    ids = np.full((len(sequences), max_length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), max_length), dtype=np.int64)
    for row, tokens in enumerate(sequences):
        kept = list(tokens[: max_length - 1])
        if len(tokens) > len(kept):
            log.warning("the prompt has %d tokens; the text encoder reads %d (+ end of sequence): only %s is used",
                        len(tokens), len(kept), _shown.repr(decode(kept)))
        ids[row, : len(kept) + 1] = kept + [eos_id]
        mask[row, : len(kept) + 1] = 1
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; id 0 = padding, 1 = end of sequence, 2 = unknown (ByT5's layout)."""

    pad_id, eos_id, offset = 0, 1, 3
    vocab_size = 256 + offset

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        sequences = [[b + self.offset for b in text.encode("utf-8")] for text in _as_list(texts)]
        return _pack(sequences, self.max_length, self.eos_id, self.pad_id, self._decode)

    def _decode(self, ids: list[int]) -> str:
        # a cut inside a multi-byte character drops that character
        return bytes(i - self.offset for i in ids).decode("utf-8", errors="ignore")


class PretrainedTokenizer:
    """A T5 checkpoint's tokenizer: `tokenizer.json` (preferred) or `spiece.model` in `directory`."""

    def __init__(self, directory: str | Path, max_length: int):
        self.directory = Path(directory)
        self.max_length = max_length
        json_file, spm_file = self.directory / "tokenizer.json", self.directory / "spiece.model"
        if json_file.is_file():
            tokenizers = import_optional("tokenizers", "pip install 'walt-export[t5]' (it reads tokenizer.json)")
            self._tok = tokenizers.Tokenizer.from_file(str(json_file))
            self._tok.no_padding()
            self._tok.no_truncation()
            self.pad_id = _token_id(self._tok.token_to_id("<pad>"), 0)
            self.eos_id = _token_id(self._tok.token_to_id("</s>"), 1)
            self._encode = lambda texts: [self._without_eos(e.ids) for e in self._tok.encode_batch(texts)]
        elif spm_file.is_file():
            spm = import_optional("sentencepiece", "pip install 'walt-export[t5]' (it reads spiece.model)")
            self._tok = spm.SentencePieceProcessor(model_file=str(spm_file))
            self.pad_id = _token_id(self._tok.pad_id(), 0)
            self.eos_id = _token_id(self._tok.eos_id(), 1)
            self._encode = lambda texts: [list(ids) for ids in self._tok.encode(list(texts))]
        else:
            raise ArtifactError(
                f"no tokenizer in {self.directory}: expected tokenizer.json or spiece.model beside the T5 weights"
            )

    def _without_eos(self, ids: list[int]) -> list[int]:
        # tokenizer.json's post-processor may append </s> already; `_pack` appends it after truncation
        return ids[:-1] if ids and ids[-1] == self.eos_id else ids

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return _pack(self._encode(_as_list(texts)), self.max_length, self.eos_id, self.pad_id, self._tok.decode)


def load_text_tokenizer(pretrained_dir: str | Path | None, max_length: int) -> TextTokenizer:
    """The tokenizer of a text encoder: its checkpoint's files, or the byte tokenizer when it has none."""
    if pretrained_dir is None:
        return ByteTokenizer(max_length)
    return PretrainedTokenizer(pretrained_dir, max_length)


def _as_list(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
    return texts


def _token_id(value: int | None, default: int) -> int:
    return default if value is None or value < 0 else int(value)
