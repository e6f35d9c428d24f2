import itertools

import pytest
import torch

from runtime.compare import Tolerance, assert_close
from walt_export.window_attention import op as op_module
from walt_export.window_attention.op import SPATIAL_WINDOW, merge, partition, resolve_window, window_attention

TOLERANCES = {torch.float32: Tolerance(atol=1e-5, rtol=1e-5), torch.float64: Tolerance(atol=1e-12, rtol=1e-12)}
# (token grid (T, H, W), window); -1 = full extent
CASES = [((5, 8, 8), (5, 4, 4)), ((5, 4, 6), SPATIAL_WINDOW), ((3, 4, 4), (3, 2, 2)), ((5, 4, 6), (1, 2, 3)),
         ((1, 4, 6), (1, -1, 3))]


def reference(q, k, v, window, scale, bias=None, heads=1):
    """Plain softmax attention computed separately for every window, in float64."""
    n, t, h, w, d = q.shape
    wt, wh, ww = resolve_window(window, (t, h, w))
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, t0, h0, w0 in itertools.product(range(n), range(0, t, wt), range(0, h, wh), range(0, w, ww)):
        sl = (i, slice(t0, t0 + wt), slice(h0, h0 + wh), slice(w0, w0 + ww))
        qi, ki, vi = (x[sl].reshape(-1, d).double() for x in (q, k, v))
        scores = scale * qi @ ki.T
        if bias is not None:
            scores = scores + bias[i % heads].double()
        out[sl] = (scores.softmax(-1) @ vi).reshape(wt, wh, ww, d)
    return out


def qkv(generator, grid, n=4, d=8, dtype=torch.float32):
    return [torch.randn(n, *grid, d, generator=generator, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("grid, window", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_equals_attention_restricted_to_each_window(generator, dtype, grid, window, with_bias):
    heads = 2
    q, k, v = qkv(generator, grid, dtype=dtype)
    length = 1
    for size in resolve_window(window, grid):
        length *= size
    bias = torch.randn(heads, length, length, generator=generator, dtype=torch.float64).to(dtype) if with_bias else None
    out = window_attention(q, k, v, window, 0.3, bias)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference(q, k, v, window, 0.3, bias, heads), TOLERANCES[dtype], f"window {window}")


def test_spatial_window_is_full_attention_within_each_frame(generator):
    q, k, v = qkv(generator, (3, 4, 6))
    out = window_attention(q, k, v, SPATIAL_WINDOW, 8**-0.5)
    for t in range(3):
        frame = [x[:, t].reshape(4, 24, 8) for x in (q, k, v)]
        expected = torch.nn.functional.scaled_dot_product_attention(*frame).reshape(4, 4, 6, 8)
        assert_close(out[:, t], expected, TOLERANCES[torch.float32], f"frame {t}")


@pytest.mark.parametrize("grid, window", CASES[:4])
def test_perturbing_one_window_leaves_the_others_unchanged(generator, grid, window):
    q, k, v = qkv(generator, grid)
    out = window_attention(q, k, v, window, 0.5)
    wt, wh, ww = resolve_window(window, grid)
    inside = torch.zeros(grid, dtype=torch.bool)
    inside[-wt:, :wh, -ww:] = True  # one window: last in time, first in height, last in width
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, inside] *= 2.0
    k2[:, inside] += torch.randn(k2[:, inside].shape, generator=generator)
    v2[:, inside] += 1.0
    out2 = window_attention(q2, k2, v2, window, 0.5)
    assert torch.equal(out2[:, ~inside], out[:, ~inside])  # bit-identical outside
    assert (out2[:, inside] - out[:, inside]).abs().min() > 0  # changed inside


def test_partition_and_merge_are_inverse(generator):
    x = torch.randn(3, 4, 6, 10, 5, generator=generator)
    windows = partition(x, (2, 3, 5))
    assert windows.shape == (3 * 2 * 2 * 2, 30, 5)
    assert torch.equal(windows[0], x[0, :2, :3, :5].reshape(30, 5))
    assert torch.equal(merge(windows, (2, 3, 5), (4, 6, 10)), x)


def test_custom_op_registration_is_consistent(generator):
    q, k, v = qkv(generator, (3, 4, 4))
    bias = torch.randn(2, 12, 12, generator=generator)
    torch.library.opcheck(torch.ops.wattn.window_attention3d.default, (q, k, v, bias, 3, 2, 2, 0.25))
    torch.library.opcheck(torch.ops.wattn.window_attention3d.default, (q, k, v, None, 1, -1, -1, 0.25))


@pytest.mark.parametrize("args, message", [
    (dict(window=(2, 2, 2)), r"window \(2, 2, 2\) does not tile the token grid \(3, 4, 4\)"),
    (dict(bias=torch.zeros(3, 12, 12)), r"bias must be \[heads, 12, 12\] with heads dividing N=4"),
    (dict(k=torch.zeros(4, 3, 4, 4, 6)), "q, k, v must share one"),
])
def test_bad_inputs_are_explained(generator, args, message):
    q, k, v = qkv(generator, (3, 4, 4))
    call = dict(q=q, k=k, v=v, window=(3, 2, 2), scale=1.0, bias=None) | args
    with pytest.raises(ValueError, match=message):
        window_attention(**call)


def test_flop_counter_counts_the_op_like_full_attention_per_frame(generator):
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = qkv(generator, (3, 4, 6))
    with FlopCounterMode(display=False) as op_count:
        window_attention(q, k, v, SPATIAL_WINDOW, 1.0)
    with FlopCounterMode(display=False) as sdpa_count:
        torch.nn.functional.scaled_dot_product_attention(*(x.reshape(12, 24, 8) for x in (q, k, v)))
    assert op_count.get_total_flops() == sdpa_count.get_total_flops() == 4 * 4 * 72 * 24 * 8


GRADIENT_TOLERANCE = Tolerance(1e-10, 1e-9)  # float64: the op's backward vs autograd through the reference


@pytest.mark.parametrize("grid, window", [((2, 2, 3), (1, -1, -1)), ((4, 2, 2), (2, 2, 1))])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "chunk-per-window"])
def test_backward_is_the_gradient_of_per_window_attention(generator, grid, window, with_bias, chunk_bytes,
                                                          monkeypatch):
    """gradcheck (finite differences, float64) of q, k, v and the bias, and the same gradients as autograd through
    the plain per-window attention; with all windows in one backward chunk and with one window per chunk."""
    if chunk_bytes is not None:
        monkeypatch.setattr(op_module, "BACKWARD_CHUNK_BYTES", chunk_bytes)
    heads = 2
    q, k, v = (x.requires_grad_() for x in qkv(generator, grid, n=2, d=3, dtype=torch.float64))
    length = torch.Size(resolve_window(window, grid)).numel()
    bias = torch.randn(heads, length, length, generator=generator, dtype=torch.float64).requires_grad_() \
        if with_bias else None
    inputs = (q, k, v) if bias is None else (q, k, v, bias)

    def op(*xs):
        return window_attention(*xs[:3], window, 0.7, xs[3] if len(xs) > 3 else None)

    assert torch.autograd.gradcheck(op, inputs)
    cotangent = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    ours = torch.autograd.grad(op(*inputs), inputs, cotangent)
    theirs = torch.autograd.grad(reference(q, k, v, window, 0.7, bias, heads), inputs, cotangent)
    for name, a, b in zip(("q", "k", "v", "bias"), ours, theirs):
        assert_close(a, b, GRADIENT_TOLERANCE, f"d/d{name}, window {window}")


def test_backward_skips_inputs_without_grad(generator):
    q, k, v = qkv(generator, (2, 2, 2), n=2, d=4)
    q.requires_grad_()
    window_attention(q, k, v, (1, -1, -1), 0.5).sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape and k.grad is None
