"""The seams between the packages: what each imports, the one error base, and that every document a docstring
cites is in the repository."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("walt_export", "runtime", "calibration", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


BLOCK_TORCH = "import sys\nsys.modules['torch'] = None  # `import torch` raises ImportError\n"


def test_walt_export_help_and_presets_need_no_torch():
    result = python(BLOCK_TORCH + "import walt_export\n"
                    "assert walt_export.PRESETS['tiny'].frames == 17\n"
                    "from walt_export.cli import main\n"
                    "main(['--help'])\n")
    assert result.returncode == 0, result.stderr
    assert "usage: walt-export" in result.stdout and "calibrate" in result.stdout


def test_calibration_imports_nothing_that_imports_torch():
    result = python(BLOCK_TORCH + "import calibration.calibrate, calibration.capture, calibration.quantize, "
                    "calibration.report, calibration.real_video\n"
                    "print(sorted(m for m in sys.modules if m.startswith('walt_export')))\n")
    assert result.returncode == 0, result.stderr
    # the only exporter modules it reaches: the op's torch-free ONNX contract and the ONNX file helpers
    assert eval(result.stdout) == ["walt_export", "walt_export.onnx_files", "walt_export.window_attention",
                                   "walt_export.window_attention.onnx_contract"]


def test_runtime_and_calibration_read_no_untyped_config():
    """They read the manifest's typed fields only (docs/architecture.md §2): no `config[...]`/`schedule[...]`."""
    found = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES if p.parts[-2] in ("runtime", "calibration")
             for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b(config|schedule)\[", line)]
    assert not found, found


def test_every_document_a_source_cites_is_in_the_repository():
    """Docstrings cite `docs/NAME.md §N`: the file and the section exist; nothing cites the background documents
    outside the repository."""
    tests = [p for p in (ROOT / "tests").rglob("*.py") if p != Path(__file__)]
    cited = {}
    for path in [*SOURCES, *tests, *(ROOT / "docs").glob("*.md"), *(ROOT / name for name in ("README.md", "Makefile",
                                                                                           "pyproject.toml"))]:
        text = path.read_text()
        assert "../shared" not in text and "shared/" not in text, f"{path} cites the background documents"
        if path.suffix == ".py":
            for doc, sections in re.findall(r"docs/([\w-]+\.md)((?: §\d+(?:, §\d+)*)?)", text):
                cited.setdefault(doc, set()).update(re.findall(r"§(\d+)", sections))
    assert {"architecture.md", "model_spec.md", "tensorrt.md", "window_attention_op.md"} <= set(cited)
    for doc, sections in cited.items():
        assert (ROOT / "docs" / doc).is_file(), f"docs/{doc} is cited but missing"
        headings = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / doc).read_text(), re.MULTILINE))
        assert sections <= headings, f"docs/{doc} has no section(s) {sorted(sections - headings)}"


# ----------------------------------------------------------------------------------------------------- errors
def test_every_user_facing_error_shares_one_base():
    from calibration.calibrate import CalibrationError
    from runtime.errors import MissingDependencyError, RequestError, UsageError, WaltExportError
    from runtime.manifest import ArtifactError
    from runtime.render import JobsError
    from runtime.tensorrt_runner import CudaError
    from walt_export.config import ConfigError, UnknownPresetError
    from walt_export.engine_build import EngineBuildError
    from walt_export.state_dict import CheckpointError

    for error in (ArtifactError, CheckpointError, ConfigError, CudaError, EngineBuildError, JobsError,
                  MissingDependencyError, RequestError, UnknownPresetError, UsageError):
        assert issubclass(error, WaltExportError), error
    assert not issubclass(CalibrationError, WaltExportError)  # a model that breaks the Q/DQ recipe is a bug


RUNTIME_WITH_A_BUG = """import sys
import runtime.runners

real = runtime.runners.OnnxRuntimeRunner.infer

def infer(self, feeds):  # an internal bug: the denoiser returns one latent frame too few
    outputs = real(self, feeds)
    return {k: v[:, :, :-1] if k == "v" else v for k, v in outputs.items()}

runtime.runners.OnnxRuntimeRunner.infer = infer
from runtime.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_runtime_cli_a_bug_keeps_its_traceback_a_user_mistake_is_one_line(micro_artifacts, tmp_path, verbose):
    directory, _ = micro_artifacts
    flags = ["-v"] if verbose else []
    common = ["generate", "--artifacts", str(directory), "--prompt", "a cat", "--steps", "1", "-q"]
    bug = python(RUNTIME_WITH_A_BUG, *flags, *common, "--out", str(tmp_path / "bug.mp4"))
    assert bug.returncode != 0 and "Traceback" in bug.stderr and "ValueError" in bug.stderr, bug.stderr
    assert "python -m runtime: error:" not in bug.stderr  # not dressed up as a user mistake
    mistake = python(RUNTIME_WITH_A_BUG, *flags, *common, "--frames", "10", "--out", str(tmp_path / "m.mp4"))
    assert mistake.returncode == 1
    lines = [line for line in mistake.stderr.splitlines() if line.startswith("python -m runtime: error:")]
    assert len(lines) == 1 and "frames=10 is not a length this artifact makes" in lines[0], mistake.stderr
    assert ("Traceback" in mistake.stderr) == verbose  # -v shows the traceback of a user mistake too
    assert not list(tmp_path.iterdir())


WALT_EXPORT_WITH_A_BUG = """import sys
import walt_export.cascade

def summary(self):  # an internal bug
    return {}["table"]

walt_export.cascade.Cascade.summary = summary
from walt_export.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_walt_export_cli_a_bug_keeps_its_traceback_a_user_mistake_is_one_line(tmp_path, verbose):
    flags = ["-v"] if verbose else []
    bug = python(WALT_EXPORT_WITH_A_BUG, *flags, "summary", "--preset", "micro")
    assert bug.returncode != 0 and "Traceback" in bug.stderr and "KeyError: 'table'" in bug.stderr, bug.stderr
    assert "walt-export: error:" not in bug.stderr
    mistake = python(WALT_EXPORT_WITH_A_BUG, *flags, "summary", "--checkpoint", str(tmp_path / "none.safetensors"))
    assert mistake.returncode == 1
    lines = [line for line in mistake.stderr.splitlines() if line.startswith("walt-export: error:")]
    assert len(lines) == 1 and "none.json not found" in lines[0], mistake.stderr
    assert ("Traceback" in mistake.stderr) == verbose
