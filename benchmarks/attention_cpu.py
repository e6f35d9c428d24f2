#!/usr/bin/env python3
"""How fast attention can run on this CPU at a preset's window shapes, and what that bounds a denoiser call to.

    python -m benchmarks.attention_cpu --preset tiny --out attention_cpu.json

For every distinct attention of the denoisers (`walt_export.flops.attention_shapes`: spatial and spatiotemporal
window self-attention with its relative-position bias, text cross-attention with its mask; the batch `generate`
uses), timed interleaved, `--repeats` times after one warm-up round, median:
- onnxruntime's `Attention` operator (opset 23, the attention variant's node; CPU EP);
- PyTorch's `scaled_dot_product_attention` (eager, the CPU kernel PyTorch picks; the model's mask as it is);
- onnxruntime's `Softmax` alone over the scores, shape (windows, heads, queries, keys): what every kernel that writes
  Q K^T to memory (onnxruntime's `Attention`, the canonical file's MatMul-Softmax-MatMul) pays besides the two
  products;
- a float32 2048^3 `torch.mm`, the same matmul peak `walt-export bench` uses.

Per shape: each kernel's milliseconds and its fraction of the peak (FLOPs of Q K^T and the weighted sum, FLOP
model). Per denoiser call, the limit these kernels set: every attention of the call at the fastest kernel measured
for its shape, and every other FLOP of the call (FLOP model) at the peak; a runtime built on these kernels is no
faster, and no closer to the peak. Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time

import numpy as np

from runtime.cli import run_command
from runtime.files import atomic_output, check_output
from runtime.request import Count, parse_as
from walt_export.bench import MATMUL_SIZE, matmul_seconds
from walt_export.config import DENOISER_NAMES, PRESETS
from walt_export.flops import AttentionShape, attention_shapes, denoiser_flops, generate_batch

KERNELS = ("onnxruntime Attention", "torch SDPA", "onnxruntime Softmax")


def _session(node, inputs: dict[str, tuple[int, ...]]):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                                                    for name, shape in inputs.items()],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kernels(shape: AttentionShape, bias: bool, seed: int = 0) -> dict[str, object]:
    """The three calls to time for one attention shape, each a no-argument callable on seeded inputs. The mask:
    self-attention's relative-position bias (1, heads, L, L) where the config has one; cross-attention's
    additive text mask, expanded to (windows, 1, L, L + Lt) as onnxruntime's `Attention` requires (PyTorch gets the
    model's (windows, 1, 1, L + Lt))."""
    import torch
    from onnx import helper

    n, heads, length, keys, d = (shape.windows, shape.heads, shape.query_length, shape.key_length, shape.head_dim)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, heads, length, d), dtype=np.float32)
    k, v = (rng.standard_normal((n, heads, keys, d), dtype=np.float32) for _ in range(2))
    mask = None
    if shape.kind == "cross":
        mask = np.zeros((n, 1, length, keys), np.float32)
    elif bias:
        mask = rng.standard_normal((1, heads, length, keys), dtype=np.float32)
    feeds = {"q": q, "k": k, "v": v, **({} if mask is None else {"mask": mask})}
    attention = _session(helper.make_node("Attention", list(feeds), ["out"], scale=d**-0.5),
                         {name: x.shape for name, x in feeds.items()})
    scores = rng.standard_normal((n, heads, length, keys), dtype=np.float32)
    softmax = _session(helper.make_node("Softmax", ["scores"], ["out"], axis=-1), {"scores": scores.shape})
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    if mask is not None and shape.kind == "cross":
        mask = mask[:, :, :1]  # PyTorch broadcasts the model's (n, 1, 1, S) mask itself
    tmask = None if mask is None else torch.from_numpy(mask)
    return {
        "onnxruntime Attention": lambda: attention.run(None, feeds),
        "torch SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask),
        "onnxruntime Softmax": lambda: softmax.run(None, {"scores": scores}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny", help="the config (default tiny)")
    parser.add_argument("--stages", nargs="+", choices=DENOISER_NAMES, help="denoisers (default: all)")
    parser.add_argument("--repeats", type=parse_as(Count), default=10, help="timed rounds, >= 1 (default 10)")
    parser.add_argument("--out", help="also write the results to this .json file")
    args = parser.parse_args(argv)
    return run_command(parser.prog, False, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.out:
        check_output(args.out, "--out", "file", suffix=".json")
    cfg = PRESETS[args.preset]
    text_length = cfg.text_encoder.max_length if cfg.text_encoder is not None else 0
    stages = args.stages or list(cfg.denoisers())
    per_stage = {name: attention_shapes(getattr(cfg, name), generate_batch(cfg, name), text_length)
                 for name in stages}

    def key(shape: AttentionShape, stage: str) -> tuple:  # a shape, and whether its layers have the bias
        return (*shape.model_dump(exclude={"layer"}).values(), getattr(cfg, stage).relative_position_bias)

    distinct: dict[tuple, tuple[list[str], AttentionShape]] = {}  # shared by several layers and stages
    for name, shapes in per_stage.items():
        for s in shapes:
            names = distinct.setdefault(key(s, name), ([], s))[0]
            if name not in names:
                names.append(name)
    calls = {k: kernels(s, bias=k[-1]) for k, (_, s) in distinct.items()}
    seconds = collections.defaultdict(list)
    matmuls = []
    for repeat in range(args.repeats + 1):  # one warm-up round
        matmuls.append(matmul_seconds())
        for k, fns in calls.items():
            order = KERNELS[repeat % 3:] + KERNELS[:repeat % 3]
            for kernel in order:
                start = time.perf_counter()
                fns[kernel]()
                if repeat:
                    seconds[(k, kernel)].append(time.perf_counter() - start)
    peak = 2 * MATMUL_SIZE**3 / statistics.median(matmuls[1:])
    median_ms = {k: {kernel: statistics.median(seconds[(k, kernel)]) * 1e3 for kernel in KERNELS} for k in distinct}

    rows = []
    print(f"{args.preset}: attention on this CPU, {args.repeats} interleaved rounds, median; float32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'stages':<14}{'kind':<16}{'windows x heads x L x S x d':>30}{'GFLOP':>8}"
          + "".join(f"{kernel + ' ms':>25}" for kernel in KERNELS) + f"{'ORT':>7}{'SDPA':>7}")
    for k, (names, shape) in distinct.items():
        ms = median_ms[k]
        fraction = {kernel: shape.flops / (ms[kernel] / 1e3) / peak for kernel in KERNELS[:2]}
        rows.append({"stages": names, **shape.model_dump(exclude={"layer"}), "flops": shape.flops, "ms": ms,
                     "peak_fraction": fraction})
        dims = f"{shape.windows}x{shape.heads}x{shape.query_length}x{shape.key_length}x{shape.head_dim}"
        print(f"{','.join(names):<14}{shape.kind:<16}{dims:>30}{shape.flops / 1e9:>8.3f}"
              + "".join(f"{ms[kernel]:>25.2f}" for kernel in KERNELS)
              + f"{fraction['onnxruntime Attention']:>7.0%}{fraction['torch SDPA']:>7.0%}")
    calls_bound = {}
    print("limit of one denoiser call (each attention at the fastest kernel above, every other FLOP at the peak):")
    for name, shapes in per_stage.items():
        total = denoiser_flops(getattr(cfg, name), generate_batch(cfg, name), text_length)
        attention = sum(s.flops for s in shapes)
        fastest = (total - attention) / peak + sum(min(median_ms[key(s, name)][kernel] for kernel in KERNELS[:2])
                                                   for s in shapes) / 1e3
        calls_bound[name] = {"flops": total, "attention_flops": attention, "fastest_ms": fastest * 1e3,
                             "peak_fraction": total / fastest / peak}
        print(f"  {name}: {total / 1e9:.2f} GFLOP, {attention / total:.0%} in attention; at best "
              f"{fastest * 1e3:.1f} ms, {total / fastest / peak:.0%} of the peak")
    if args.out:
        with atomic_output(args.out) as path:
            path.write_text(json.dumps({"preset": args.preset, "repeats": args.repeats,
                                        "matmul_gflops_per_s": peak / 1e9, "rows": rows, "calls": calls_bound},
                                       indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
