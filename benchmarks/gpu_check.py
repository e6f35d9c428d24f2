"""Everything this project wants from a CUDA GPU, in one run of a few minutes (`make gpu-check`): prints tables and
writes one JSON.

    python -m benchmarks.gpu_check --out gpu_check.json [--no-compile] [--no-tests]

1. The Triton window kernel against PyTorch's `scaled_dot_product_attention` on partitioned windows at the t2v
   window shapes (spatial 1x16x28, spatiotemporal 5x8x14, batch 2 x 16 heads, head dims 64, 88 and 128, float16
   and bfloat16): max error against float32 and TFLOP/s of both (`benchmarks.window_attention_gpu`).
2. One float16 forward of the full-size t2v base, SR1 and SR2 at batch 2 (the guided pair), random weights (timing
   does not depend on them): PyTorch eager with the op's SDPA path, eager with the Triton kernel as the op's CUDA
   implementation, and `torch.compile` of the latter; median ms of `triton.testing.do_bench`, TFLOP/s from the
   FLOP model (`walt_export.flops`) and the fraction of the card's dense FP16 peak (`walt_export.flops.PEAKS`,
   H100/H200; other cards: no fraction).
3. The project's CUDA tests (`pytest -m gpu` and the Triton kernel's tests), their summary line.

Needs torch with CUDA and Triton; no TensorRT (nor onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from benchmarks import window_attention_gpu
from walt_export.cascade import build_component
from walt_export.config import PRESETS
from walt_export.export_specs import BATCH, export_specs
from walt_export.flops import GUIDED_BATCH, PEAKS, stage_flops

DENOISERS = ("base", "sr1", "sr2")
TESTS = ["tests/walt_export/test_cuda.py", "tests/runtime/test_tensorrt_runner.py",
         "tests/walt_export/test_window_attention_kernel.py", "tests/walt_export/test_window_attention.py"]


def card_peak() -> float | None:
    """The dense FP16 tensor-core peak of this card in FLOP/s, where `PEAKS` knows it."""
    name = torch.cuda.get_device_name()
    return PEAKS["H100/H200 SXM dense FP16/BF16"] if ("H100" in name or "H200" in name) else None


def use_triton_for_the_op() -> None:
    """Run `wattn::window_attention3d` on CUDA through the Triton kernel (from here on, in this process)."""
    from walt_export.window_attention.kernel import window_attention_triton

    @torch.library.register_kernel("wattn::window_attention3d", "cuda")
    def _triton(q, k, v, bias, wt, wh, ww, scale):
        return window_attention_triton(q, k, v, (wt, wh, ww), scale, bias)


def forward_rows(compile_: bool) -> list[dict]:
    """Part 2 (see the module docstring): one row per (denoiser, mode)."""
    import triton.testing

    cfg = PRESETS["t2v"]
    specs, flops, peak = export_specs(cfg), stage_flops(cfg), card_peak()
    models, inputs = {}, {}
    for name in DENOISERS:
        spec = specs[name]
        module = build_component(cfg, name, 0, "meta").to_empty(device="cuda").half().eval()
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02)
        models[name] = module
        sample = spec.sample_inputs(torch.Generator().manual_seed(0), **{BATCH: GUIDED_BATCH})
        inputs[name] = [x.to("cuda", torch.float16) if x.is_floating_point() else x.to("cuda") for x in sample]
    modes = [("eager, SDPA op", False, False), ("eager, Triton op", True, False)]
    if compile_:
        modes.append(("torch.compile, Triton op", True, True))
    rows, modes_run_triton = [], False
    print(f"\n{'denoiser':<9}{'mode':<26}{'ms':>9}{'TFLOP/s':>9}{'of peak':>8}{'compile s':>10}")
    for mode, triton_op, compiled in modes:
        if triton_op and not modes_run_triton:  # registered once; the SDPA mode runs before it
            use_triton_for_the_op()
            modes_run_triton = True
        for name in DENOISERS:
            spec, module = specs[name], models[name]
            run = torch.compile(module) if compiled else module
            start = time.perf_counter()
            with torch.no_grad():
                spec.call(run, *inputs[name])  # compiles here
                torch.cuda.synchronize()
                setup = time.perf_counter() - start
                ms = triton.testing.do_bench(lambda: spec.call(run, *inputs[name]), warmup=5, rep=50,
                                             return_mode="median")
            rate = flops[name] / ms / 1e9
            row = {"denoiser": name, "mode": mode, "ms": ms, "tflops": rate, "flops": flops[name],
                   "peak_fraction": rate * 1e12 / peak if peak else None, "first_call_s": setup}
            rows.append(row)
            fraction = f"{row['peak_fraction']:.0%}" if peak else "-"
            print(f"{name:<9}{mode:<26}{ms:>9.2f}{rate:>9.1f}{fraction:>8}{setup if compiled else 0:>10.1f}")
    return rows


def run_tests() -> dict:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    summary = lines[-1] if lines else result.stderr.strip()[-500:]
    print(f"\nCUDA tests: {summary}")
    return {"returncode": result.returncode, "summary": summary, "tail": "\n".join(lines[-40:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON output")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes)")
    parser.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (none here)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dense_fp16_peak_tflops": (card_peak() or 0) / 1e12 or None}
    report["window_attention"] = window_attention_gpu.run(list(window_attention_gpu.HEAD_DIMS.values()))
    report["forward"] = forward_rows(not args.no_compile)
    if not args.no_tests:
        report["tests"] = run_tests()
    report["seconds"] = time.perf_counter() - started
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 0 if report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
