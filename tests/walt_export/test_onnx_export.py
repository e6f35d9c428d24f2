"""The exported micro artifact: valid ONNX, the wattn nodes, variants, manifest, parity with PyTorch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from runtime.manifest import check_file, read_manifest
from runtime.runners import OnnxRuntimeRunner
from walt_export.config import DENOISER_NAMES, CascadeConfig
from walt_export.export_specs import BATCH, LATENT_FRAMES, export_specs
from walt_export.onnx_export import export_model
from walt_export.verify import VERIFY_JSON, OutputTolerance, verify_artifacts
from walt_export.window_attention.onnx_contract import (
    ATTENTION_OPSET,
    MAX_RANK,
    OP_DOMAIN,
    PLUGIN_VERSION,
    check_model,
    register_onnx_schema,
    window_attention_nodes,
)
from walt_export.window_attention.op import SPATIAL_WINDOW


def files_of(manifest, variants=("canonical", "plugin", "fallback")):
    return [(name, f) for name, stage in manifest.stages.items() for f in stage.files if f.variant in variants]


def test_manifest_lists_every_model_with_named_dims(micro_artifacts, micro):
    directory, manifest = micro_artifacts
    assert read_manifest(directory) == manifest
    assert list(manifest.stages) == ["text_encoder", "base", "sr1", "sr2", "tokenizer_encoder", "tokenizer_decoder",
                                     "tokenizer_decoder_step"]
    base = manifest.stage("base")
    assert [t.name for t in base.inputs] == ["latent", "timestep", "self_cond", "frame_cond", "frame_mask", "text",
                                             "text_mask"]
    assert base.inputs[0].shape == (BATCH, 8, 3, 4, 4)
    assert manifest.stage("tokenizer_decoder").outputs[0].shape == (BATCH, 3, f"4*{LATENT_FRAMES} - 3", 128, 128)
    assert (manifest.latent.frames, manifest.latent.height, manifest.latent.width) == (3, 16, 16)
    assert manifest.schedule.num_inference_steps == micro.config.diffusion.num_inference_steps
    assert manifest.exporter["onnx"] == onnx.__version__ and manifest.opset == 20
    for name, f in files_of(manifest):
        check_file(directory, f)  # exists, sha256 matches
        model = onnx.load(str(directory / f.file), load_external_data=False)
        stage = manifest.stage(name)
        for value, spec in zip(model.graph.input, stage.inputs, strict=True):  # the file carries the manifest's dims
            assert value.name == spec.name
            assert tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim) == spec.shape


def test_manifest_records_the_typed_contract_the_runtime_reads(micro_artifacts, micro):
    _, manifest = micro_artifacts
    cfg = micro.config
    assert (manifest.latent.temporal_factor, manifest.latent.spatial_factor) == (4, 8)
    assert list(manifest.denoisers) == ["base", "sr1", "sr2"]
    for name, info in manifest.denoisers.items():
        denoiser = getattr(cfg, name)
        assert (info.latent_channels, info.latent_size) == (denoiser.latent_channels, denoiser.latent_size)
        assert info.conditioning == "text" and info.num_classes is None
    assert manifest.denoisers["base"].noise_aug_level is None
    assert manifest.denoisers["sr2"].noise_aug_level == cfg.sr2.noise_aug_level
    text = manifest.stage("text_encoder")
    assert text.precision.allowed == ("fp32",) and "diffusers#8604" in text.precision.reason
    assert text.precision.resolve("fp16") == text.precision.resolve("int8") == "fp32"
    assert text.precisions == {"fp32"}  # --fp16 wrote no FP16 text encoder
    for name, stage in manifest.stages.items():
        if name != "text_encoder":
            assert stage.precision.allowed == ("fp32", "fp16", "int8") and stage.precisions == {"fp32", "fp16"}


def test_every_file_passes_the_full_checker_and_strict_shape_inference(micro_artifacts):
    directory, manifest = micro_artifacts
    for _, f in files_of(manifest):
        check_model(directory / f.file)  # raises on any problem


def test_denoisers_hold_one_wattn_node_per_layer_with_the_contract_attributes(micro_artifacts, micro):
    directory, manifest = micro_artifacts
    register_onnx_schema()
    for stage in DENOISER_NAMES:
        cfg = getattr(micro.config, stage)
        model = onnx.load(str(directory / f"{stage}.onnx"))
        nodes = window_attention_nodes(model)
        assert len(nodes) == cfg.depth
        for layer, node in enumerate(nodes):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            window = SPATIAL_WINDOW if cfg.is_spatial(layer) else cfg.window
            assert attrs["window"] == list(window), (stage, layer)
            assert attrs["scale"] == pytest.approx(cfg.head_dim**-0.5)
            assert attrs["plugin_namespace"] == b"wattn" and attrs["plugin_version"] == PLUGIN_VERSION.encode()
            assert len(node.input) == (4 if cfg.relative_position_bias else 3)
        assert [(f.domain, f.name) for f in model.functions] == [(OP_DOMAIN, "WindowAttention3D")]
        assert {f.file: f.window_attention_nodes for f in manifest.stage(stage).files} == {
            f"{stage}.onnx": cfg.depth, f"{stage}.plugin.onnx": cfg.depth, f"{stage}.fallback.onnx": 0,
            f"{stage}.attention.onnx": 0, f"{stage}.fp16.onnx": cfg.depth, f"{stage}.fp16.plugin.onnx": cfg.depth,
            f"{stage}.fp16.fallback.onnx": 0, f"{stage}.fp16.attention.onnx": 0,
        }


def test_plugin_variant_strips_the_body_and_fallback_inlines_it_within_rank_8(micro_artifacts):
    directory, manifest = micro_artifacts
    for stage in DENOISER_NAMES:
        cfg = getattr(CascadeConfig.model_validate(manifest.config), stage)
        cross = sum(cfg.has_cross_attention(layer) for layer in range(cfg.depth))
        assert cross > 0, stage  # the text cross-attention is rewritten too
        for precision in ("", ".fp16"):
            attention = onnx.load(str(directory / f"{stage}{precision}.attention.onnx"))
            assert not window_attention_nodes(attention) and not attention.functions
            ops = [n.op_type for n in attention.graph.node]
            assert ops.count("Attention") == cfg.depth + cross and "Softmax" not in ops, (stage, precision)
            assert {o.domain: o.version for o in attention.opset_import} == {"": ATTENTION_OPSET}
    plugin = onnx.load(str(directory / "base.plugin.onnx"))
    assert len(window_attention_nodes(plugin)) == 2 and not plugin.functions
    fallback = onnx.load(str(directory / "base.fallback.onnx"))
    assert not window_attention_nodes(fallback) and not fallback.functions
    assert all(o.domain != OP_DOMAIN for o in fallback.opset_import)
    inferred = onnx.shape_inference.infer_shapes(fallback, strict_mode=True)
    ranks = [len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info]
    assert max(ranks) == MAX_RANK  # the 8-D window partition, nothing deeper


def test_fp16_files_hold_float16_weights_behind_float32_inputs_and_outputs(micro_artifacts):
    directory, manifest = micro_artifacts
    for name, f in files_of(manifest):
        if f.precision != "fp16":
            continue
        model = onnx.load(str(directory / f.file))
        layer_inputs = {i for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") for i in n.input}
        weights = [t for t in model.graph.initializer if t.name in layer_inputs and t.data_type in (1, 10)]
        assert weights and {t.data_type for t in weights} == {onnx.TensorProto.FLOAT16}, f.file
        io = [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]
        assert onnx.TensorProto.FLOAT16 not in io, f.file


def test_onnxruntime_matches_pytorch_for_every_stage_variant_precision_and_two_batches(micro_artifacts):
    directory, manifest = micro_artifacts
    checks = verify_artifacts(directory, batches=(1, 2))
    failed = [c.worst for c in checks if not c.passed]
    assert not failed, "\n".join(failed)
    runnable = files_of(manifest, ("canonical", "fallback", "attention"))
    outputs = {(c.file, c.batch) for c in checks}
    assert outputs == {(f.file, b) for _, f in runnable for b in (1, 2)}  # every runnable file at both batches
    fp32 = [c for c in checks if c.precision == "fp32" and c.stage in DENOISER_NAMES]
    assert max(c.max_abs for c in fp32) < 1e-4  # the bar for the canonical fp32 denoisers
    saved = json.loads((directory / VERIFY_JSON).read_text())
    assert len(saved["checks"]) == len(checks)


def test_verify_fails_and_names_the_worst_element_beyond_tolerance(micro_artifacts):
    directory, _ = micro_artifacts
    strict = {"fp32": OutputTolerance(0.0, 0.0), "fp16": OutputTolerance(0.0, 0.0)}
    checks = verify_artifacts(directory, batches=(1,), tolerances=strict)
    failing = [c for c in checks if not c.passed and c.file == "base.fp16.onnx"]
    assert failing and "worst at (" in failing[0].worst


def test_decoder_chunks_continue_the_clip_like_the_whole_clip(micro_artifacts, generator):
    directory, manifest = micro_artifacts
    latent = torch.randn(1, 8, 3, 16, 16, generator=generator).numpy()
    with OnnxRuntimeRunner(directory / "tokenizer_decoder.onnx") as whole:
        expected = whole.infer({"latent": latent})["video"]  # (1, 3, 9, 128, 128)
        first = whole.infer({"latent": latent[:, :, :1]})
    with OnnxRuntimeRunner(directory / "tokenizer_decoder_step.onnx") as step:
        states = {k.replace("next_", ""): v for k, v in first.items() if k.startswith("next_state")}
        rest = step.infer({"latent": latent[:, :, 1:], **states})
    chunked = np.concatenate([first["video"], rest["video"]], axis=2)
    assert chunked.shape == expected.shape == (1, 3, 9, 128, 128)
    np.testing.assert_allclose(chunked, expected, atol=1e-5)


def test_external_data_for_large_models(micro, tmp_path):
    from walt_export.onnx_export import write_variants

    spec = export_specs(micro.config)["base"]
    canonical = export_model(micro.base, spec, tmp_path / "base.onnx", external_data_bytes=0)
    files = {f.file: f for f in write_variants(spec, canonical, tmp_path, fp16=True)}
    assert [d.file for d in files["base.onnx"].external_data] == ["base.onnx.data"]
    assert [d.file for d in files["base.fallback.onnx"].external_data] == ["base.onnx.data"]  # shared
    assert [d.file for d in files["base.attention.onnx"].external_data] == ["base.onnx.data"]
    assert [d.file for d in files["base.fp16.onnx"].external_data] == ["base.fp16.onnx.data"]
    weights = 4 * sum(p.numel() for p in micro.base.parameters())
    assert (tmp_path / "base.onnx.data").stat().st_size >= 0.9 * weights  # small tensors stay inline
    inputs = spec.sample_inputs(torch.Generator().manual_seed(0), batch=1)
    with torch.no_grad():
        expected = micro.base(*inputs[:5], text=inputs[5], text_mask=inputs[6]).numpy()
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
    for name in ("base.onnx", "base.fallback.onnx", "base.attention.onnx"):
        with OnnxRuntimeRunner(tmp_path / name) as runner:
            np.testing.assert_allclose(runner.infer(feeds)["v"], expected, atol=1e-5)


@pytest.mark.parametrize("variant", ["canonical", "fallback"])
def test_polygraphy_runs_the_exported_files_on_onnxruntime(micro_artifacts, variant):
    pytest.importorskip("polygraphy")
    directory, manifest = micro_artifacts
    files = [f.file for _, f in files_of(manifest, (variant,))]
    assert files
    for file in files:
        result = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "run", str(directory / file), "--onnxrt"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{file}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        assert "PASSED" in result.stdout + result.stderr


def test_tensorrt_rtx_builds_engines_of_the_fallback_and_fp16_files(micro_artifacts):
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (extra trt-rtx)")
    from walt_export.engine_build import EngineBuildError, build_engine

    directory, manifest = micro_artifacts
    built = []
    for name, f in files_of(manifest, ("canonical", "fallback")):  # canonical: TensorRT parses the function body
        assert len(build_engine(directory / f.file, manifest.stage(name), trt).plan) > 10_000, f.file
        built.append(f.file)
    assert {"base.fallback.onnx", "base.fp16.fallback.onnx", "sr2.fp16.fallback.onnx",
            "tokenizer_decoder_step.fp16.onnx"} <= set(built)
    with pytest.raises(EngineBuildError, match="Plugin not found"):  # TensorRT-RTX has no plugins
        build_engine(directory / "base.plugin.onnx", manifest.stage("base"), trt)


def test_tensorrt_rtx_builds_the_attention_variant_in_fp16_only(micro_artifacts):
    """TensorRT-RTX 1.7 maps `Attention` to its fused attention layer: FP16 builds; FP32 has no dedicated kernel for
    these windows and the layer is not decomposable by default, so the build fails (why `resolve_attention` picks
    the fallback for FP32 and INT8 plans)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (extra trt-rtx)")
    from walt_export.engine_build import EngineBuildError, build_engine

    directory, manifest = micro_artifacts
    assert len(build_engine(directory / "base.fp16.attention.onnx", manifest.stage("base"), trt).plan) > 10_000
    with pytest.raises(EngineBuildError, match="Attention operation was not supported by a dedicated kernel"):
        build_engine(directory / "base.attention.onnx", manifest.stage("base"), trt)



def test_artifact_files_get_the_usual_permissions(micro_artifacts):
    import os

    directory, _ = micro_artifacts
    umask = os.umask(0)
    os.umask(umask)
    assert (directory.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in directory.iterdir()} == {0o666 & ~umask}


def test_an_export_removes_what_a_killed_one_left_and_waits_for_no_other(tmp_path, micro):
    """kill -9 during `walt-export onnx` leaves `.NAME.XXXX.tmp/` (and, mid-swap, `.NAME.XXXX.old/`) beside --out:
    the next export removes them under the artifact lock; while another export holds the lock, it is refused."""
    from runtime.files import BusyError, artifact_lock_file
    from walt_export.onnx_export import export_artifacts

    out = tmp_path / "micro"
    for stale in (".micro.k1ll.tmp", ".micro.k2ll.old"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "base.onnx").write_bytes(b"\0" * 1000)

    def failing(name):
        raise RuntimeError("stop before exporting anything")

    holder = subprocess.Popen([sys.executable, "-c", f"from runtime.files import artifact_lock\nimport sys\n"
                               f"held = artifact_lock({str(out)!r})\nheld.__enter__()\nprint('held', flush=True)\n"
                               "sys.stdin.read()"], cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"another walt-export command is writing {out}"):
            export_artifacts(micro.config, failing, out, {"preset": "micro", "seed": 0})
        assert (tmp_path / ".micro.k1ll.tmp").exists()  # a live export's staging is not touched
    finally:
        holder.communicate("")
    with pytest.raises(RuntimeError, match="stop before"):
        export_artifacts(micro.config, failing, out, {"preset": "micro", "seed": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [artifact_lock_file(out).name]  # nothing else, old or new
