"""The Triton window-attention kernel against the reference op: on a CUDA GPU where there is one, else on the CPU
under TRITON_INTERPRET=1 (conftest)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (extra kernels)")  # CPU: TRITON_INTERPRET, conftest

from runtime.compare import Tolerance, assert_close  # noqa: E402
from tests.walt_export.test_window_attention import qkv  # noqa: E402
from walt_export.window_attention.op import SPATIAL_WINDOW, resolve_window, window_attention  # noqa: E402
from walt_export.window_attention.kernel import window_attention_triton  # noqa: E402

TOLERANCES = {torch.float32: Tolerance(atol=1e-5, rtol=1e-5), torch.float16: Tolerance(atol=2e-3, rtol=2e-3)}
# (token grid (T, H, W), window, head dim): spatial and spatiotemporal, a head dim that is not a power of two,
# windows longer than one key block (L = 96 > 64)
CASES = [((3, 4, 6), SPATIAL_WINDOW, 8), ((3, 4, 4), (3, 2, 2), 16), ((2, 8, 12), (2, 4, 12), 12),
         ((5, 4, 4), (1, 2, 2), 8)]


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("grid, window, d", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_the_reference_op(generator, dtype, grid, window, d, with_bias):
    heads = 2
    q, k, v = qkv(generator, grid, n=4, d=d, dtype=dtype)
    wt, wh, ww = resolve_window(window, grid)
    length = wt * wh * ww
    bias = torch.randn(heads, length, length, generator=generator).to(dtype) if with_bias else None
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter takes CPU tensors, a GPU its own
    out = window_attention_triton(*(x.to(device) for x in (q, k, v)), window, d**-0.5,
                                  None if bias is None else bias.to(device)).cpu()
    expected = window_attention(q.float(), k.float(), v.float(), window, d**-0.5,
                                None if bias is None else bias.float())
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out.float(), expected, TOLERANCES[dtype], f"{dtype} window {window} d {d} bias {with_bias}")


def test_ahead_of_time_ptx_in_tensorrt_launch_order():
    """The plugin's AOT kernel compiles to PTX without a GPU (outside the interpreter, hence a subprocess):
    4 input pointers, the 11 int32 extras, the output pointer, then Triton's two scratch pointers."""
    import json
    import os
    import subprocess
    import sys

    script = """
import json, re
from walt_export.window_attention.kernel import AOT_INT_ARGS, compile_aot
out = []
for dtype, cc, length in (("fp16", 87, 448), ("fp32", 90, None)):
    k = compile_aot(dtype, 0.125, 64, length, compute_capability=cc)
    entry = k.ptx[k.ptx.index(".visible .entry " + k.name):]
    params = re.findall(r"\\.param \\.(u64 \\.ptr|u32)", entry[:entry.index(")")])
    out.append({"target": re.search(r"\\.target (\\w+)", k.ptx).group(1), "params": params,
                "warps": k.num_warps, "shared": k.shared_bytes, "block_m": k.block_m, "ints": len(AOT_INT_ARGS)})
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for result, target in zip(json.loads(done.stdout.splitlines()[-1]), ("sm_87", "sm_90a"), strict=True):
        ptr, i32 = "u64 .ptr", "u32"
        assert result["target"] == target
        assert result["params"] == [ptr] * 4 + [i32] * result["ints"] + [ptr] + [ptr] * 2, result["params"]
        assert result["warps"] >= 1 and 0 < result["shared"] <= 228 * 1024 and result["block_m"] == 64
