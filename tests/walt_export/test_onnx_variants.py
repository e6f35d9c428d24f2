"""The wattn function body against the float64 reference, and the FP16 / plugin / fallback transformations."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from runtime.compare import Tolerance, assert_close
from runtime.runners import OnnxRuntimeRunner
from tests.walt_export.test_window_attention import CASES, qkv, reference
from walt_export.onnx_fp16 import fp16_variant
from walt_export.window_attention.onnx_contract import (
    ATTENTION_OPSET,
    OP_DOMAIN,
    OP_TYPE,
    attention_variant,
    fallback_variant,
    onnx_function,
    plugin_variant,
    register_onnx_schema,
    window_attention_nodes,
)
from walt_export.window_attention.op import resolve_window

ONNX_TOLERANCES = {"fp32": Tolerance(atol=1e-5, rtol=1e-5), "fp16": Tolerance(atol=5e-3, rtol=5e-3)}
OPSET = 20


def attention_model(grid, window, heads, with_bias, elem_type=TensorProto.FLOAT, d=8, standard_attention=False):
    """One WindowAttention3D node with dynamic N and its function body (on ONNX `Attention`, opset 23, if asked)."""
    opset = ATTENTION_OPSET if standard_attention else OPSET
    register_onnx_schema()
    inputs = ["q", "k", "v"] + (["bias"] if with_bias else [])
    node = helper.make_node(OP_TYPE, inputs, ["out"], domain=OP_DOMAIN, window=list(window), scale=0.3,
                            plugin_namespace="wattn", plugin_version="1")
    length = int(np.prod(resolve_window(window, grid)))
    values = [helper.make_tensor_value_info(x, elem_type, ["N", *grid, d]) for x in ("q", "k", "v")]
    if with_bias:
        values.append(helper.make_tensor_value_info("bias", elem_type, [heads, length, length]))
    graph = helper.make_graph([node], "wattn", values, [helper.make_tensor_value_info("out", elem_type, ["N", *grid, d])])
    return helper.make_model(graph, ir_version=10, functions=[onnx_function(opset, with_bias, standard_attention)],
                             opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(OP_DOMAIN, 1)])


@pytest.mark.parametrize("precision", list(ONNX_TOLERANCES))
@pytest.mark.parametrize("grid, window", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("standard_attention", [False, True], ids=["matmul-softmax", "Attention-23"])
def test_function_body_equals_the_reference_in_onnxruntime(tmp_path, generator, precision, grid, window, with_bias,
                                                           standard_attention):
    heads = 2
    dtype = np.float32 if precision == "fp32" else np.float16
    elem_type = TensorProto.FLOAT if precision == "fp32" else TensorProto.FLOAT16
    model = attention_model(grid, window, heads, with_bias, elem_type, standard_attention=standard_attention)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "wattn.onnx")
    q, k, v = qkv(generator, grid)
    length = int(np.prod(resolve_window(window, grid)))
    bias = torch.randn(heads, length, length, generator=generator) if with_bias else None
    feeds = {"q": q.numpy().astype(dtype), "k": k.numpy().astype(dtype), "v": v.numpy().astype(dtype)}
    if with_bias:
        feeds["bias"] = bias.numpy().astype(dtype)
    with OnnxRuntimeRunner(tmp_path / "wattn.onnx") as runner:
        out = runner.infer(feeds)["out"]
    assert out.dtype == dtype
    expected = reference(*(torch.from_numpy(feeds[x].astype(np.float64)) for x in ("q", "k", "v")), window, 0.3,
                         None if bias is None else torch.from_numpy(feeds["bias"].astype(np.float64)), heads)
    assert_close(out, expected, ONNX_TOLERANCES[precision],
                 f"{precision} window {window} bias {with_bias} standard attention {standard_attention}")


def test_plugin_strips_fallback_inlines_and_attention_rebuilds_the_body():
    model = attention_model((2, 4, 4), (1, 2, 2), 2, True)
    plugin = plugin_variant(model)
    assert len(window_attention_nodes(plugin)) == 1 and not plugin.functions
    fallback = fallback_variant(model)
    assert not window_attention_nodes(fallback) and not fallback.functions
    assert {n.op_type for n in fallback.graph.node} >= {"MatMul", "Softmax", "Transpose", "Reshape"}
    assert [n.op_type for n in fallback.graph.node if n.op_type in ("Mul", "MatMul")][:2] == ["Mul", "MatMul"]
    attention = attention_variant(model)
    assert not window_attention_nodes(attention) and not attention.functions
    assert [n.op_type for n in attention.graph.node].count("Attention") == 1
    assert "Softmax" not in {n.op_type for n in attention.graph.node}
    assert {o.domain: o.version for o in attention.opset_import} == {"": ATTENTION_OPSET}


def small_graph():
    """t -> Mul(freq) -> Sin, x -> Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul(x), ConstantOfShape."""
    nodes = [
        helper.make_node("Mul", ["t", "freq"], ["args"]),
        helper.make_node("Sin", ["args"], ["emb"]),
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "last"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("MatMul", ["normed", "w"], ["proj"]),
        helper.make_node("Shape", ["proj"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("Add", ["proj", "zeros"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in [
        ("freq", np.array([1.0, 0.5, 0.25], np.float32)), ("two", np.array(2.0, np.float32)),
        ("last", np.array([-1], np.int64)), ("eps", np.array(1e-6, np.float32)),
        ("w", rng.standard_normal((3, 4)).astype(np.float32))]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [3]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET)])


def test_fp16_keeps_timestep_features_and_norm_statistics_in_float32(tmp_path):
    model = small_graph()
    half = fp16_variant(model)
    onnx.checker.check_model(half, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(half, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    for name in ("args", "emb", "sq", "var", "var_eps", "std", "inv"):
        assert types[name] == TensorProto.FLOAT, name
    for name in ("normed", "proj", "zeros"):
        assert types[name] == TensorProto.FLOAT16, name
    assert types["y"] == TensorProto.FLOAT  # outputs keep their type
    weights = {t.name: t.data_type for t in half.graph.initializer}
    assert weights["w"] == TensorProto.FLOAT16 and weights["freq"] == TensorProto.FLOAT
    onnx.save(model, tmp_path / "fp32.onnx")
    onnx.save(half, tmp_path / "fp16.onnx")
    feeds = {"t": np.array([999.3], np.float32), "x": np.array([[300.0, -200.0, 100.0], [1.0, 2.0, 3.0]], np.float32)}
    with OnnxRuntimeRunner(tmp_path / "fp32.onnx") as full, OnnxRuntimeRunner(tmp_path / "fp16.onnx") as reduced:
        expected, actual = full.infer(feeds), reduced.infer(feeds)
    assert_close(actual["emb"], expected["emb"], Tolerance(1e-6), "sin(t * freq)")  # float16 rounds t to 999.5
    assert_close(actual["y"], expected["y"], Tolerance(5e-3, 5e-3), "normalised projection")  # 300^2 overflows fp16
