"""The window-attention op on a CUDA GPU at the t2v shapes: the Triton kernel vs PyTorch's
`scaled_dot_product_attention` on partitioned windows (the op's eager path), timed interleaved, with their error
against a float32 reference.

    python -m benchmarks.window_attention_gpu --out window_attention_gpu.json

Shapes [P Table 8, docs/model_spec.md]: classifier-free guidance batch 2 x 16 heads, the 5x16x28 token grid that
all three t2v denoisers see, spatiotemporal windows 5x8x14 (560 tokens) and spatial windows 1x16x28 (448 tokens),
with the relative-position bias; head dim 128 (base, d 2048), and with --head-dims also 88 (SR1, d 1408) and 64
(SR2, d 1024). Prints a table and writes JSON; each time is the median of `triton.testing.do_bench`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from walt_export.window_attention.op import resolve_window, window_attention

GRID = (5, 16, 28)
WINDOWS = {"spatiotemporal 5x8x14": (5, 8, 14), "spatial 1x16x28": (1, -1, -1)}
HEADS, BATCH, HEAD_DIM = 16, 2, 128
HEAD_DIMS = {"base": 128, "sr1": 88, "sr2": 64}  # t2v: hidden size / 16 heads


def measure(dtype: torch.dtype, window, with_bias: bool, generator: torch.Generator, head_dim: int = HEAD_DIM) -> dict:
    import triton.testing

    from walt_export.window_attention.kernel import window_attention_triton

    n = BATCH * HEADS
    q, k, v = (torch.randn(n, *GRID, head_dim, generator=generator, device="cuda") for _ in range(3))
    length = torch.Size(resolve_window(window, GRID)).numel()
    bias = torch.randn(HEADS, length, length, generator=generator, device="cuda") if with_bias else None
    scale = head_dim**-0.5
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = window_attention(q, k, v, window, scale, bias)  # float32
    cast = [x.to(dtype) for x in (q, k, v)]
    cast_bias = bias.to(dtype) if bias is not None else None
    runs = {"triton": lambda: window_attention_triton(*cast, window, scale, cast_bias),
            "sdpa": lambda: window_attention(*cast, window, scale, cast_bias)}
    row = {}
    for name, fn in runs.items():
        error = (fn().float() - reference).abs()
        row[f"{name}_max_error"] = float(error.max())
    times = {name: [] for name in runs}
    for _ in range(3):  # interleaved rounds
        for name, fn in runs.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    flops = 4 * n * GRID[0] * GRID[1] * GRID[2] * length * head_dim
    for name, values in times.items():
        ms = sorted(values)[1]
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = flops / ms / 1e9
    row["speedup"] = row["sdpa_ms"] / row["triton_ms"]
    return row


def run(head_dims: list[int]) -> list[dict]:
    """Every (window, dtype, bias, head dim) row, printed as a table as it is measured (needs a CUDA GPU)."""
    generator = torch.Generator("cuda").manual_seed(0)
    rows = []
    header = f"{'window':<22} {'dtype':<9} {'bias':<5} {'hd':>4} {'triton ms':>9} {'sdpa ms':>9} {'speedup':>7} " \
             f"{'triton TF/s':>11} {'sdpa TF/s':>9} {'triton err':>10} {'sdpa err':>9}"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n{header}")
    for head_dim in head_dims:
        for label, window in WINDOWS.items():
            for dtype in (torch.float16, torch.bfloat16):
                for with_bias in (True, False):
                    try:
                        row = measure(dtype, window, with_bias, generator, head_dim)
                    except Exception as e:  # noqa: BLE001 (a benchmark row that fails is reported, the others run)
                        row = {"error": f"{type(e).__name__}: {e}"}
                    row |= {"window": label, "dtype": str(dtype).removeprefix("torch."), "bias": with_bias,
                            "head_dim": head_dim}
                    rows.append(row)
                    start = f"{label:<22} {row['dtype']:<9} {with_bias!s:<5} {head_dim:>4}"
                    if "error" in row:
                        print(f"{start} failed: {row['error'][:200]}")
                    else:
                        print(f"{start} {row['triton_ms']:>9.3f} {row['sdpa_ms']:>9.3f} {row['speedup']:>7.2f} "
                              f"{row['triton_tflops']:>11.1f} {row['sdpa_tflops']:>9.1f} "
                              f"{row['triton_max_error']:>10.2e} {row['sdpa_max_error']:>9.2e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="window_attention_gpu.json", help="JSON output")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[HEAD_DIM],
                        help=f"head dims to measure (default {HEAD_DIM}; t2v: {' '.join(map(str, HEAD_DIMS.values()))})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (none here)", file=sys.stderr)
        return 1
    rows = run(args.head_dims)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
