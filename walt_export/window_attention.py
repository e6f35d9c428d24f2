"""The window-attention op `wattn::window_attention3d`: its contract, eager implementation and window partitioning.

Contract (shared/design.md §3): q, k, v are `[N, T, H, W, d]` with N = batch x heads, batch-major
(n = b * heads + h), q and k already query-key-normalised. The token grid is cut into non-overlapping windows
of `(wt, wh, ww)` tokens (-1 = the full extent, so `(1, -1, -1)` is a whole frame); every token attends to the
tokens of its own window: softmax(scale * q k^T + bias) v, with the optional relative-position bias
`[heads, L, L]` (L = wt * wh * ww) shared by all windows. The output has the shape of q.

In a graph the op is one node (`torch.ops.wattn.window_attention3d`), which the exporter maps to the ONNX
node `wattn::WindowAttention3D`; everything else here is plain torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

OP_DOMAIN = "wattn"  # ONNX domain and TensorRT plugin namespace
OP_TYPE = "WindowAttention3D"  # ONNX op type and TensorRT plugin name
OP_VERSION = 1  # ONNX opset of the domain; the plugin version is str(OP_VERSION)

Window = tuple[int, int, int]
SPATIAL_WINDOW: Window = (1, -1, -1)  # one whole latent frame


def resolve_window(window: Sequence[int], grid: Sequence[int]) -> Window:
    """Replace -1 by the full extent of `grid` (T, H, W) and check that the window tiles the grid."""
    if len(window) != 3 or len(grid) != 3:
        raise ValueError(f"window {tuple(window)} and grid {tuple(grid)} must both be (T, H, W)")
    resolved = tuple(size if w == -1 else w for w, size in zip(window, grid))
    if any(w <= 0 or size % w for w, size in zip(resolved, grid)):
        raise ValueError(f"window {tuple(window)} does not tile the token grid {tuple(grid)}")
    return resolved  # type: ignore[return-value]


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


@torch.library.custom_op("wattn::window_attention3d", mutates_args=())
def window_attention3d(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, wt: int, wh: int, ww: int, scale: float
) -> Tensor:
    """Eager implementation of the contract (partition -> attention per window -> merge)."""
    win = check_inputs(q, k, v, bias, (wt, wh, ww))
    n, t, h, w, d = q.shape
    length = win[0] * win[1] * win[2]
    qw, kw, vw = (partition(x, win) for x in (q, k, v))  # (N * nWin, L, d)
    mask = None
    if bias is not None:
        heads = bias.shape[0]
        qw, kw, vw = (x.view(n // heads, heads, -1, length, d) for x in (qw, kw, vw))  # (B, heads, nWin, L, d)
        mask = bias.to(q.dtype)[:, None]  # (heads, 1, L, L), broadcast over batch and windows
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale)
    return merge(out.reshape(-1, length, d), win, (t, h, w))


@window_attention3d.register_fake
def _fake(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, wt: int, wh: int, ww: int, scale: float) -> Tensor:
    return torch.empty_like(q)


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
# The node `wattn::WindowAttention3D` (inputs q, k, v[, bias]; attributes window, scale, plugin_namespace,
# plugin_version) and its model-local function body. onnx and onnxscript are imported only when exporting.
PLUGIN_VERSION = str(OP_VERSION)
_ATTRIBUTES = ("window", "scale", "plugin_namespace", "plugin_version")


def register_onnx_schema() -> None:
    """Register the op's ONNX schema once per process (the exporter and `onnx.checker` need it)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, OP_DOMAIN):
        return
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        OP_TYPE, OP_DOMAIN, OP_VERSION,
        doc="Attention inside non-overlapping (wt, wh, ww) windows of [N, T, H, W, d] tensors (-1 = full extent).",
        inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("bias", "T", param_option=optional)],
        outputs=[param("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k, v, bias, out")],
        attributes=[attr("window", OpSchema.AttrType.INTS, "[wt, wh, ww], -1 = the full extent"),
                    attr("scale", OpSchema.AttrType.FLOAT, "multiplies q before q k^T"),
                    attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                    attr("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version")],
    ))


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


def onnx_function(opset: int, with_bias: bool):
    """The op's body as a model-local `FunctionProto` in default-domain `opset` (the model's own).

    partition -> Mul(q, scale) -> MatMul(q, k^T) [+ bias] -> Softmax -> MatMul(., v) -> merge. Sizes come from
    `Shape`, so N, T, H, W stay dynamic; every tensor has rank <= 8 (TensorRT's limit). With a bias the windows
    are laid out as (B, heads, nWin, L, d), so the bias (heads, 1, L, L) adds right after the first MatMul, the
    pattern TensorRT fuses into one attention kernel.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = []

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def ints(name: str, values: list[int]) -> str:
        return node("Constant", [], name, value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    def attribute(name: str, ref: str, kind: int) -> str:
        attr = onnx.AttributeProto(name="value_" + ("ints" if kind == onnx.AttributeProto.INTS else "float"),
                                   ref_attr_name=ref, type=kind)
        constant = helper.make_node("Constant", [], [name])
        constant.attribute.append(attr)
        nodes.append(constant)
        return name

    # shapes
    shape = node("Shape", ["q"], "shape")  # [N, T, H, W, d]
    grid = node("Slice", [shape, ints("one", [1]), ints("four", [4])], "grid")  # [T, H, W]
    n = node("Slice", [shape, ints("zero", [0]), "one"], "n")
    d = node("Slice", [shape, "four", ints("five", [5])], "d")
    window = attribute("window", "window", onnx.AttributeProto.INTS)
    full = node("Equal", [window, ints("minus_one", [-1])], "full")
    win = node("Where", [full, grid, window], "win")  # [wt, wh, ww]
    counts = node("Div", [grid, win], "counts")  # [nT, nH, nW]
    blocks = node("Concat", [n, counts, win, d], "blocks", axis=0)  # [N, nT, nH, nW, wt, wh, ww, d]
    split8 = node("Gather", [blocks, ints("split_order", [0, 1, 4, 2, 5, 3, 6, 7])], "split8", axis=0)
    length = node("ReduceProd", [win], "length", keepdims=1)  # [L]
    if with_bias:
        heads = node("Slice", [node("Shape", ["bias"], "bias_shape"), "zero", "one"], "heads")
        n_win = node("ReduceProd", [counts], "n_win", keepdims=1)
        windows = node("Concat", ["minus_one", heads, n_win, length, d], "windows", axis=0)  # [B, heads, nWin, L, d]
    else:
        windows = node("Concat", ["minus_one", length, d], "windows", axis=0)  # [N * nWin, L, d]

    def to_windows(x: str) -> str:
        grid8 = node("Reshape", [x, split8], x + "_8d")  # (N, nT, wt, nH, wh, nW, ww, d)
        grouped = node("Transpose", [grid8], x + "_grouped", perm=[0, 1, 3, 5, 2, 4, 6, 7])  # (N, nT, nH, nW, wt, wh, ww, d)
        return node("Reshape", [grouped, windows], x + "_windows")  # windows of L tokens

    qw, kw, vw = (to_windows(x) for x in ("q", "k", "v"))
    scale = node("CastLike", [attribute("scale_attr", "scale", onnx.AttributeProto.FLOAT), "q"], "scale")
    rank = 5 if with_bias else 3
    kt = node("Transpose", [kw], "k_t", perm=[*range(rank - 2), rank - 1, rank - 2])  # (..., d, L)
    scores = node("MatMul", [node("Mul", [qw, scale], "q_scaled"), kt], "scores")  # (..., L, L)
    if with_bias:
        bias = node("Unsqueeze", [node("CastLike", ["bias", "q"], "bias_cast"), "one"], "bias_4d")  # (heads, 1, L, L)
        scores = node("Add", [scores, bias], "scores_biased")
    probs = node("Softmax", [scores], "probs", axis=-1)
    out = node("MatMul", [probs, vw], "out_windows")  # (..., L, d)
    out = node("Reshape", [out, blocks], "out_blocks")  # (N, nT, nH, nW, wt, wh, ww, d)
    out = node("Transpose", [out], "out_8d", perm=[0, 1, 4, 2, 5, 3, 6, 7])  # (N, nT, wt, nH, wh, nW, ww, d)
    node("Reshape", [out, shape], "out")  # (N, T, H, W, d)
    return helper.make_function(
        OP_DOMAIN, OP_TYPE, ["q", "k", "v", "bias"] if with_bias else ["q", "k", "v"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(OP_DOMAIN, OP_VERSION)],
        attributes=list(_ATTRIBUTES),
    )
