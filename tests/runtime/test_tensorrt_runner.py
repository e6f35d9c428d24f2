"""The TensorRT runner and the engine registry: feed checks, buffer plans and growth, the frozen-feed rule and
`find_plan`'s messages run everywhere; running plans needs a GPU with TensorRT and cuda-python (skipped here)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.compare import Tolerance, assert_close
from runtime.engine_registry import (
    BUILD_JSON,
    ENGINES,
    EngineEntry,
    Registry,
    check_engine_precision,
    detect_target,
    find_plan,
    import_tensorrt,
    read_registry,
    write_registry,
)
from runtime.errors import UsageError
from runtime.manifest import ArtifactError, PrecisionPolicy, StageInfo, TensorInfo, sha256_of
from runtime.runners import make_runner
from runtime.tensorrt_runner import (
    Buffer,
    CudaError,
    EngineTensor,
    TensorRTRunner,
    buffer_plan,
    buffers_to_grow,
    check_feeds,
    is_frozen,
)

ROOT = Path(__file__).resolve().parents[2]
HAS_GPU = shutil.which("nvidia-smi") is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none on this machine)")
F32, I64 = np.dtype(np.float32), np.dtype(np.int64)
LATENT = (8, 3, 4, 4)
SPECS = [  # a denoiser's interface, as TensorRT declares it: batch dynamic within the profile (1, 2, 8)
    EngineTensor("latent", True, F32, (-1, *LATENT), ((1, *LATENT), (2, *LATENT), (8, *LATENT))),
    EngineTensor("timestep", True, F32, (-1,), ((1,), (2,), (8,))),
    EngineTensor("text_mask", True, I64, (-1, 16), ((1, 16), (2, 16), (8, 16))),
    EngineTensor("scale", True, F32, (1,)),
    EngineTensor("v", False, F32, (-1, *LATENT)),
]
PLAN = "base.fp16.plan"
TRT_TOLERANCE = Tolerance(atol=2e-3, rtol=2e-3)  # one small matmul: FP32 engines may run it in TF32
MODEL_TOLERANCE = Tolerance(atol=1e-2, rtol=1e-2)  # a micro model in TF32 vs onnxruntime's FP32 (not measured yet)


def feeds(batch: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    return {"latent": rng.standard_normal((batch, *LATENT), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, np.float32), "text_mask": np.ones((batch, 16), np.int64),
            "scale": np.ones((1,), np.float32)}


def shapes(batch: int) -> dict[str, tuple[int, ...]]:
    return {name: array.shape for name, array in feeds(batch).items()} | {"v": (batch, *LATENT)}


# ------------------------------------------------------------------------------------------------ feed checks
def test_missing_inputs_are_listed():
    partial = {k: v for k, v in feeds(2).items() if k != "timestep"}
    with pytest.raises(ValueError, match=re.escape(f"{PLAN} needs the inputs ['timestep']; got "
                                                   "['latent', 'scale', 'text_mask']")):
        check_feeds(SPECS, partial, PLAN)


def test_lossy_dtypes_are_refused_safe_ones_cast():
    with pytest.raises(TypeError, match=r"input 'latent' is float64, the engine takes float32; convert it first "
                                        r"\(\.astype\(np\.float32\)\)"):
        check_feeds(SPECS, feeds(2) | {"latent": np.zeros((2, *LATENT))}, PLAN)
    with pytest.raises(TypeError, match="input 'text_mask' is float32, the engine takes int64"):
        check_feeds(SPECS, feeds(2) | {"text_mask": np.ones((2, 16), np.float32)}, PLAN)
    half = feeds(2) | {"latent": np.ones((2, *LATENT), np.float16), "text_mask": np.ones((2, 16), np.int32)}
    arrays = check_feeds(SPECS, half, PLAN)
    assert arrays["latent"].dtype == F32 and arrays["text_mask"].dtype == I64
    assert np.array_equal(arrays["latent"], half["latent"])


def test_shapes_must_fit_the_engine_and_its_profile():
    with pytest.raises(ValueError, match=re.escape("input 'latent' has shape (2, 8, 3, 4), the engine takes "
                                                   "(?, 8, 3, 4, 4) (? = any size within its profile)")):
        check_feeds(SPECS, feeds(2) | {"latent": np.zeros((2, 8, 3, 4), np.float32)}, PLAN)
    with pytest.raises(ValueError, match=re.escape("input 'scale' has shape (2,), the engine takes (1,)")):
        check_feeds(SPECS, feeds(2) | {"scale": np.ones((2,), np.float32)}, PLAN)
    with pytest.raises(ValueError, match=re.escape("input 'latent' has shape (9, 8, 3, 4, 4), outside the engine's "
                                                   "profile (1, 8, 3, 4, 4) .. (8, 8, 3, 4, 4)")):
        check_feeds(SPECS, feeds(9), PLAN)


def test_a_static_profile_refuses_another_batch_saying_how_to_rebuild():
    """A plan of `walt-export engines --profile static --batch 1`: min = opt = max = 2 rows (CFG)."""
    static = [EngineTensor(t.name, t.is_input, t.dtype, t.shape, t.profile and tuple((2, *s[1:]) for s in t.profile))
              for t in SPECS]
    assert check_feeds(static, feeds(2), PLAN)["latent"].shape == (2, *LATENT)
    for batch in (1, 4):
        with pytest.raises(ValueError, match=re.escape(
                f"input 'latent' has shape ({batch}, 8, 3, 4, 4), outside the engine's profile (2, 8, 3, 4, 4) .. "
                "(2, 8, 3, 4, 4) (it was built with a static profile at batch 2: rebuild the plans with `walt-export "
                "engines --artifacts DIR --profile static --batch N` for N videos per call")):
            check_feeds(static, feeds(batch), PLAN)


def test_feeds_come_back_contiguous_without_needless_copies():
    given = feeds(2) | {"unused": np.zeros(3)}
    given["latent"] = np.asfortranarray(given["latent"])
    arrays = check_feeds(SPECS, given, PLAN)
    assert set(arrays) == {"latent", "timestep", "text_mask", "scale"}  # feeds the engine does not take: ignored
    assert arrays["latent"].flags.c_contiguous and np.array_equal(arrays["latent"], given["latent"])
    assert arrays["timestep"] is given["timestep"]  # already right: passed through


# ------------------------------------------------------------------------------------------------ buffers
def test_buffer_plan_sizes_every_input_and_output():
    plan = buffer_plan(SPECS, shapes(2), PLAN)
    assert plan["latent"] == Buffer((2, *LATENT), F32, 2 * 8 * 3 * 4 * 4 * 4)
    assert plan["text_mask"] == Buffer((2, 16), I64, 2 * 16 * 8)
    assert plan["v"].nbytes == plan["latent"].nbytes and plan["scale"].nbytes == 4
    assert buffer_plan(SPECS, shapes(0), PLAN)["latent"].nbytes == 1  # an empty tensor still gets an address
    with pytest.raises(ValueError, match="output 'v' has a data-dependent shape"):
        buffer_plan(SPECS, shapes(2) | {"v": (-1, *LATENT)}, PLAN)


def test_buffers_grow_only_when_a_call_needs_more_bytes():
    assert buffers_to_grow({}, buffer_plan(SPECS, shapes(2))) == ["latent", "timestep", "text_mask", "scale", "v"]
    capacity = {name: buffer.nbytes for name, buffer in buffer_plan(SPECS, shapes(2)).items()}
    assert buffers_to_grow(capacity, buffer_plan(SPECS, shapes(2))) == []
    assert buffers_to_grow(capacity, buffer_plan(SPECS, shapes(1))) == []  # smaller: reused, never shrunk
    assert buffers_to_grow(capacity, buffer_plan(SPECS, shapes(8))) == ["latent", "timestep", "text_mask", "v"]


def test_only_frozen_arrays_are_trusted_not_to_change():
    array = np.zeros(4, np.float32)
    assert not is_frozen(array)
    array.flags.writeable = False
    assert is_frozen(array) and is_frozen(array[1:])  # a view of a frozen array
    base = np.zeros(4, np.float32)
    view = base[:]
    view.flags.writeable = False
    assert not is_frozen(view)  # read-only, but changes with its writable base
    readonly_bytes = np.frombuffer(b"\0" * 16, np.float32)
    assert not readonly_bytes.flags.writeable and not is_frozen(readonly_bytes)  # not an array's memory: not trusted
    assert not is_frozen([1.0, 2.0])


# ------------------------------------------------------------------------------------------------ registry
@pytest.fixture(scope="module")
def trt():
    try:
        return import_tensorrt()
    except ImportError as error:
        pytest.skip(str(error))


def register(out: Path, stage: str, precision: str, target, content: bytes = b"a plan") -> Path:
    """A plan file and its build.json entry, as `walt-export engines` writes them."""
    out.mkdir(parents=True, exist_ok=True)
    plan = out / f"{stage}.{precision}.plan"
    plan.write_bytes(content)
    entry = EngineEntry(stage=stage, precision=precision, source_file=f"{stage}.onnx", source_sha256="0" * 64,
                        attention=None, profile={"batch": (1, 2, 8)}, plugin_version="1", target=target,
                        plan=plan.name, plan_sha256=sha256_of(plan), build_seconds=0.1)
    registry = read_registry(out)
    write_registry(out, registry.model_copy(update={"engines": {**registry.engines, plan.name: entry}}))
    return plan


def test_find_plan_without_engines_names_the_command(trt, tmp_path):
    artifact = tmp_path / "tiny"
    artifact.mkdir()
    target = detect_target(trt).directory_name
    with pytest.raises(ArtifactError, match=re.escape(
            f"{artifact} has no engines for this machine ({target}; it has no engines); build them here with "
            f"`walt-export engines --artifacts {artifact} --precision int8`")):
        find_plan(artifact, "base", "int8", trt)
    with pytest.raises(UsageError, match=r"TensorRT plans are built for fp16 or int8 \(`walt-export engines "
                                         r"--precision`\), not 'fp32'"):
        check_engine_precision("fp32")


def test_find_plan_says_which_machines_have_engines(trt, tmp_path):
    artifact = tmp_path / "tiny"
    for other in ("orin-sm87-trt10.3.0", "h100-sm90-trt10.13"):
        (artifact / ENGINES / other).mkdir(parents=True)
    with pytest.raises(ArtifactError, match=r"; engines exist only for h100-sm90-trt10\.13, orin-sm87-trt10\.3\.0\); "
                                            r"build them here with `walt-export engines --artifacts .*tiny "
                                            r"--precision fp16`"):
        find_plan(artifact, "base", "fp16", trt)


def test_find_plan_finds_checks_and_refuses(trt, tmp_path):
    artifact = tmp_path / "tiny"
    target = detect_target(trt)
    out = artifact / ENGINES / target.directory_name
    register(out, "sr1", "fp16", target)
    with pytest.raises(ArtifactError, match=r"no base\.fp16\.plan in .* \(it has: sr1\.fp16\.plan\); build it with "
                                            r"`walt-export engines --artifacts .*tiny --precision fp16`"):
        find_plan(artifact, "base", "fp16", trt)
    plan = register(out, "base", "fp16", target)
    assert find_plan(artifact, "base", "fp16", trt) == plan
    plan.write_bytes(b"another plan")
    with pytest.raises(ArtifactError, match="does not match its build.json"):
        find_plan(artifact, "base", "fp16", trt)
    orin = type(target)(tensorrt="tensorrt", version="10.3.0", device="Orin", compute_capability="8.7")
    register(out, "base", "fp16", orin)  # a plan copied here from a Jetson
    with pytest.raises(ArtifactError, match=r"base\.fp16\.plan was built for orin-sm87-trt10\.3\.0, this machine is"):
        find_plan(artifact, "base", "fp16", trt)


def test_registry_lives_in_the_runtime(trt, tmp_path):
    from walt_export import engine_build

    assert engine_build.import_tensorrt is import_tensorrt and engine_build.detect_target is detect_target
    assert read_registry(tmp_path) == Registry()  # no build.json yet: nothing built
    plan = register(tmp_path, "base", "fp16", detect_target(trt))
    assert read_registry(tmp_path).engines[plan.name].plan_sha256 == sha256_of(plan)
    saved = json.loads((tmp_path / BUILD_JSON).read_text())
    assert saved["format"] == "walt-export-engines" and list(saved["engines"]) == ["base.fp16.plan"]
    (tmp_path / BUILD_JSON).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"build\.json is not readable JSON .*; delete it and rebuild the engines "
                                            r"with `walt-export engines"):
        read_registry(tmp_path)
    (tmp_path / BUILD_JSON).write_text(json.dumps(saved | {"engines": {"base.fp16.plan": {"plan": PLAN}}}))
    with pytest.raises(ArtifactError, match=r"does not match the walt-export-engines schema: engines\.base\.fp16\.plan\."):
        read_registry(tmp_path)


def test_runtime_imports_tensorrt_and_cuda_only_when_a_runner_opens():
    code = ("import sys\n"
            "for name in ('torch', 'walt_export', 'tensorrt', 'tensorrt_rtx', 'cuda'):\n"
            "    sys.modules[name] = None  # importing them raises ImportError\n"
            "import runtime.engine_registry, runtime.tensorrt_runner\n"
            "from runtime.runners import make_runner\n"
            "print(type(make_runner('tensorrt', 'base.fp16.plan')).__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "TensorRTRunner", result.stderr


# ------------------------------------------------------------------------------------------------ the runner
def tiny_model(directory: Path) -> tuple[Path, StageInfo]:
    """y = relu(x @ w), z = 2 * float(k): a float32 and an int64 input, dynamic batch in (1, 2, 8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3), dtype=np.float32), "w")
    two = numpy_helper.from_array(np.array(2, np.float32), "two")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"]),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["kf", "two"], ["z"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                                              helper.make_tensor_value_info("k", TensorProto.INT64, ["batch"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch"])], [w, two])
    path = directory / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    stage = StageInfo(module="tiny", profile={"batch": (1, 2, 8)}, files=(),
                      precision=PrecisionPolicy(allowed=("fp32",)),
                      inputs=(TensorInfo(name="x", dtype="float32", shape=("batch", 4)),
                              TensorInfo(name="k", dtype="int64", shape=("batch",))),
                      outputs=(TensorInfo(name="y", dtype="float32", shape=("batch", 3)),
                               TensorInfo(name="z", dtype="float32", shape=("batch",))))
    return path, stage


@pytest.fixture(scope="module")
def tiny(trt, tmp_path_factory):
    """(ONNX path, plan path) of the tiny model, built by this machine's TensorRT (TensorRT-RTX: on the CPU)."""
    from walt_export.engine_build import build_engine

    directory = tmp_path_factory.mktemp("tiny")
    onnx_path, stage = tiny_model(directory)
    plan = directory / "tiny.plan"
    plan.write_bytes(build_engine(onnx_path, stage, trt).plan)
    return onnx_path, plan


@pytest.fixture
def cudart():
    return pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (extra tensorrt)")


def tiny_feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4), dtype=np.float32), "k": rng.integers(0, 100, batch)}


def onnxruntime_outputs(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with make_runner("onnxruntime", onnx_path) as runner:
        return runner.infer(feeds)


def test_runner_without_cuda_python_says_what_to_install(trt, monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # `from cuda.bindings import runtime` raises
    with pytest.raises(ImportError, match=re.escape("the TensorRT backend needs cuda-python: "
                                                    "`pip install 'walt-export[tensorrt]'`")):
        TensorRTRunner(PLAN, trt=trt).__enter__()


@pytest.mark.skipif(HAS_GPU, reason="checks the message on machines without a GPU")
def test_runner_without_a_gpu_says_to_use_onnxruntime(cudart, trt, tiny):
    runner = TensorRTRunner(tiny[1], trt=trt)
    with pytest.raises(CudaError, match=r"no CUDA device \(cudaGetDeviceCount: \w+\): the TensorRT backend needs a "
                                        r"GPU; use --backend onnxruntime"):
        runner.__enter__()


def test_infer_outside_with_is_refused():
    with pytest.raises(RuntimeError, match="use the runner inside `with runner:`"):
        TensorRTRunner(PLAN).infer(tiny_feeds(2))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tiny_plan_matches_onnxruntime_across_batches(cudart, trt, tiny, cuda_graph):
    onnx_path, plan = tiny
    with TensorRTRunner(plan, cuda_graph=cuda_graph, trt=trt) as runner:
        for step, batch in enumerate([2, 2, 2, 8, 8, 1, 1, 1]):  # repeats (graph replays), growth, a smaller batch
            given = tiny_feeds(batch, seed=step)
            actual, expected = runner.infer(given), onnxruntime_outputs(onnx_path, given)
            assert set(actual) == {"y", "z"} and actual["y"].dtype == np.float32
            assert_close(actual["y"], expected["y"], TRT_TOLERANCE, f"y, call {step} (batch {batch})")
            assert np.array_equal(actual["z"], expected["z"]), step
            if step == 3:
                grown = dict(runner.allocated)
            if cuda_graph and trt.__name__ == "tensorrt" and step in (2, 7):
                assert runner._graph is not None, f"no graph replayed at call {step}"
        assert runner.allocated == grown == {"x": 8 * 4 * 4, "k": 8 * 8, "y": 8 * 3 * 4, "z": 8 * 4}
    assert runner.allocated == {}


@pytest.mark.gpu
@needs_gpu
def test_frozen_feeds_skip_copies_and_writable_views_do_not(cudart, trt, tiny):
    onnx_path, plan = tiny
    given = tiny_feeds(2)
    for array in given.values():
        array.flags.writeable = False
    base = given["x"].copy()
    view = base[:]
    view.flags.writeable = False
    with TensorRTRunner(plan, trt=trt) as runner:
        first, again = runner.infer(given), runner.infer(given)  # the second call copies nothing
        assert_close(again["y"], first["y"], Tolerance(0.0), "the same frozen feeds")
        runner.infer(given | {"x": view})
        base *= -2.0  # changes `view`: it must be copied again
        changed = given | {"x": view}
        assert_close(runner.infer(changed)["y"], onnxruntime_outputs(onnx_path, changed)["y"], TRT_TOLERANCE,
                     "y after the writable base changed")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("stage", ["base", "tokenizer_decoder"])
def test_micro_plans_match_onnxruntime(cudart, trt, micro_artifacts, tmp_path, stage):
    from walt_export.engine_build import build_engine

    directory, manifest = micro_artifacts
    info = manifest.stage(stage)
    source = info.file("fp32", "fallback" if stage == "base" else "canonical")
    plan = tmp_path / f"{stage}.fp32.plan"
    plan.write_bytes(build_engine(directory / source.file, info, trt).plan)
    rng = np.random.default_rng(0)
    dims = {name: opt for name, (_, opt, _) in info.profile.items()}
    given = {t.name: (np.ones(t.concrete(dims), np.int64) if t.dtype == "int64"
                      else rng.standard_normal(t.concrete(dims), dtype=np.float32)) for t in info.inputs}
    with TensorRTRunner(plan, trt=trt) as runner:
        actual = runner.infer(given)
    expected = onnxruntime_outputs(directory / source.file, given)
    for name in expected:
        assert_close(actual[name], expected[name], MODEL_TOLERANCE, f"{stage} {name}")
