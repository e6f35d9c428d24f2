"""The prompt-adherence score (runtime/score.py): its decisions on ground-truth world clips, its fixed prompts, the
agreement of two reports, and a scoring run of the micro artifact (mechanics only: its weights are random) through
the library and `walt-export score`, on onnxruntime and PyTorch."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from runtime.errors import RequestError, UsageError
from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline
from runtime.score import (
    MODES,
    Decision,
    ScoreReport,
    agreement,
    format_table,
    score_frames,
    score_pipeline,
    score_prompts,
)
from runtime.video import to_video
from runtime.world import COLOURS, DIRECTIONS, SHAPES, Clip, Scene, scenes
from tests.test_boundaries import BLOCK_TORCH, python
from walt_export.cli import main as walt_export

SMALL = ["--prompts", "1", "--clips", "1", "--steps", "2"]  # the micro artifact: 50 steps per denoiser by default


def world_clip(seed: int, scene: Scene, frames: int = 17, height: int = 64, width: int = 112) -> np.ndarray:
    return Clip.sample(seed, scene, aspect=width / height).render(frames, height, width)


def read_right(decision: Decision) -> bool:
    return decision.colour_correct and decision.shape_correct and decision.direction_correct


# ------------------------------------------------------------------------------------------------ score_frames
def test_ground_truth_clips_are_scored_right():
    for seed, scene in enumerate(score_prompts(12)):
        for first, mode in ((0, "text-to-video"), (1, "image-to-video")):
            decision = score_frames(world_clip(100 + seed, scene), scene, first, mode=mode, seed=seed)
            assert read_right(decision), decision
            assert (decision.mode, decision.seed, decision.caption) == (mode, seed, scene.caption)


def test_a_clip_of_another_scene_is_scored_wrong():
    shown = Scene(colour="red", shape="circle", direction="left")
    prompted = Scene(colour="blue", shape="square", direction="up")
    decision = score_frames(world_clip(3, shown), prompted, mode="text-to-video", seed=3)
    assert (decision.colour, decision.shape, decision.direction) == ("red", "circle", "left")
    assert not (decision.colour_correct or decision.shape_correct or decision.direction_correct)


def test_a_continuation_is_scored_on_its_own_frames():
    """Long videos read only the continuation: a first clip of another scene does not count."""
    scene = Scene(colour="yellow", shape="triangle", direction="down")
    other = world_clip(5, Scene(colour="green", shape="square", direction="right"), frames=9)
    frames = np.concatenate([other, Clip.sample(6, scene, aspect=112 / 64).render(8, 64, 112, first=9)])
    assert read_right(score_frames(frames, scene, 9, mode="long-video", seed=0))
    assert not read_right(score_frames(frames, scene, 0, mode="long-video", seed=0))


def test_bad_frames_are_a_value_error():
    with pytest.raises(ValueError, match="first must be in 0 .. 16"):
        score_frames(world_clip(0, scenes()[0]), scenes()[0], 17, mode="image-to-video", seed=0)


# ----------------------------------------------------------------------------------------------- score_prompts
def test_prompts_are_fixed_and_cover_the_world_evenly():
    assert score_prompts(48) == score_prompts(48)
    assert sorted(score_prompts(48), key=lambda s: s.class_id) == scenes()  # every scene once
    assert score_prompts(50)[48:] == score_prompts(2)  # then they cycle
    twelve = score_prompts(12)
    assert Counter(s.colour for s in twelve) == dict.fromkeys(COLOURS, 3)
    assert Counter(s.shape for s in twelve) == dict.fromkeys(SHAPES, 4)
    assert Counter(s.direction for s in twelve) == dict.fromkeys(DIRECTIONS, 3)
    eight = score_prompts(8)  # the CLI's default: every colour, shape and direction, twice or more
    assert {s.colour for s in eight} == set(COLOURS) and {s.direction for s in eight} == set(DIRECTIONS)
    assert min(Counter(s.shape for s in eight).values()) >= 2
    assert len({(s.colour, s.direction) for s in score_prompts(16)}) == 16  # colour and direction uncorrelated


# --------------------------------------------------------------------------------------------------- agreement
def report_of(decisions: list[Decision]) -> ScoreReport:
    return ScoreReport(artifacts="a", backend="onnxruntime", precision="fp32", steps=None, modes=[],
                       tokenizer_psnr_db=30.0, tokenizer_clips=1, decisions=decisions, seconds=1.0)


def test_agreement_counts_the_same_decisions():
    decisions = [score_frames(world_clip(seed, scene), scene, mode="text-to-video", seed=seed)
                 for seed, scene in enumerate(score_prompts(4))]
    report = report_of(decisions)
    assert agreement(report, report) == 1.0
    changed = report_of([decisions[0].model_copy(update={"direction": None}), *decisions[1:]])
    assert agreement(report, changed) == agreement(changed, report) == 0.75
    assert agreement(report, report_of(decisions[:2])) == 1.0  # over the generations both scored
    with pytest.raises(ValueError, match="share no generation"):
        agreement(report, report_of([d.model_copy(update={"seed": 9}) for d in decisions]))


def test_a_decision_round_trips_through_json_with_its_derived_fields():
    scene = scenes()[7]
    decision = score_frames(world_clip(1, scene), scene, mode="image-to-video", seed=1)
    written = json.loads(decision.model_dump_json())
    assert written["caption"] == scene.caption and written["direction_correct"] is True
    assert Decision.model_validate(written) == decision
    with pytest.raises(ValueError, match="Extra inputs"):
        Decision.model_validate(written | {"unknown": 1})


# ------------------------------------------------------------------------------------- the micro artifact, scored
def test_score_pipeline_on_micro(micro_artifacts):
    directory, _ = micro_artifacts
    lines = []
    with Pipeline.from_artifacts(directory) as pipeline:
        report = score_pipeline(pipeline, 1, clips=1, steps=2,
                                progress=lines.append)
        with pytest.raises(RequestError, match="the tokenizer takes a"):
            pipeline.reconstruct(to_video(world_clip(0, scenes()[0], frames=8, height=128, width=128)))
    assert [(s.mode, s.prompts) for s in report.modes] == [(mode, 1) for mode in MODES]
    assert [(d.mode, d.seed, d.expected) for d in report.decisions] == [(mode, 0, score_prompts(1)[0])
                                                                       for mode in MODES]
    assert all(0 <= getattr(s, k) <= 1 for s in report.modes for k in ("colour", "shape", "direction"))
    assert math.isfinite(report.tokenizer_psnr_db) and 0 < report.tokenizer_psnr_db < 100
    assert (report.tokenizer_clips, report.steps, report.artifacts) == (1, 2, str(directory))
    assert len(lines) == 3 and lines[0].startswith("text-to-video 1/1: 'a red circle moving left' seed 0: read")
    table = format_table(report)
    assert all(mode in table for mode in MODES) and "tokenizer reconstruction PSNR" in table


def test_score_cli_writes_the_report_as_json(micro_artifacts, tmp_path, capsys):
    directory, _ = micro_artifacts
    out = tmp_path / "score.json"
    assert walt_export(["score", "--artifacts", str(directory), *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "text-to-video" in printed and "tokenizer reconstruction PSNR" in printed and f"wrote {out}" in printed
    report = ScoreReport.model_validate_json(out.read_text())
    assert [s.mode for s in report.modes] == list(MODES) and len(report.decisions) == 3
    with Pipeline.from_artifacts(directory) as pipeline:  # the same decisions as the library's, seeded
        again = score_pipeline(pipeline, 1, clips=1, steps=2,
                               modes=["image-to-video"])
    assert agreement(report, again) == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["score.json"]  # written atomically: no temporary left


def test_score_cli_needs_no_torch_for_onnxruntime(micro_artifacts):
    directory, _ = micro_artifacts
    result = python(BLOCK_TORCH + "from walt_export.cli import main\nraise SystemExit(main(sys.argv[1:]))\n",
                    "score", "--artifacts", str(directory), *SMALL, "--modes", "text-to-video")
    assert result.returncode == 0, result.stderr
    assert "text-to-video" in result.stdout and "long-video" not in result.stdout


def test_torch_and_onnxruntime_decisions_are_compared(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    reports = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / f"{backend}.json"
        assert walt_export(["score", "--artifacts", str(directory), "--backend", backend, *SMALL,
                            "--modes", "text-to-video", "--json", str(out)]) == 0
        reports[backend] = ScoreReport.model_validate_json(out.read_text())
    assert (reports["torch"].backend, reports["torch"].precision) == ("torch", "fp32")
    assert 0.0 <= agreement(reports["onnxruntime"], reports["torch"]) <= 1.0  # random weights: no value to expect


def test_mistakes_are_one_line_before_any_generation(micro_artifacts, tmp_path, capsys):
    directory, _ = micro_artifacts
    for flags, message in ((["--json", str(tmp_path / "score.txt")], "expected a path ending in .json"),
                           (["--backend", "torch", "--precision", "fp16"], "runs the float32 PyTorch modules"),
                           (["--steps", "5000"], "steps=5000 for base is not in [1, 1000]")):
        assert walt_export(["score", "--artifacts", str(directory), *flags]) == 1
        err = capsys.readouterr().err
        assert err.count("walt-export: error:") == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_only_text_to_video_artifacts_are_scored(micro_artifacts):
    """The check comes before any model runs (the runners would fail the test)."""
    directory, _ = micro_artifacts
    manifest = read_manifest(directory)
    base = manifest.stages["base"]
    base = base.model_copy(update={"denoiser": base.denoiser.model_copy(update={"conditioning": "class",
                                                                                 "num_classes": 48})})
    classes = manifest.model_copy(update={"stages": manifest.stages | {"base": base}})
    pipeline = Pipeline(classes, lambda name: pytest.fail(f"{name} was opened"), directory)
    with pytest.raises(UsageError, match="needs a text-to-video artifact; micro is class-conditional"):
        score_pipeline(pipeline, 1)
    with Pipeline.from_artifacts(directory) as text:
        for modes, message in (([], "modes must be some of"), (["sideways"], "got 'sideways'")):
            with pytest.raises(UsageError, match=message):
                score_pipeline(text, 1, modes=modes)
