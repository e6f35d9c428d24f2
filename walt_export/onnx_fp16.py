"""The FP16 variant of an exported model: float16 weights and compute behind float32 inputs and outputs.

TensorRT 11 and TensorRT-RTX are strongly typed, so FP16 must already be in the ONNX (docs/tensorrt.md §5).
Float32 stays where float16 breaks: the sinusoidal timestep features (t * freq with t up to 1000 needs more than
float16's 11-bit mantissa), the statistics of decomposed norms (Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal: a
squared activation above 256 overflows float16), and every op whose schema has no float16 type. A pure ONNX
transformation; the plugin and fallback variants of the result come from `window_attention.onnx_contract`.

`write_fp16_files` writes a stage's FP16 files from its saved FP32 model: `walt-export onnx --fp16` calls it while
exporting, `walt-export engines` when an artifact exported without `--fp16` needs FP16 files. onnx only, no torch.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.manifest import ModelFile
from walt_export.onnx_files import data_files, save_model
from walt_export.window_attention.onnx_contract import check_model, register_onnx_schema, write_attention_variants

log = logging.getLogger(__name__)

_FP32_SEEDS = {"Sin", "Cos"}  # these and everything that feeds them stay float32
_NORM_STATISTICS = ("Pow", {"ReduceMean", "ReduceSum", "Add", "Sqrt", "Reciprocal"}, "Reciprocal")  # start, chain, end
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def fp16_variant(model: onnx.ModelProto, base_dir: str | Path | None = None) -> onnx.ModelProto:
    """Float16 weights and compute, float32 inputs and outputs; Cast nodes where the two precisions meet.

    Args:
        model: a float32 model; initializers may be external (read from `base_dir` one at a time).
        base_dir: the directory of the model's external data, if any.
    Returns:
        a new model whose initializers are all in memory (save it with external data when large).
    """
    register_onnx_schema()  # the types of `wattn` nodes are inferred and checked through their schema
    model = copy.deepcopy(model)
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    types = _tensor_types(model)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    fp32_nodes = _fp32_nodes(graph, producers, consumers, opset)
    half_node = {id(node): id(node) not in fp32_nodes for node in graph.node}
    precision: dict[str, int] = {vi.name: FLOAT for vi in graph.input if vi.type.tensor_type.elem_type == FLOAT}

    for tensor in graph.initializer:  # every weight is read into memory: the result is self-contained
        array = numpy_helper.to_array(tensor, str(base_dir) if base_dir else "")
        if tensor.data_type == FLOAT:
            users = consumers.get(tensor.name, [])
            precision[tensor.name] = HALF if users and all(half_node[id(n)] for n in users) else FLOAT
            if precision[tensor.name] == HALF:
                array = _as_half(array)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = f"{name}_as_{'fp16' if to == HALF else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"cast_{out}"))
            casts[(name, to)] = out
        return casts[(name, to)]

    for node in graph.node:
        want = HALF if half_node[id(node)] else FLOAT
        for i, name in enumerate(node.input):
            if name in precision and precision[name] != want:
                node.input[i] = cast(name, want)
        if want == HALF:
            _retype_attributes(node)
        nodes.append(node)
        for out in node.output:
            if types.get(out) == FLOAT:
                precision[out] = want

    # float32 graph outputs: the fp16 result is cast back under the output's own name
    for output in graph.output:
        if precision.get(output.name) == HALF:
            internal = f"{output.name}_fp16"
            for node in nodes:
                node.output[:] = [internal if o == output.name else o for o in node.output]
                node.input[:] = [internal if i == output.name else i for i in node.input]
            nodes.append(helper.make_node("Cast", [internal], [output.name], to=FLOAT, name=f"cast_{output.name}"))

    del graph.node[:]
    graph.node.extend(nodes)
    for value in graph.value_info:  # kept: onnx infers no types through the wattn function
        if value.type.tensor_type.elem_type == FLOAT:
            value.type.tensor_type.elem_type = precision.get(value.name, FLOAT)
    log.info("fp16: %d nodes kept float32, %d casts", len(fp32_nodes), len(casts) + len(graph.output))
    return model


def write_fp16_files(stage: str, canonical: onnx.ModelProto, directory: Path, out: Path | None = None,
                     hashes: dict[str, str] | None = None) -> list[ModelFile]:
    """Write `<stage>.fp16.onnx`, the FP16 variant of the stage's canonical FP32 model, and its plugin and fallback
    variants; returns their manifest entries (file names relative to `out`).

    Args:
        canonical: the FP32 model as saved in `directory` (external weights need not be loaded: they are read from
            there).
        out: the directory to write into (default `directory`), e.g. a staging directory.
        hashes: a cache of external-data sha256s (see `write_attention_variants`).
    """
    half = fp16_variant(canonical, base_dir=directory)
    path = (out or directory) / f"{stage}.fp16.onnx"
    large = bool(data_files(canonical))  # a model too large for one protobuf keeps its FP16 weights beside it too
    save_model(half, path, data=f"{path.name}.data" if large else None)
    if large:
        half = onnx.load(str(path), load_external_data=False)
    check_model(path)
    return write_attention_variants(half, path, "fp16", hashes)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (graph inputs, initializers, inferred intermediates, outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _fp32_nodes(graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto],
                consumers: dict[str, list[onnx.NodeProto]], opset: int) -> set[int]:
    """ids of the nodes that stay float32: the seeds and their producers, norm statistics, ops without float16."""
    keep: set[int] = set()
    stack = [n for n in graph.node if n.op_type in _FP32_SEEDS]
    while stack:
        node = stack.pop()
        if id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(producers[name] for name in node.input if name in producers)
    start, chain, end = _NORM_STATISTICS
    stack = [n for n in graph.node if n.op_type == start]
    while stack:
        node = stack.pop()
        keep.add(id(node))
        if node.op_type != end:
            stack.extend(c for out in node.output for c in consumers.get(out, []) if c.op_type in chain)
    keep.update(id(n) for n in graph.node if not _has_fp16_kernel_type(n, opset))
    return keep


def _has_fp16_kernel_type(node: onnx.NodeProto, opset: int) -> bool:
    """Whether the op's schema allows float16 wherever it allows float32 (custom ops: their registered schema)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset if node.domain in ("", "ai.onnx") else 1, node.domain)
    except onnx.defs.SchemaError:
        return True  # unknown to onnx: leave it to the runtime
    # lengths differ by design: a variadic parameter covers several inputs, optional ones may be absent
    used = {p.type_str for p, name in zip(schema.inputs, node.input, strict=False) if name}
    used |= {p.type_str for p, name in zip(schema.outputs, node.output, strict=False) if name}
    return all("tensor(float16)" in c.allowed_type_strs for c in schema.type_constraints
               if c.type_param_str in used and "tensor(float)" in c.allowed_type_strs)


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Float32 values fixed by attributes become float16 in a float16 node (Cast to, constants)."""
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = HALF
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(_as_half(numpy_helper.to_array(attr.t)), attr.t.name))
        elif node.op_type == "Constant" and attr.name == "value_float":
            attr.CopyFrom(helper.make_attribute("value", numpy_helper.from_array(_as_half(np.array(attr.f)))))
        elif node.op_type == "Constant" and attr.name == "value_floats":
            attr.CopyFrom(helper.make_attribute("value", numpy_helper.from_array(_as_half(np.array(attr.floats)))))


def _as_half(array: np.ndarray) -> np.ndarray:
    """float16, with finite values beyond its range (e.g. finfo(float32).min masks) clipped to +-65504."""
    limit = float(np.finfo(np.float16).max)
    finite = np.isfinite(array)
    return np.where(finite, np.clip(array, -limit, limit), array).astype(np.float16)
