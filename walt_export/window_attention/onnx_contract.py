"""The ONNX contract of the window-attention op, torch-free: what a `wattn::WindowAttention3D` node is, its body,
and the variants every file with such nodes is shipped in (docs/window_attention_op.md).

    node       domain `wattn`, op type `WindowAttention3D`, opset 1; inputs q, k, v `[N, T, H, W, d]` (N = batch x
               heads, batch-major) and an optional bias `[heads, L, L]`; output like q; attributes `window` INTS
               `[wt, wh, ww]` (-1 = the full extent), `scale` FLOAT, `plugin_namespace` "wattn", `plugin_version` "1"
    body       a model-local FunctionProto: partition -> Mul(q, scale) -> MatMul(q, k^T) [+ bias] -> Softmax ->
               MatMul(., v) -> merge, every tensor of rank <= 8 (TensorRT's limit), so onnxruntime runs it
    variants   canonical (node + body: onnxruntime), plugin (body stripped: TensorRT must use the plugin, the only
               path on TensorRT <= 10.6, i.e. JetPack 6), fallback (body inlined: plain ONNX for plugin-free TensorRT),
               attention (body on the standard ONNX `Attention`, inlined, the text cross-attention rewritten onto it
               too: onnxruntime, TensorRT >= 10.14)

The exporter (`walt_export.onnx_export`), INT8 calibration (`calibration/`, which must not import torch) and the
TensorRT plugin (`plugin.py`) all read this module; the torch op that the exporter maps to the node is `op.py`.
onnx is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runtime.manifest import DataFile, ModelFile, Precision, sha256_of
from walt_export.onnx_files import data_files, save_model

if TYPE_CHECKING:
    import onnx

OP_DOMAIN = "wattn"  # ONNX domain and TensorRT plugin namespace
OP_TYPE = "WindowAttention3D"  # ONNX op type and TensorRT plugin name
OP_VERSION = 1  # ONNX opset of the domain
PLUGIN_VERSION = str(OP_VERSION)  # the TensorRT plugin's version
MAX_RANK = 8  # TensorRT's Dims64::MAX_DIMS: the body and the fallback variant stay within it
ATTENTION_OPSET = 23  # the first default-domain opset with `Attention`, which the attention variant needs
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


def onnx_function(opset: int, with_bias: bool, standard_attention: bool = False) -> onnx.FunctionProto:
    """The op's body as a model-local `FunctionProto` in default-domain `opset` (the model's own).

    partition -> Mul(q, scale) -> MatMul(q, k^T) [+ bias] -> Softmax -> MatMul(., v) -> merge. Sizes come from
    `Shape`, so N, T, H, W stay dynamic; every tensor has rank <= 8 (TensorRT's limit). With a bias the windows
    are laid out as (B, heads, nWin, L, d), so the bias (heads, 1, L, L) adds right after the first MatMul, the
    pattern TensorRT fuses into one attention kernel.

    `standard_attention` (opset >= 23): the attention of the windows is one ONNX `Attention` node instead, on
    (B * nWin, heads, L, d) with the bias (1, heads, L, L) as its additive mask (without a bias: (N * nWin, 1, L,
    d)); onnxruntime runs it as one kernel, TensorRT >= 10.14 maps it to its fused attention layer (release notes
    10.14.1; docs/tensorrt.md).
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
    if standard_attention:
        out = _standard_attention(node, nodes, qw, kw, vw, heads if with_bias else None,
                                  n_win if with_bias else None, length, d)
    else:
        scale = node("CastLike", [attribute("scale_attr", "scale", onnx.AttributeProto.FLOAT), "q"], "scale")
        rank = 5 if with_bias else 3
        kt = node("Transpose", [kw], "k_t", perm=[*range(rank - 2), rank - 1, rank - 2])  # (..., d, L)
        scores = node("MatMul", [node("Mul", [qw, scale], "q_scaled"), kt], "scores")  # (..., L, L)
        if with_bias:
            bias_cast = node("CastLike", ["bias", "q"], "bias_cast")
            bias = node("Unsqueeze", [bias_cast, "one"], "bias_4d")  # (heads, 1, L, L)
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


def _standard_attention(node, nodes: list, qw: str, kw: str, vw: str, heads: str | None, n_win: str | None,
                        length: str, d: str) -> str:
    """One ONNX `Attention` (opset 23) over the windows `qw`, `kw`, `vw` of the body: (B, heads, nWin, L, d) with a
    bias (`heads`, `n_win` given), else (N * nWin, L, d); returns the output in the same layout. `node` adds a node
    to `nodes`, the body's list."""
    import onnx

    with_bias = heads is not None
    attention = onnx.helper.make_node("Attention", [], ["out_attention"])
    attention.attribute.append(onnx.AttributeProto(name="scale", ref_attr_name="scale",
                                                   type=onnx.AttributeProto.FLOAT))
    if with_bias:  # (B, heads, nWin, L, d) -> (B * nWin, heads, L, d): the bias (1, heads, L, L) broadcasts
        batch_first = node("Concat", ["minus_one", heads, length, d], "attention_shape", axis=0)
        q, k, v = (node("Reshape", [node("Transpose", [x], x + "_by_window", perm=[0, 2, 1, 3, 4]), batch_first],
                        x + "_4d") for x in (qw, kw, vw))
        mask = node("Unsqueeze", [node("CastLike", ["bias", "q"], "bias_cast"), "zero"], "mask")  # (1, heads, L, L)
        attention.input.extend([q, k, v, mask])
    else:  # (N * nWin, L, d) -> (N * nWin, 1, L, d)
        q, k, v = (node("Unsqueeze", [x, "one"], x + "_4d") for x in (qw, kw, vw))
        attention.input.extend([q, k, v])
    nodes.append(attention)
    if with_bias:
        by_window = node("Concat", ["minus_one", n_win, heads, length, d], "by_window_shape", axis=0)
        out = node("Reshape", ["out_attention", by_window], "out_by_window")  # (B, nWin, heads, L, d)
        return node("Transpose", [out], "out_windows", perm=[0, 2, 1, 3, 4])  # (B, heads, nWin, L, d)
    return node("Squeeze", ["out_attention", "one"], "out_windows")  # (N * nWin, L, d)


def window_attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The model's `wattn::WindowAttention3D` nodes (of its main graph)."""
    return [n for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type == OP_TYPE]


def has_body(model: onnx.ModelProto) -> bool:
    """Whether the model carries the op's function body (the canonical variant)."""
    return any(f.domain == OP_DOMAIN and f.name == OP_TYPE for f in model.functions)


def check_model(path: Path) -> None:
    """onnx.checker (full check) and strict shape inference on a saved model, with the op's schema registered."""
    import tempfile

    import onnx

    register_onnx_schema()
    onnx.checker.check_model(str(path), full_check=True)
    with tempfile.TemporaryDirectory() as tmp:  # by path: works beyond 2 GB
        onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True)


# ---------------------------------------------------------------------------------------------------- variants
def plugin_variant(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its `wattn` function bodies: TensorRT resolves each node to the plugin."""
    import copy

    out = copy.deepcopy(model)
    keep = [f for f in out.functions if f.domain != OP_DOMAIN]
    del out.functions[:]
    out.functions.extend(keep)
    return out


def fallback_variant(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its local functions inlined: plain ONNX ops only, every tensor of rank <= 8.

    Raises ValueError (a bug in the body, not a user mistake) when a tensor of rank > 8 appears.
    """
    import onnx
    import onnx.inliner

    out = onnx.inliner.inline_local_functions(model)
    del out.opset_import[:]
    out.opset_import.extend(o for o in model.opset_import if o.domain != OP_DOMAIN)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in onnx.shape_inference.infer_shapes(out).graph.value_info}
    too_deep = {name: rank for name, rank in ranks.items() if rank > MAX_RANK}
    if too_deep:
        raise ValueError(f"the inlined model has tensors of rank > {MAX_RANK}, which TensorRT rejects: {too_deep}")
    return out


def attention_variant(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the op's body rebuilt on the standard ONNX `Attention` operator and inlined: plain ONNX at
    default-domain opset ATTENTION_OPSET, every tensor of rank <= 8 (`onnx_function(standard_attention=True)`); the
    text cross-attention, decomposed by the exporter, becomes an `Attention` node too (`standard_text_attention`).

    Only the default-domain opset number changes for the other nodes: the ops this project exports mean the same at
    opsets 20 and 23 (checked by onnxruntime against the canonical model, `walt-export verify`).

    Raises ValueError (a bug, not a user mistake) when a Softmax is left: an attention the rewrite did not match."""
    import copy

    out = copy.deepcopy(model)
    for function in out.functions:
        if function.domain == OP_DOMAIN and function.name == OP_TYPE:
            function.CopyFrom(onnx_function(ATTENTION_OPSET, with_bias=len(function.input) == 4,
                                            standard_attention=True))
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, ATTENTION_OPSET)
    out = fallback_variant(out)
    standard_text_attention(out.graph)
    left = [n.name or n.output[0] for n in out.graph.node if n.op_type == "Softmax"]
    if left:
        raise ValueError(f"the attention variant still has decomposed attention (Softmax {left}): "
                         "standard_text_attention did not match the exporter's pattern")
    return out


def standard_text_attention(graph: onnx.GraphProto) -> int:
    """Rewrite, in place, the scaled-dot-product attentions that torch's ONNX exporter decomposes below opset 23
    into one ONNX `Attention` node each; returns how many. In this project's models that is the text
    cross-attention (`F.scaled_dot_product_attention` in `WindowCrossAttention`, on 4-D q, k, v and mask).

    The decomposition matched: MatMul(Softmax(Add(MatMul(Mul(q, c), Mul(k^T, c)), mask), axis=-1), v), with k^T
    written as Reshape -> Transpose(perm 0, 2, 1) -> Reshape of k (n, heads, S, d) and c = sqrt(scale) a scalar
    constant; it becomes Attention(q, k, v, mask, scale=c^2). The mask (n, 1, 1, S) is expanded to (n, 1, L, S):
    onnxruntime's kernel requires a mask row per query, which the ONNX operator allows to broadcast. The nodes left
    unused are removed.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: i for i in graph.initializer}

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def constant(name: str) -> float | None:
        """The value of a one-element initializer or Constant (`value` or `value_float`), else None."""
        tensor = initializers.get(name)
        if tensor is None and (node := made_by(name, "Constant")) is not None:
            attribute = node.attribute[0]
            if attribute.name == "value_float":
                return attribute.f
            tensor = attribute.t if attribute.name == "value" else None
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        value = numpy_helper.to_array(tensor)
        return value.reshape(-1)[0].item() if value.size == 1 else None

    def decomposed(product: onnx.NodeProto):
        """(q's Mul, k^T's first Reshape, the mask Add, sqrt(scale) of q, of k) of a decomposed attention ending in
        `product`, or None."""
        softmax = made_by(product.input[0], "Softmax")
        if softmax is None or any(a.name == "axis" and a.i != -1 for a in softmax.attribute):
            return None
        add = made_by(softmax.input[0], "Add")
        scores = None if add is None else made_by(add.input[0], "MatMul")
        if scores is None:
            return None
        q_scaled, kt_scaled = made_by(scores.input[0], "Mul"), made_by(scores.input[1], "Mul")
        if q_scaled is None or kt_scaled is None:
            return None
        merged = made_by(kt_scaled.input[0], "Reshape")
        transpose = None if merged is None else made_by(merged.input[0], "Transpose")
        if transpose is None or [list(a.ints) for a in transpose.attribute if a.name == "perm"] != [[0, 2, 1]]:
            return None
        split = made_by(transpose.input[0], "Reshape")
        c_q, c_k = constant(q_scaled.input[1]), constant(kt_scaled.input[1])
        if split is None or c_q is None or c_k is None:
            return None
        return q_scaled, split, add, c_q, c_k

    rewritten = 0
    for product in [n for n in graph.node if n.op_type == "MatMul"]:
        match = decomposed(product)
        if match is None:
            continue
        q_scaled, split, add, c_q, c_k = match
        name, mask = product.output[0], add.input[1]  # output names are unique, node names need not be
        shape = f"{name}/mask_shape"
        nodes = [helper.make_node("Shape", [mask], [f"{shape}/lead"], end=2),
                 helper.make_node("Shape", [q_scaled.input[0]], [f"{shape}/queries"], start=2, end=3),
                 helper.make_node("Shape", [mask], [f"{shape}/keys"], start=3),
                 helper.make_node("Concat", [f"{shape}/lead", f"{shape}/queries", f"{shape}/keys"], [shape], axis=0),
                 helper.make_node("Expand", [mask, shape], [f"{name}/mask"]),
                 helper.make_node("Attention", [q_scaled.input[0], split.input[0], product.input[1], f"{name}/mask"],
                                  list(product.output), name=f"{product.name or name}/attention",
                                  scale=float(np.float32(c_q * c_k)))]
        index = list(graph.node).index(product)
        graph.node.remove(product)
        for offset, node in enumerate(nodes):
            graph.node.insert(index + offset, node)
        rewritten += 1
    if rewritten:
        _remove_unused_nodes(graph)
    return rewritten


def _remove_unused_nodes(graph: onnx.GraphProto) -> None:
    """Drop the nodes none of whose outputs is read (by a node, by any subgraph nested in one, or as an output)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(_names_read(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))


def _names_read(node: onnx.NodeProto) -> set[str]:
    """The value names a node reads: its inputs, and every name its subgraphs (at any depth) read or output."""
    names = set(node.input)
    for attribute in node.attribute:
        for sub in [attribute.g, *attribute.graphs]:
            names.update(o.name for o in sub.output)
            for inner in sub.node:
                names.update(_names_read(inner))
    return names


def write_attention_variants(model: onnx.ModelProto, path: Path, precision: Precision,
                             hashes: dict[str, str] | None = None) -> list[ModelFile]:
    """Manifest entries of a canonical model already saved at `path` and of its plugin, fallback and attention
    variants, which are written beside it as `<stem>.plugin.onnx`, `<stem>.fallback.onnx` and `<stem>.attention.onnx`
    when it has `wattn` nodes (they share its external data).

    Args:
        model: the canonical model as saved (external weights need not be loaded).
        path: where it is saved; entries name files relative to its directory.
        precision: the precision of its weights and compute (fp32, fp16, int8).
        hashes: a cache of external-data sha256s across calls (variants share their canonical's data file).
    """
    hashes = {} if hashes is None else hashes
    variants = [("canonical", model)]
    if window_attention_nodes(model):
        variants += [("plugin", plugin_variant(model)), ("fallback", fallback_variant(model)),
                     ("attention", attention_variant(model))]
    files = []
    for variant, m in variants:
        out = path if variant == "canonical" else path.with_name(f"{path.stem}.{variant}.onnx")
        if variant != "canonical":
            save_model(m, out)
            if variant in ("fallback", "attention"):
                check_model(out)
        files.append(ModelFile(
            file=out.name, sha256=sha256_of(out), precision=precision, variant=variant,
            external_data=tuple(DataFile(file=d, sha256=hashes.setdefault(d, sha256_of(path.parent / d)))
                                for d in data_files(m)),
            window_attention_nodes=len(window_attention_nodes(m)),
        ))
    return files
