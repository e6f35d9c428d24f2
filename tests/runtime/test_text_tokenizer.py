import logging
import subprocess
import sys

import numpy as np
import pytest

from runtime.manifest import ArtifactError
from runtime.text_tokenizer import ByteTokenizer, PretrainedTokenizer, load_text_tokenizer
from tests.t5_fixtures import WORDS, write_tokenizer_json


def test_byte_tokenizer_layout():
    ids, mask = ByteTokenizer(8)(["ab", "é"])
    assert ids.dtype == np.int64 and ids.shape == mask.shape == (2, 8)
    assert ids[0].tolist() == [ord("a") + 3, ord("b") + 3, 1, 0, 0, 0, 0, 0]
    assert ids[1, :3].tolist() == [0xC3 + 3, 0xA9 + 3, 1]  # UTF-8 bytes of é, then </s>
    assert mask.sum(1).tolist() == [3, 3]


def test_truncation_keeps_the_end_of_sequence_token():
    ids, mask = ByteTokenizer(4)(["abcdef"])
    assert ids[0].tolist() == [ord("a") + 3, ord("b") + 3, ord("c") + 3, 1] and mask.all()


def test_empty_prompt_is_just_end_of_sequence():
    ids, mask = ByteTokenizer(4)([""])
    assert ids[0].tolist() == [1, 0, 0, 0] and mask[0].tolist() == [1, 0, 0, 0]


def test_a_cut_prompt_warns_once_with_the_text_kept(caplog):
    prompt = ("a corgi surfing a wave at sunset, " * 150)[:5000]
    with caplog.at_level(logging.WARNING, logger="runtime.text_tokenizer"):
        ids, _ = ByteTokenizer(32)([prompt, ""])
    assert [r.getMessage() for r in caplog.records] == [("the prompt has 5000 tokens; the text encoder reads 31 "
                                                         "(+ end of sequence): only 'a corgi surfing a wave at sunse' "
                                                         "is used")]
    assert ids[0, -1] == 1


def test_prompts_that_fit_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.text_tokenizer"):
        ByteTokenizer(4)(["", "abc"])  # the unconditional prompt and one that fits exactly
    assert caplog.records == []


def test_a_long_kept_text_is_shown_elided(caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.text_tokenizer"):
        ByteTokenizer(201)(["x" * 300])
    elided = f"'{'x' * 77}...{'x' * 78}'"
    assert [r.getMessage() for r in caplog.records] == [
        f"the prompt has 300 tokens; the text encoder reads 200 (+ end of sequence): only {elided} is used"]


def test_non_string_prompts_are_rejected():
    with pytest.raises(TypeError, match="prompts must be strings, got int"):
        ByteTokenizer(4)(["ok", 3])


def test_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer

    write_tokenizer_json(tmp_path)
    tok = load_text_tokenizer(tmp_path, 6)
    ids, mask = tok(["a cat", "the dog running in the park"])
    direct = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("a cat").ids  # ends in </s> already
    assert ids[0].tolist() == direct + [0] * (6 - len(direct))
    assert ids[1, -1] == 1 and mask[1].all()  # truncated to 5 tokens + </s>
    assert ids[1, :5].tolist() == [3 + WORDS.index(w) for w in "the dog running in the".split()]


def test_a_cut_prompt_of_a_pretrained_tokenizer_warns_with_its_decoded_text(tmp_path, caplog):
    write_tokenizer_json(tmp_path)
    with caplog.at_level(logging.WARNING, logger="runtime.text_tokenizer"):
        load_text_tokenizer(tmp_path, 6)(["the dog running in the park", "a cat", ""])
    assert [r.getMessage() for r in caplog.records] == [
        "the prompt has 6 tokens; the text encoder reads 5 (+ end of sequence): only 'the dog running in the' is used"]


def test_sentencepiece_model(tmp_path, caplog):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a {w} {v} in the park" for w in WORDS for v in WORDS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=20,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    ids, mask = PretrainedTokenizer(tmp_path, 32)(["a cat in the park"])
    expected = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model")).encode("a cat in the park")
    assert ids[0, : len(expected) + 1].tolist() == expected + [1]
    assert mask.sum() == len(expected) + 1
    ids, _ = PretrainedTokenizer(tmp_path, 3)(["a cat in the park"])
    kept = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model")).decode(expected[:2])
    assert "a cat in the park".startswith(kept) and len(kept) > 0
    assert f"only '{kept}' is used" in caplog.text


def test_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(ArtifactError, match="expected tokenizer.json or spiece.model"):
        PretrainedTokenizer(tmp_path, 8)


def test_runtime_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # importing torch now raises ImportError
            "import runtime, runtime.text_tokenizer, runtime.compare\n"
            "print(runtime.text_tokenizer.ByteTokenizer(4)(['a'])[0].tolist())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[100, 1, 0, 0]]"
