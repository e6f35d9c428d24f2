"""Generation requests: every bad value refused before any model runs, naming the field; non-finite outputs refused;
one Pipeline shared by threads."""

import os
import re
import threading

import numpy as np
import pytest

from runtime.errors import RequestError
from runtime.pipeline import NumericalError, Pipeline
from runtime.request import Guidance, Request, Seed, parse_as

BAD = [  # (values, the field named, what the message says)
    ({"guidance": float("nan")}, "guidance", "finite"),
    ({"guidance": float("inf")}, "guidance", "finite"),
    ({"guidance": -1.0}, "guidance", "greater than or equal to 0"),
    ({"guidance": "7"}, "guidance", "valid number"),
    ({"guidance": {"base": float("nan")}}, "guidance", "'base': Input should be a finite number"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"steps": 2.5}, "steps", "valid integer"),
    ({"steps": True}, "steps", "valid integer"),
    ({"steps": {"base": 0}}, "steps", "'base'"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),
    ({"frames": "17"}, "frames", "valid integer"),
    ({"frames": 0}, "frames", "greater than or equal to 1"),
    ({"class_id": -3}, "class_id", "greater than or equal to 0"),
    ({"prompt": os.fsdecode(b"caf\xe9")}, "prompt", "not valid UTF-8 text (byte 0xe9 at character 3)"),
]


@pytest.mark.parametrize("values, field, says", BAD, ids=[f"{b[1]}={b[0][b[1]]!r}" for b in BAD])
def test_bad_values_are_refused_naming_the_field(values, field, says):
    with pytest.raises(RequestError) as info:
        Request.parse(**values)
    assert str(info.value).startswith(f"{field}: ") and says in str(info.value), str(info.value)


def test_the_json_of_a_job_is_checked_as_strictly():
    with pytest.raises(ValueError, match="finite number"):
        Request.model_validate_json('{"guidance": NaN}')
    assert Request.model_validate_json('{"guidance": 7, "steps": {"base": 3}}').guidance == 7.0


def test_command_line_values_are_checked_by_the_same_types():
    import argparse

    assert parse_as(Seed)("5") == 5
    for kind, text, says in [(Seed, "-1", "greater than or equal to 0"), (Guidance, "nan", "finite"),
                             (Seed, "99999999999999999999", "less than or equal to")]:
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse_as(kind)(text)


def test_the_artifact_checks_run_before_any_model(micro_artifacts):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        for values, says in [
            ({"frames": 0}, "frames: Input should be greater than or equal to 1"),  # not "the default length"
            ({"frames": 10}, "frames=10 is not a length this artifact makes: 9, 13, 17"),
            ({"steps": {"bsae": 3}}, "steps: no denoiser 'bsae' in this artifact; its denoisers are base, sr1, sr2"),
            ({"guidance": {"sr3": 2.0}}, "guidance: no denoiser 'sr3'"),
            ({"steps": 5000}, "steps=5000 for base is not in [1, 1000]"),
            ({"frames": 9 + 4 * 10**9}, "GiB for the frames generate returns at 128x128"),
            ({"image": "/nonexistent.png"}, "no image at /nonexistent.png"),
        ]:
            with pytest.raises(RequestError, match=says.replace("[", r"\[").replace("]", r"\]")):
                pipe.generate("a cat", **values)
        with pytest.raises(RequestError, match="a batch takes lists of one length, one value per video"):
            pipe.generate(["a cat", "a dog"], seed=[1, 2, 3])
        with pytest.raises(RequestError, match="the videos of one batch share their length"):
            pipe.generate(["a cat", "a dog"], image=[None, np.zeros((128, 128, 3), np.uint8)])
        pipe.stream("a cat", frames=9 + 4 * 10**9)  # streamed: no frames are held, so no memory limit
        with pytest.raises(RequestError, match="prompt is an empty list: a batch needs at least one video"):
            pipe.generate([], seed=0)
        with pytest.raises(RequestError, match="no requests: a batch needs at least one video"):
            pipe.stream_batch([])
        with pytest.raises(RequestError, match="a request is a runtime.request.Request or a mapping of its fields, "
                                               "got str"):
            pipe.stream_batch(["a cat"])
        with pytest.raises(RequestError, match="seed: Input should be greater than or equal to 0"):
            pipe.stream_batch([{"prompt": "a cat", "seed": -1}])
        pipe.stream_batch([{"prompt": "a cat", "seed": 1}])  # checked, not run
        assert pipe._runners == {}  # nothing was opened, let alone run


class _Overflowing:
    """A real runner whose outputs get NaN where it says: the FP16 overflow fault, which the CPU build of
    onnxruntime does not produce on the small presets."""

    def __init__(self, runner, after_calls: int):
        self.runner, self.calls, self.after = runner, 0, after_calls

    def __exit__(self, *exc):
        return self.runner.__exit__(*exc)

    def infer(self, feeds):
        out = self.runner.infer(feeds)
        self.calls += 1
        if self.calls > self.after:
            out = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in out.items()}
        return out


@pytest.mark.parametrize("stage, after, says", [
    ("sr1", 1, "the output of the sr1 denoiser went non-finite at step 2 of 2"),
    ("text_encoder", 0, "the output of the text encoder went non-finite"),
    ("tokenizer_decoder", 0, "the output of the tokenizer decoder went non-finite"),
])
def test_a_non_finite_output_is_refused_naming_the_model(micro_artifacts, stage, after, says):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        pipe._runners[stage] = _Overflowing(pipe.runner(stage), after)
        with pytest.raises(NumericalError, match=re.escape(says)):
            pipe.generate("a cat", steps=2)


def test_threads_sharing_one_pipeline_get_the_videos_of_sequential_calls(micro_artifacts):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        expected = {seed: pipe.generate("a dog", seed=seed, steps={"base": 2 + seed, "sr1": 2, "sr2": 1}).frames
                    for seed in range(4)}
        actual, errors = {}, []

        def run(seed):
            try:
                actual[seed] = pipe.generate("a dog", seed=seed, steps={"base": 2 + seed, "sr1": 2, "sr2": 1}).frames
            except Exception as e:  # noqa: BLE001 (reported by the assert below)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for seed, frames in expected.items():
        np.testing.assert_array_equal(actual[seed], frames, err_msg=f"seed {seed}")
