"""The window-attention op as a torch custom op, `wattn::window_attention3d`: eager implementation, window
partitioning, FLOP formula, and its translation to the ONNX node for the exporter.

Contract (docs/window_attention_op.md §1): q, k, v are `[N, T, H, W, d]` with N = batch x heads, batch-major
(n = b * heads + h), q and k already query-key-normalised. The token grid is cut into non-overlapping windows
of `(wt, wh, ww)` tokens (-1 = the full extent, so `(1, -1, -1)` is a whole frame); every token attends to the
tokens of its own window: softmax(scale * q k^T + bias) v, with the optional relative-position bias
`[heads, L, L]` (L = wt * wh * ww) shared by all windows. The output has the shape of q.

In a graph the op is one node (`torch.ops.wattn.window_attention3d`), which the exporter maps to the ONNX
node `wattn::WindowAttention3D` of `onnx_contract` (`onnx_translation`); everything else here is plain torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from walt_export.window_attention.onnx_contract import OP_DOMAIN, OP_VERSION, PLUGIN_VERSION, register_onnx_schema

Window = tuple[int, int, int]
SPATIAL_WINDOW: Window = (1, -1, -1)  # one whole latent frame


def resolve_window(window: Sequence[int], grid: Sequence[int]) -> Window:
    """Replace -1 by the full extent of `grid` (T, H, W) and check that the window tiles the grid."""
    if len(window) != 3 or len(grid) != 3:
        raise ValueError(f"window {tuple(window)} and grid {tuple(grid)} must both be (T, H, W)")
    resolved = tuple(size if w == -1 else w for w, size in zip(window, grid, strict=True))
    if any(w <= 0 or size % w for w, size in zip(resolved, grid, strict=True)):
        raise ValueError(f"window {tuple(window)} does not tile the token grid {tuple(grid)}")
    return resolved  # type: ignore[return-value]


def _windows(x: Tensor, window: Window, heads: int) -> Tensor:
    """(N, T, H, W, d) -> (N / heads * num_windows, heads, L, d), N = batch x heads batch-major: one attention
    problem per (batch, window), the heads of the bias together, so the bias [heads, L, L] broadcasts over dim 0.
    Eager only (the op's body, never traced): its rank-9 view would break the rank <= 8 that `partition` keeps for
    exported graphs (TensorRT's limit, onnx_contract.MAX_RANK), and building it from `partition` costs a copy."""
    n, t, h, w, d = x.shape
    wt, wh, ww = window
    x = x.view(n // heads, heads, t // wt, wt, h // wh, wh, w // ww, ww, d)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7, 8)  # (B, nT, nH, nW, heads, wt, wh, ww, d)
    return x.reshape(-1, heads, wt * wh * ww, d)


def _unwindows(x: Tensor, window: Window, grid: Sequence[int]) -> Tensor:
    """Inverse of `_windows`: (B * num_windows, heads, L, d) -> (B * heads, T, H, W, d) for the grid (T, H, W)."""
    t, h, w = grid
    wt, wh, ww = window
    heads, d = x.shape[1], x.shape[-1]
    x = x.view(-1, t // wt, h // wh, w // ww, heads, wt, wh, ww, d)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7, 8)  # (B, heads, nT, wt, nH, wh, nW, ww, d)
    return x.reshape(-1, t, h, w, d)


def partition(x: Tensor, window: Window) -> Tensor:
    """(N, T, H, W, d) -> (N * num_windows, L, d), windows in (t, h, w) raster order within each n."""
    n, t, h, w, d = x.shape
    wt, wh, ww = window
    x = x.view(n, t // wt, wt, h // wh, wh, w // ww, ww, d)  # (N, nT, wt, nH, wh, nW, ww, d)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (N, nT, nH, nW, wt, wh, ww, d)
    return x.reshape(-1, wt * wh * ww, d)  # (N * nWin, L, d)


def merge(windows: Tensor, window: Window, grid: Sequence[int]) -> Tensor:
    """Inverse of `partition`: (N * num_windows, L, d) -> (N, T, H, W, d) for the token grid (T, H, W)."""
    t, h, w = grid
    wt, wh, ww = window
    d = windows.shape[-1]
    x = windows.view(-1, t // wt, h // wh, w // ww, wt, wh, ww, d)  # (N, nT, nH, nW, wt, wh, ww, d)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (N, nT, wt, nH, wh, nW, ww, d)
    return x.reshape(-1, t, h, w, d)  # (N, T, H, W, d)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, window: Sequence[int]) -> Window:
    """Validate shapes against the contract; returns the resolved window."""
    if q.dim() != 5 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one [N, T, H, W, d] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    win = resolve_window(window, q.shape[1:4])
    length = win[0] * win[1] * win[2]
    if bias is not None:
        if bias.dim() != 3 or bias.shape[1:] != (length, length) or q.shape[0] % bias.shape[0]:
            raise ValueError(
                f"bias must be [heads, {length}, {length}] with heads dividing N={q.shape[0]}, got {tuple(bias.shape)}"
            )
    return win


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, wt: int, wh: int, ww: int, scale: float) -> Tensor:
    """The contract in plain torch (partition -> attention per window -> merge), the op's forward."""
    win = check_inputs(q, k, v, bias, (wt, wh, ww))
    heads = 1 if bias is None else bias.shape[0]
    qw, kw, vw = (_windows(x, win, heads) for x in (q, k, v))  # (B * nWin, heads, L, d)
    mask = None if bias is None else bias.to(q.dtype)[None]  # (1, heads, L, L), broadcast over batch and windows
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale)
    return _unwindows(out, win, q.shape[1:4])


@torch.library.custom_op("wattn::window_attention3d", mutates_args=())
def window_attention3d(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, wt: int, wh: int, ww: int, scale: float
) -> Tensor:
    """Eager implementation of the contract (without autograd, so torch picks its fused attention kernel)."""
    with torch.no_grad():
        return _attend(q.detach(), k.detach(), v.detach(), None if bias is None else bias.detach(), wt, wh, ww, scale)


@window_attention3d.register_fake
def _fake(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, wt: int, wh: int, ww: int, scale: float) -> Tensor:
    return torch.empty_like(q)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    q, k, v, bias, *ctx.window_and_scale = inputs
    ctx.save_for_backward(q, k, v, bias, output)


BACKWARD_CHUNK_BYTES = 8 << 20  # score matrices per backward chunk: about an L3 cache's share (2x faster on CPU)


def _backward(ctx, grad: Tensor) -> tuple:
    """Gradients of q, k, v and the bias, the attention backward written out per window (as FlashAttention's
    backward, Dao et al. 2022, Alg. 4, with the probabilities recomputed once and not kept by the forward):
    P = softmax(scale q k^T + bias); dV = P^T dO; dS = P * (dO V^T - rowsum(dO * O)); dQ = scale dS K;
    dK = scale dS^T Q; dBias = dS summed over batch and windows. The windows go in chunks of about
    BACKWARD_CHUNK_BYTES of scores, so the [L, L] matrices stay in cache. Training the reference cascade goes through
    the same op the exporter writes (docs/window_attention_op.md §1); checked by gradcheck in float64 and against
    autograd through the plain per-window attention (tests/walt_export/test_window_attention.py)."""
    q, k, v, bias, out = ctx.saved_tensors
    wt, wh, ww, scale = ctx.window_and_scale
    win = resolve_window((wt, wh, ww), q.shape[1:4])
    heads = 1 if bias is None else bias.shape[0]
    qw, kw, vw, dow = (_windows(x, win, heads) for x in (q, k, v, grad))  # (B * nWin, heads, L, d)
    delta = (dow * _windows(out, win, heads)).sum(-1, keepdim=True)  # rowsum(dO * O): (B * nWin, heads, L, 1)
    dq, dk, dv = torch.empty_like(qw), torch.empty_like(kw), torch.empty_like(vw)
    length = qw.shape[2]
    needs = ctx.needs_input_grad
    dbias = torch.zeros(heads, length, length, dtype=qw.dtype, device=qw.device) if needs[3] else None
    chunk = max(1, BACKWARD_CHUNK_BYTES // (heads * length * length * qw.element_size()))
    for start in range(0, qw.shape[0], chunk):
        part = slice(start, start + chunk)
        scores = torch.matmul(qw[part], kw[part].transpose(-1, -2)).mul_(scale)  # (chunk, heads, L, L)
        if bias is not None:
            scores.add_(bias.to(scores.dtype))
        probs = torch.softmax(scores, dim=-1)
        torch.matmul(probs.transpose(-1, -2), dow[part], out=dv[part])
        dscores = torch.matmul(dow[part], vw[part].transpose(-1, -2)).sub_(delta[part]).mul_(probs)
        if dbias is not None:
            dbias.add_(dscores.sum(0))
        torch.matmul(dscores, kw[part], out=dq[part])
        torch.matmul(dscores.transpose(-1, -2), qw[part], out=dk[part])

    def grid(x: Tensor, need: bool) -> Tensor | None:
        return _unwindows(x, win, q.shape[1:4]) if need else None

    return (grid(dq.mul_(scale), needs[0]), grid(dk.mul_(scale), needs[1]), grid(dv, needs[2]),
            None if dbias is None else dbias.to(bias.dtype), None, None, None, None)


window_attention3d.register_autograd(_backward, setup_context=_setup_context)


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: Sequence[int], scale: float, bias: Tensor | None = None
) -> Tensor:
    """Call the op with a (wt, wh, ww) window; see the module docstring for the contract."""
    wt, wh, ww = (int(w) for w in window)
    return torch.ops.wattn.window_attention3d(q, k, v, bias, wt, wh, ww, float(scale))


def window_attention_flops(shape: Sequence[int], window: Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of q k^T and of the product with v: 4 * N * tokens * L * d."""
    n, t, h, w, d = shape
    wt, wh, ww = resolve_window(window, (t, h, w))
    return 4 * n * t * h * w * (wt * wh * ww) * d


@register_flop_formula(torch.ops.wattn.window_attention3d)
def _flops(q_shape, k_shape, v_shape, bias_shape, wt, wh, ww, scale, *args, out_shape=None, **kwargs) -> int:
    return window_attention_flops(q_shape, (wt, wh, ww))  # lets torch.utils.flop_counter count the op


# ------------------------------------------------------------------------------------------------------ ONNX
def onnx_translation() -> dict:
    """`custom_translation_table` for `torch.onnx.export(dynamo=True)`: the torch op -> one `wattn` node."""
    import onnxscript

    register_onnx_schema()
    opset = onnxscript.values.Opset(OP_DOMAIN, OP_VERSION)

    def translate(q, k, v, bias, wt: int, wh: int, ww: int, scale: float):
        inputs = (q, k, v) if bias is None else (q, k, v, bias)
        return opset.WindowAttention3D(*inputs, window=[wt, wh, ww], scale=scale,
                                       plugin_namespace=OP_DOMAIN, plugin_version=PLUGIN_VERSION)

    return {torch.ops.wattn.window_attention3d.default: translate}
