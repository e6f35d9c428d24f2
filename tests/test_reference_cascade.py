"""The committed trained reference cascade (`walt_export/weights/tiny`, docs/reference.md): `walt-export onnx
--preset tiny` exports it by default, and its videos show the prompted colour far more often than chance.

One export (about 1.5 min) and four text-to-video generations through onnxruntime (about 20 s each) on this CPU.
"""

import pytest

from runtime.pipeline import Pipeline
from runtime.score import score_pipeline
from runtime.world import COLOURS
from walt_export.cli import main as walt_export
from walt_export.reference import reference_checkpoint

PROMPTS = 4  # score_prompts(4): four colours, four directions, three shapes
# Lowest accuracy accepted (fractions of PROMPTS). Chance is 1 / 4; the committed cascade measures colour 1.0 on these
# prompts (docs/reference.md §7), so one miss in four still passes. Direction (measured 0.25, chance) is not learned
# yet and is not asserted: add it here when a cascade learns it.
MIN_ACCURACY = {"colour": 0.75}
MIN_TOKENIZER_PSNR_DB = 30.0  # the target; 32.9 dB measured on the first held-out clip


@pytest.fixture(scope="module")
def reference_artifacts(tmp_path_factory):
    assert reference_checkpoint("tiny") is not None, "walt_export/weights/tiny.safetensors is missing"
    out = tmp_path_factory.mktemp("reference") / "tiny"
    assert walt_export(["onnx", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def test_tiny_exports_the_trained_cascade_by_default(reference_artifacts):
    with Pipeline.from_artifacts(reference_artifacts) as pipeline:
        assert pipeline.manifest.trained_on == "world"
        assert pipeline.manifest.source.checkpoint == str(reference_checkpoint("tiny"))


def test_the_trained_cascade_shows_the_prompted_colour(reference_artifacts):
    with Pipeline.from_artifacts(reference_artifacts, threads=2) as pipeline:
        report = score_pipeline(pipeline, PROMPTS, clips=1, modes=["text-to-video"])
    (mode,) = report.modes
    assert len({d.expected.colour for d in report.decisions}) == len(COLOURS)
    for quality, least in MIN_ACCURACY.items():
        accuracy = getattr(mode, quality)
        wrong = [f"{d.caption!r} (seed {d.seed}) read as {getattr(d, quality)}" for d in report.decisions
                 if not getattr(d, f"{quality}_correct")]
        assert accuracy >= least, f"{quality} accuracy {accuracy:.2f} < {least}: {'; '.join(wrong)}"
    assert report.tokenizer_psnr_db >= MIN_TOKENIZER_PSNR_DB, \
        f"tokenizer PSNR {report.tokenizer_psnr_db:.2f} dB < {MIN_TOKENIZER_PSNR_DB} dB"
