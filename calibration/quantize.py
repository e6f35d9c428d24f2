"""INT8 Q/DQ models through `onnxruntime.quantization`, in the form TensorRT accepts, and the proof they are INT8.

Recipe (docs/tensorrt.md §7, docs/architecture.md §5): Conv, Gemm and MatMul with constant weights only, listed by
name (onnxruntime's `MatMulConstBOnly` is ignored in Q/DQ format, so the attention batch-matmuls are kept out this
way), Q/DQ on their inputs only (not their outputs, which may feed a batch-matmul; a tensor that feeds both a
quantized MatMul and a batch-matmul gets the float tensor back at the batch-matmul, `_unquantize_batch_matmuls`),
weights per-channel symmetric int8, activations per-tensor symmetric int8 (every zero point 0), biases left in
float (`QuantizeBias=False`: TensorRT rejects an int32 DequantizeLinear). The canonical model is quantized: its
`wattn` nodes are not quantizable ops and their function bodies are kept, so the plugin, fallback and attention
variants derive from the quantized canonical as for FP32.

Histogram methods (entropy, percentile) see one calibration sample at a time (their histograms are merged), so
memory stays at one sample's activations; the tokenizer stages, whose activations are video-sized, always use
minmax, which reduces each tensor to its range inside the graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from runtime.errors import UsageError
from walt_export.window_attention.onnx_contract import has_body, window_attention_nodes

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
VIDEO_STAGES = ("tokenizer_encoder", "tokenizer_decoder", "tokenizer_decoder_step")  # minmax only (see above)


class FeedsReader:
    """An onnxruntime `CalibrationDataReader` over recorded feeds (only the model's inputs are passed on)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str]):
        self.feeds = [{n: f[n] for n in input_names} for f in feeds]
        self.set_range(0, len(self.feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._items = iter(self.feeds[start_index:end_index])


def quantize_stage(stage: str, source: Path, out: Path, feeds: list[dict[str, np.ndarray]], method: str,
                   cache: Path | None = None) -> str:
    """Write the Q/DQ model of `source` (FP32 ONNX, external data beside it) to `out`; returns the method used.

    Args:
        cache: where onnxruntime writes the calibrated activation ranges (JSON); an existing one is reused.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}; methods: {', '.join(METHODS)}")
    if not feeds:
        raise ValueError(f"no calibration data for {stage}")
    used = "minmax" if stage in VIDEO_STAGES else method
    model = onnx.load(str(source), load_external_data=False)
    large = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    inputs = [i.name for i in model.graph.input]
    constants = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    weighted = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1
                and _is_weight(n.input[1], producers, constants)]
    if len(set(weighted)) != len(weighted) or not all(weighted):
        raise ValueError(f"{source.name}: nodes to quantize need unique names")
    with _quiet_onnxruntime():
        quantize_static(
            str(source), str(out), FeedsReader(feeds, inputs), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=weighted, use_external_data_format=large,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[used],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                           "CalibTensorRangeSymmetric": True,
                           "CalibStridedMinMax": 1},  # one sample per pass: the memory of one sample
            calibration_cache_path=None if cache is None else str(cache),
        )
    _unquantize_batch_matmuls(out)
    log.info("%s: quantized with %s over %d samples", stage, used, len(feeds))
    return used


def _unquantize_batch_matmuls(path: Path) -> None:
    """Rewire every activation x activation MatMul that onnxruntime gave a dequantized input (it shares one Q/DQ pair
    among all consumers of a tensor it quantizes for a weight MatMul) to the float tensor before that pair; the
    recipe keeps batch-matmuls in float (`qdq_problems`). Rewrites `path` in place; external data stays where it is."""
    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    changed = 0
    for node, i, dequantize in list(_quantized_batch_matmul_inputs(model)):
        quantize = producers.get(dequantize.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            node.input[i] = quantize.input[0]
            changed += 1
    if changed:
        onnx.save(model, str(path))
        log.debug("%s: %d batch-matmul inputs back to float", path.name, changed)


def _quantized_batch_matmul_inputs(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, int, onnx.NodeProto]]:
    """(MatMul, input index, its DequantizeLinear producer) of every dequantized input of an activation x activation
    MatMul (a batch-matmul: attention's QK^T and AV outside the wattn op), which the recipe keeps in float."""
    constants = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "MatMul" or _is_weight(node.input[1], producers, constants):
            continue
        for i, name in enumerate(node.input):
            if name in producers and producers[name].op_type == "DequantizeLinear":
                yield node, i, producers[name]


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's calibrators print progress and log a pre-processing hint on the root logger (pre-processing
    would inline the wattn op, so it does not apply): the prints go to the debug log, the hint is dropped."""
    def no_hint(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(no_hint)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(no_hint)
        if printed.getvalue():
            log.debug("onnxruntime: %s", printed.getvalue().strip())


def qdq_problems(model: onnx.ModelProto, expected_nodes: int, with_body: bool = True) -> list[str]:
    """What makes a Q/DQ model unfit for TensorRT or unfaithful to the recipe; empty when it is fine.

    Args:
        expected_nodes: how many `wattn` nodes it must keep (0 for a fallback variant).
        with_body: whether their function body must be there (the canonical model; not the plugin variant).
    """
    constants = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    problems = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = constants.get(node.input[2])
            if zero is not None and np.any(zero != 0):
                problems.append(f"{node.name}: zero point is not 0 (asymmetric)")
            if zero is not None and zero.dtype != np.int8:
                problems.append(f"{node.name}: quantizes to {zero.dtype}, not int8")
        if node.op_type == "DequantizeLinear" and node.input[0] in constants \
                and constants[node.input[0]].dtype == np.int32:
            problems.append(f"{node.name}: int32 DequantizeLinear (a quantized bias; TensorRT rejects it)")
    batch_matmuls: dict[str, list[str]] = {}
    for node, i, _ in _quantized_batch_matmul_inputs(model):
        batch_matmuls.setdefault(node.name, []).append(node.input[i])
    problems += [f"{name}: an activation x activation MatMul has quantized inputs {inputs}"
                 for name, inputs in batch_matmuls.items()]
    attention = window_attention_nodes(model)
    if len(attention) != expected_nodes:
        problems.append(f"{len(attention)} wattn nodes, expected {expected_nodes}")
    if attention and with_body and not has_body(model):
        problems.append("the wattn function body is missing")
    for node in attention:
        quantized = [i for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]
        if quantized:
            problems.append(f"{node.name}: window-attention inputs {quantized} are quantized")
    return problems


def qdq_summary(model: onnx.ModelProto) -> dict:
    """The proof of effect: quantized nodes among the quantizable ones, and the share of weights held in INT8."""
    constants = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS
                and len(n.input) > 1 and _is_weight(n.input[1], producers, constants)]
    quantized = [n for n in weighted if n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"]
    ops = Counter(n.op_type for n in model.graph.node)
    parameters = {i for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  for i in n.input[1:]}  # scales and zero points are not weights
    weights = [v for name, v in constants.items() if name not in parameters]
    int8 = sum(v.size for v in weights if v.dtype == np.int8)
    floating = sum(v.size for v in weights if v.dtype.kind == "f" and v.size > 1)
    return {"quantizable_nodes": len(weighted), "quantized_nodes": len(quantized),
            "quantized_by_op": dict(Counter(n.op_type for n in quantized)),
            "quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "int8_weights": int(int8), "float_weights": int(floating),
            "int8_weight_share": int8 / max(1, int8 + floating)}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant outputs; external data is not loaded (a zero-memory array of its shape and type)."""
    out = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            out[t.name] = np.broadcast_to(np.zeros((), dtype), tuple(t.dims))
        else:
            out[t.name] = numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _is_weight(name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray]) -> bool:
    """A constant, possibly behind DequantizeLinear, Transpose, Reshape or Cast."""
    while name not in constants:
        node = producers.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "Transpose", "Reshape", "Cast"):
            return False
        name = node.input[0]
    return True
