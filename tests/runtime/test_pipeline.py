"""The runtime cascade on the micro artifact: parity with PyTorch, modes, mp4 output, CLI, batch rendering."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.compare import Tolerance, assert_close
from runtime.manifest import ArtifactError
from runtime.pipeline import Pipeline, split_batch
from runtime.request import Request
from runtime.video import read_video, to_frames
from tests import kill_trials

ROOT = Path(__file__).resolve().parents[2]
LATENT_TOL = Tolerance(atol=1e-4, rtol=1e-4)  # onnxruntime vs PyTorch through 3 steps x 3 stages x 2 clips
BATCH_TOL = Tolerance(atol=1e-4, rtol=1e-4)  # one backend at batch 8 vs 2 rows: kernels block differently
FRAME_LEVELS = 1  # uint8 levels two decodes of one latent may differ by (rounding of float32 differences)
STEPS = 3


def runtime_cli(*args, block_torch=False, **kwargs):
    code = "import sys\n"
    if block_torch:
        code += "sys.modules['torch'] = None  # `import torch` raises ImportError\n"
    code += "from runtime.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def test_onnxruntime_and_pytorch_give_the_same_latents_and_frames(micro_artifacts):
    from walt_export.torch_runner import torch_pipeline

    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as onnx, torch_pipeline(directory) as reference:
        videos = [p.generate("a red bicycle", seed=7, steps=STEPS, frames=13) for p in (onnx, reference)]
        opened = {name: onnx.runner(name).runner.path.name for name in ("base", "sr2", "tokenizer_decoder")}
    assert opened == {"base": "base.attention.onnx", "sr2": "sr2.attention.onnx",  # onnxruntime_file's choice
                      "tokenizer_decoder": "tokenizer_decoder.onnx"}
    actual, expected = videos
    assert actual.frames.shape == (13, 128, 128, 3) and actual.frames.dtype == np.uint8
    for stage in ("base", "sr1", "sr2"):
        assert len(actual.latents[stage]) == 2  # two clips: the second continues the first
        for clip, (a, e) in enumerate(zip(actual.latents[stage], expected.latents[stage], strict=True)):
            assert_close(a, e, LATENT_TOL, f"{stage} latent of clip {clip}")
    assert np.abs(actual.frames.astype(int) - expected.frames).max() <= 1  # rounding to uint8


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_batch_gives_the_videos_of_single_calls(micro_artifacts, backend):
    """Five two-clip videos in one call: batches of 4 and 1 (the manifest's profile: 8 rows, 2 per guided video),
    each video equal to the single call with its seed, whatever its neighbours (two share a prompt)."""
    from walt_export.torch_runner import torch_pipeline

    directory, _ = micro_artifacts
    prompts, seeds = ["a red bicycle", "a cat", "waves", "a red bicycle", "a boat"], [7, 1, 2, 8, 3]
    with (Pipeline.from_artifacts(directory) if backend == "onnxruntime" else torch_pipeline(directory)) as pipe:
        assert pipe.videos_per_batch(pipe.check(Request(prompt="x"))) == (1, 4)
        batch = pipe.generate(prompts, seed=seeds, steps=2, frames=13)
        assert pipe.timings["base"].calls == 2 * 2 * 2  # (4 + 1 videos) x 2 clips x 2 steps
        singles = [pipe.generate(p, seed=s, steps=2, frames=13) for p, s in zip(prompts, seeds, strict=True)]
    for i, (got, expected) in enumerate(zip(batch, singles, strict=True)):
        for stage in ("base", "sr1", "sr2"):
            for clip in range(2):
                assert_close(got.latents[stage][clip], expected.latents[stage][clip], BATCH_TOL,
                             f"video {i} ({backend}), {stage} latent of clip {clip}")
        assert np.abs(got.frames.astype(int) - expected.frames).max() <= FRAME_LEVELS, f"video {i} ({backend})"


def test_batches_are_split_to_the_profile_and_padded_to_a_static_one():
    assert split_batch(7, 1, 4) == [(4, 4), (3, 3)]  # dynamic 1..8 rows, guided: 4 videos at most
    assert split_batch(5, 2, 2) == [(2, 2), (2, 2), (1, 2)]  # static: the last one padded
    assert split_batch(1, 3, 3) == [(1, 3)]
    with pytest.raises(ValueError, match=r"no batch size fits \[4, 2\]"):
        split_batch(3, 4, 2)


def test_streamed_decoding_equals_the_whole_clip_decode(micro_artifacts):
    """The decoder runs one latent frame at a time (the first through tokenizer_decoder, the rest through
    tokenizer_decoder_step), and stream() yields the frames generate() returns."""
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        video = pipe.generate("a boat", seed=0, steps=2)
        calls = (pipe.timings["tokenizer_decoder"].calls, pipe.timings["tokenizer_decoder_step"].calls)
        whole = to_frames(pipe.runner("tokenizer_decoder").infer({"latent": video.latents["sr2"][0]})["video"])
        streamed = np.stack(list(pipe.stream("a boat", seed=0, steps=2)))
    assert calls == (1, 2)  # 3 latent frames: 1 + 2 chunks
    assert np.abs(video.frames.astype(int) - whole).max() <= FRAME_LEVELS  # rounding of the chunked convolutions
    np.testing.assert_array_equal(streamed, video.frames)


def test_a_suspended_stream_holds_the_pipeline_and_says_so_instead_of_deadlocking(micro_artifacts):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        frames = pipe.stream("a boat", seed=0, steps=1)
        first = next(frames)
        with pytest.raises(RuntimeError, match="a stream of this pipeline is still open in this thread"):
            pipe.generate("a boat", seed=0, steps=1)
        frames.close()  # releases the pipeline
        np.testing.assert_array_equal(pipe.generate("a boat", seed=0, steps=1).frames[0], first)


def test_streaming_holds_a_chunk_not_the_video(micro_artifacts):
    """The numpy memory a stream holds does not grow with the video's length (5 clips against 1)."""
    import tracemalloc

    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        peaks = {}
        for frames in (9, 25):
            tracemalloc.start()
            count = sum(1 for _ in pipe.stream("waves", seed=3, steps=1, frames=frames))
            peaks[frames] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert count == frames
    video_bytes = 25 * 3 * 128 * 128 * 4  # the float32 video of 25 frames, which the old decode held (twice)
    assert peaks[25] < peaks[9] + video_bytes / 4, peaks


def test_low_memory_mode_gives_the_same_video_holding_no_runner_between_stages(micro_artifacts):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        expected = pipe.generate("waves", seed=3, steps=2, frames=13)
    with Pipeline.from_artifacts(directory, low_memory=True, memory_report=True) as pipe:
        video = pipe.generate("waves", seed=3, steps=2, frames=13)
        assert pipe._runners == {}  # each released after its stage
        report = pipe.memory.report()
    np.testing.assert_array_equal(video.frames, expected.frames)
    opens = {s.stage: s.opens for s in report.stages}
    assert opens == {"text_encoder": 1, "base": 2, "sr1": 2, "sr2": 2, "tokenizer_decoder": 1,
                     "tokenizer_decoder_step": 2, "tokenizer_encoder": 1}  # two clips: every denoiser twice
    # micro's models are too small to measure (RSS moves by pages the allocator reuses); BENCHMARKS.md has tiny's
    assert all(s.opened >= 0 and s.peak > 0 for s in report.stages), report.table()
    assert report.peak >= max(s.peak for s in report.stages)


def test_onnxruntime_runs_the_attention_variant_where_there_is_one(micro_artifacts):
    from runtime.runners import onnxruntime_file

    _, manifest = micro_artifacts
    base = manifest.stage("base")
    assert onnxruntime_file(base, "fp16").file == "base.fp16.attention.onnx"
    assert onnxruntime_file(base, "fp32", "tensorrt").file == "base.onnx"  # TensorRT EP: may not build it in FP32
    older = base.model_copy(update={"files": tuple(f for f in base.files if f.variant != "attention")})
    assert onnxruntime_file(older, "fp32").file == "base.onnx"  # exported before the variant existed
    assert onnxruntime_file(manifest.stage("tokenizer_encoder"), "fp32").file == "tokenizer_encoder.onnx"


def test_same_seed_same_video_other_seed_other_video(micro_artifacts):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        a, b, c = (pipe.generate("a dog", seed=s, steps=2).frames for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1


def test_long_video_continues_the_first_clip(micro_artifacts):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        one = pipe.generate("waves", seed=3, steps=2)
        long = pipe.generate("waves", seed=3, steps=2, frames=17)
        with pytest.raises(ValueError, match="frames=10 is not a length this artifact makes: 9, 13, 17"):
            pipe.generate("waves", frames=10)
    assert long.frames.shape[0] == 17 and len(long.latents["base"]) == 3
    np.testing.assert_array_equal(long.frames[:9], one.frames)  # the first clip is unchanged


def test_image_to_video_conditions_on_the_encoded_image(micro_artifacts):
    directory, _ = micro_artifacts
    image = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    with Pipeline.from_artifacts(directory) as pipe:
        video = pipe.generate("a boat", seed=0, steps=2, image=image)
        encoded = pipe.runner("tokenizer_encoder").infer(
            {"video": (image.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None, :, None]})["latent"]
        with pytest.raises(ValueError, match=r"the image must be \(128, 128, 3\) uint8"):
            pipe.generate("a boat", image=image[:64])
    np.testing.assert_array_equal(video.latents["sr2"][0][:, :, :1], encoded)


def test_conditioning_errors(micro_artifacts):
    directory, _ = micro_artifacts
    with Pipeline.from_artifacts(directory) as pipe:
        with pytest.raises(ValueError, match="text-to-video: pass a prompt"):
            pipe.generate(class_id=3)


def test_generate_cli_writes_an_h264_mp4_without_torch(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    out = tmp_path / "cat.mp4"
    result = runtime_cli("generate", "--artifacts", str(directory), "--prompt", "a cat", "--out", str(out),
                         "--steps", "2", "--png-dir", str(tmp_path / "png"), "--progress", "on", block_torch=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"base .*2/2 \[[0-9:]+<[0-9:]+, +[0-9.]+(step/s|s/step)\]", result.stderr), result.stderr  # tqdm
    assert "wrote" in result.stdout
    frames, fps, codec = read_video(out)
    assert frames.shape == (9, 128, 128, 3) and fps == 8.0 and codec == "h264"
    assert len(list((tmp_path / "png").glob("frame_*.png"))) == 9
    assert "torch" not in result.stderr


def test_generate_cli_streams_a_long_video_in_low_memory_mode_with_a_memory_report(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    out, report = tmp_path / "long.mp4", tmp_path / "memory.json"
    result = runtime_cli("generate", "--artifacts", str(directory), "--prompt", "waves", "--out", str(out),
                         "--steps", "1", "--frames", "29", "--low-memory", "--memory-report", str(report), "-q",
                         block_torch=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"wrote .*long\.mp4: 29 frames 128x128 @ 8 fps in [0-9.]+ s \(the first frame after [0-9.]+ s\)",
                     result.stdout), result.stdout
    frames, fps, codec = read_video(out)
    assert frames.shape == (29, 128, 128, 3) and codec == "h264"
    stages = {s["stage"]: s for s in json.loads(report.read_text())["stages"]}
    assert stages["base"]["opens"] == 6  # six clips, each denoiser opened for each
    assert re.search(r"\npeak RSS \d+ MiB \(at the start \d+ MiB\), low-memory mode", result.stdout)  # the table


def test_tampered_or_missing_artifacts_are_refused(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = bytearray((copy / "base.attention.onnx").read_bytes())  # the file onnxruntime runs (onnxruntime_file)
    data[len(data) // 2] ^= 0x01
    (copy / "base.attention.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="base.attention.onnx does not match the manifest"):
        Pipeline.from_artifacts(copy)
    result = runtime_cli("generate", "--artifacts", str(tmp_path / "nothing"), "--prompt", "x", "--out", "x.mp4")
    assert result.returncode == 1 and result.stderr.startswith("python -m runtime: error:")
    assert "walt-export onnx" in result.stderr and "Traceback" not in result.stderr


def write_jobs(path, jobs):
    path.write_text("\n".join(json.dumps(job) for job in jobs) + "\n")
    return path


def test_render_reports_every_bad_line_and_renders_nothing(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "ok", "output": "ok.mp4"}\n{"prompt": "x", "output": "x.mp4", "frames": 10}\n'
                    'not json\n{"prompt": "y", "output": "ok.mp4"}\n{"prompt": "z", "output": "z.mp4", "speed": 2}\n')
    result = runtime_cli("render", "--artifacts", str(directory), "--jobs", str(jobs), "--out-dir", str(tmp_path / "o"))
    assert result.returncode == 1
    for line in ("line 2: frames=10", "line 3: Invalid JSON", "line 4: output 'ok.mp4' is also written by line 1",
                 "line 5: speed: Extra inputs are not permitted"):
        assert line in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_render_resumes_after_being_killed_mid_job(micro_artifacts, tmp_path):
    directory, _ = micro_artifacts
    out = tmp_path / "videos"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": f"clip {i}", "seed": i, "output": f"clip{i}.mp4",
                                                 "steps": 250} for i in range(3)])  # seconds per job
    args = ["render", "--artifacts", str(directory), "--jobs", str(jobs), "--out-dir", str(out), "-q"]
    code = "import sys\nfrom runtime.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    kill_trials.kill_once_written(process, out / "clip0.mp4", after=0.3, timeout=120)  # into the second job
    finished = sorted(p.name for p in out.glob("*.mp4") if not p.name.startswith("."))  # final names only
    assert "clip0.mp4" in finished and "clip2.mp4" not in finished
    for name in finished:  # whatever has its final name is complete
        assert read_video(out / name)[0].shape[0] == 9
    first = (out / "clip0.mp4").stat().st_mtime_ns
    (out / ".clip1.x1y2z3.tmp.mp4").write_bytes(b"half a video")  # as left by a kill while encoding

    result = runtime_cli(*args)
    assert result.returncode == 0, result.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    last_run = {Path(r["output"]).name: r["status"] for r in results[-3:]}
    assert last_run["clip0.mp4"] == "skipped" and last_run["clip2.mp4"] == "done"
    assert (out / "clip0.mp4").stat().st_mtime_ns == first  # not redone
    assert sorted(p.name for p in out.iterdir()) == [".locks", "clip0.mp4", "clip1.mp4", "clip2.mp4", "results.jsonl"]
    assert {p.suffix for p in (out / ".locks").iterdir()} == {".lock"}  # the stale temporary file is gone



def test_class_conditional_cascade_end_to_end(micro, tmp_path):
    """A one-stage class-conditional cascade at micro size: export, then the same video from both backends."""
    from walt_export.cascade import build
    from walt_export.config import CascadeConfig, DenoiserConfig
    from walt_export.onnx_export import export_artifacts
    from walt_export.torch_runner import torch_pipeline

    tk = micro.config.tokenizer
    base = DenoiserConfig(latent_size=(3, 16, 16), patch_size=4, hidden_size=32, num_heads=2, depth=2,
                          window=(3, 2, 2), conditioning="class", num_classes=10)
    cfg = CascadeConfig(name="micro-class", frames=9, height=128, width=128, tokenizer=tk, base=base)
    cascade = build(cfg, seed=0)
    manifest = export_artifacts(cfg, lambda name: getattr(cascade, name), tmp_path / "art", {"preset": "micro-class",
                                                                                            "seed": 0})
    assert list(manifest.stages) == ["base", "tokenizer_encoder", "tokenizer_decoder", "tokenizer_decoder_step"]
    with Pipeline.from_artifacts(tmp_path / "art") as onnx, torch_pipeline(tmp_path / "art") as reference:
        actual, expected = (p.generate(class_id=4, seed=2, steps=STEPS) for p in (onnx, reference))
        with pytest.raises(ValueError, match=r"class-conditional: pass a class id in \[0, 10\)"):
            onnx.generate("a prompt")
    assert_close(actual.latents["base"][0], expected.latents["base"][0], LATENT_TOL, "class-conditional latent")
    assert actual.frames.shape == (9, 128, 128, 3)
