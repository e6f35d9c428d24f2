"""What onnxruntime's CPU EP runs in 8 bits from a Q/DQ model: the rule behind the INT8 findings in BENCHMARKS.md
("Why INT8 is slow on onnxruntime's CPU EP"), pinned on minimal models so that a release that changes it fails here.

Our Q/DQ files (`calibration/quantize.py`, onnxruntime.quantization's QDQ format) quantize each activation once,
for all the weight MatMuls that read it. onnxruntime turns DequantizeLinear -> MatMul into its integer kernel
(MatMulIntegerToFloat) only where that quantized activation feeds one MatMul: the text cross-attention's q, k, v
projections of the same window tokens, and the k, v projections of the same text, stay float behind Q/DQ.
"""

import collections

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def q_dq_matmuls(consumers: int, quantize_per_consumer: bool):
    """x (2, 448, 64) float -> QuantizeLinear (int8, symmetric) -> per consumer DequantizeLinear -> MatMul with its
    own per-channel int8 weight (64, 64), as `walt-export calibrate` writes a layer's projections."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, outputs = [], []
    if not quantize_per_consumer:
        nodes.append(helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["x_q"]))
    for i in range(consumers):
        quantized = f"x_q{i}" if quantize_per_consumer else "x_q"
        if quantize_per_consumer:
            nodes.append(helper.make_node("QuantizeLinear", ["x", "scale", "zero"], [quantized]))
        nodes += [helper.make_node("DequantizeLinear", [quantized, "scale", "zero"], [f"x_dq{i}"]),
                  helper.make_node("DequantizeLinear", [f"w{i}", "w_scale", "w_zero"], [f"w_dq{i}"], axis=1),
                  helper.make_node("MatMul", [f"x_dq{i}", f"w_dq{i}"], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    initializers = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
                    numpy_helper.from_array(np.array(0, np.int8), "zero"),
                    numpy_helper.from_array(np.full(64, 0.01, np.float32), "w_scale"),
                    numpy_helper.from_array(np.zeros(64, np.int8), "w_zero")]
    initializers += [numpy_helper.from_array(rng.integers(-127, 128, (64, 64), dtype=np.int8), f"w{i}")
                     for i in range(consumers)]
    graph = helper.make_graph(nodes, "projections", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [2, 448, 64])],
                              outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def optimized_ops(model, tmp_path, disabled: tuple[str, ...] = ()) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(disabled))
    return dict(collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))


def test_a_quantized_activation_read_by_one_matmul_runs_in_8_bits(tmp_path):
    assert optimized_ops(q_dq_matmuls(1, False), tmp_path) == {"QuantizeLinear": 1, "MatMulIntegerToFloat": 1}


def test_one_quantized_activation_shared_by_several_matmuls_stays_float(tmp_path):
    ops = optimized_ops(q_dq_matmuls(3, False), tmp_path)
    assert ops.get("MatMulIntegerToFloat", 0) == 0 and ops["MatMul"] == 3 and ops["DequantizeLinear"] == 6


def test_a_quantize_per_consumer_is_merged_back_unless_common_subexpression_elimination_is_off(tmp_path):
    """Why duplicating the QuantizeLinear per consumer in the file is not a fix by itself: onnxruntime's common
    subexpression elimination merges the copies before the Q/DQ fusion runs."""
    model = q_dq_matmuls(3, True)
    assert optimized_ops(model, tmp_path).get("MatMulIntegerToFloat", 0) == 0
    assert optimized_ops(model, tmp_path, ("CommonSubexpressionElimination",)) == {
        "QuantizeLinear": 3, "MatMulIntegerToFloat": 3}
