"""INT8 dynamic quantisation of an exported ONNX model (ONNX Runtime) and how far it moves the outputs.

What is quantised (:func:`quantize_int8`): the ``MatMul`` nodes with a constant weight inside the
chosen modules (:data:`QUANTIZE_SCOPES`; default ``"backbone"``: the DINOv2 ViT's linear layers,
nearly all of the model's multiply-adds). ``nn.Linear`` is one such node: the dynamo exporter
writes it as ``MatMul`` (weight pre-transposed into an initializer) + ``Add``. Weights become int8,
symmetric, one scale per output channel; activations are quantised to uint8 at run time, one scale
per tensor (``DynamicQuantizeLinear``): ONNX Runtime's U8S8 format, what x86 VNNI (``vpdpbusd``:
uint8 x int8) computes. ONNX Runtime fuses these into ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat`` when it loads the file. Everything else stays fp32: the attention-score
``MatMul`` nodes (both inputs are activations), ``Gemm`` (``nn.MultiheadAttention``'s output
projection; ONNX Runtime's dynamic quantiser has no ``Gemm``), ``Conv`` (patch embedding, neck),
layer norms, softmax, deformable attention's ``GridSample`` and the top-k post-processing; with the
``"backbone"`` scope also every decoder and head linear layer (box regression, sampling offsets,
attention weights, class scores).

``onnxruntime.quantization.quant_pre_process`` is not run: its symbolic shape inference fails on
the dynamic height / width graph ("Incomplete symbolic shape inference"), and it is not needed:
``quantize_dynamic`` runs ONNX shape inference itself and every ``MatMul`` in scope is quantised
without it (checked by :func:`quantized_matmuls`).

How far it moves the outputs: :func:`int8_parity` (detections against PyTorch, robust to the rank
swaps that near-equal scores make) and :func:`feature_error` (relative error of the quantised
modules' output against the fp32 graph: the quantisation error itself, before the detection head
can hide it).
"""
import ast
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from .onnx_export import pytorch_and_onnxruntime_outputs

__all__ = ["QUANTIZE_SCOPES", "feature_error", "int8_parity", "int8_path", "quantize_int8", "quantized_matmuls"]

#: ``--quantize-scope`` -> the module-name prefixes whose MatMuls are quantised (None: every MatMul
#: with a constant weight). ``model.backbone``: the DINOv2 ViT and its neck (simple feature pyramid),
#: whose only linear layers are the ViT's.
QUANTIZE_SCOPES = {"backbone": ("model.backbone",), "all": None}
#: the ONNX node metadata key under which the dynamo exporter records a node's module path
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def int8_path(onnx_path: str) -> str:
    """``<stem>.int8.onnx`` next to ``onnx_path`` (``model.onnx`` -> ``model.int8.onnx``)."""
    return os.path.splitext(onnx_path)[0] + ".int8.onnx"


def _module_scopes(node) -> List[str]:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            return list(ast.literal_eval(prop.value))
    return []


def _nodes_in_modules(graph, op_type: str, prefixes: Sequence[str]) -> List:
    return [n for n in graph.node if n.op_type == op_type
            and any(s.startswith(p) for s in _module_scopes(n) for p in prefixes)]


def quantize_int8(onnx_path: str, output_path: Optional[str] = None, scope: str = "backbone") -> Dict:
    """Write the INT8 dynamic quantisation of the fp32 ONNX model ``onnx_path`` to ``output_path``
    (default :func:`int8_path`), quantising the constant-weight ``MatMul`` nodes of ``scope`` (a key of
    :data:`QUANTIZE_SCOPES`). The model's ``metadata_props`` (class names) are kept. Returns
    ``{"path", "scope", **quantized_matmuls(path)}``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scope not in QUANTIZE_SCOPES:
        raise ValueError(f"--quantize-scope {scope!r}: choose one of {', '.join(QUANTIZE_SCOPES)}.")
    output_path = output_path or int8_path(onnx_path)
    model = onnx.load(onnx_path)
    nodes = None
    if QUANTIZE_SCOPES[scope] is not None:
        nodes = [n.name for n in _nodes_in_modules(model.graph, "MatMul", QUANTIZE_SCOPES[scope])]
        if not nodes:
            raise ValueError(
                f"{onnx_path}: no MatMul node is recorded as part of {', '.join(QUANTIZE_SCOPES[scope])} (the "
                f"'{NAME_SCOPES_KEY}' node metadata written by torch.onnx.export(..., dynamo=True)). Export the "
                "file with tools/export_model.py, or quantise every MatMul with --quantize-scope all.")
    # it logs "Please consider to run pre-processing": not run on purpose (see the module docstring)
    quantize_dynamic(model, output_path, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_quantize=nodes)
    quantized = onnx.load(output_path)
    kept = {p.key for p in quantized.metadata_props}
    missing = [p for p in model.metadata_props if p.key not in kept]
    if missing:
        quantized.metadata_props.extend(missing)
        onnx.save(quantized, output_path)
    return {"path": os.path.abspath(output_path), "scope": scope, **quantized_matmuls(output_path)}


def quantized_matmuls(path: str) -> Dict[str, int]:
    """What of the ONNX model at ``path`` is integer: ``quantized_matmuls`` (``MatMulInteger``
    nodes), ``int8_weights`` (their weight inputs that are int8 initializers), ``fp32_matmuls``
    (``MatMul`` / ``Gemm`` nodes left in float, e.g. attention scores and the out-of-scope layers)."""
    import onnx

    graph = onnx.load(path).graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    return {"quantized_matmuls": len(integer), "int8_weights": sum(n.input[1] in int8 for n in integer),
            "fp32_matmuls": sum(n.op_type in ("MatMul", "Gemm") for n in graph.node)}


def int8_parity(wrapper: torch.nn.Module, path: str, images: Iterable[torch.Tensor], top: int = 10) -> Dict[str, float]:
    """PyTorch (``wrapper``, fp32) vs the quantised graph at ``path`` through ONNX Runtime on every
    image. Quantisation moves scores enough to swap near-equal ones, so detections are not compared
    rank by rank (as :func:`~dinodet2.export.onnx_parity`'s boxes, over the ``top`` best only):

    * ``max_score_diff``: max |Δ| between the two descending score lists (the i-th best score moves
      by no more than the largest score change of any detection);
    * ``max_box_diff``: for each of PyTorch's ``top`` best detections, the distance (max over the 4
      coordinates, input pixels) to the nearest INT8 detection of the same class; the max of these
      (``inf``: a class of PyTorch's top detections is missing from the INT8 ones);
    * ``top_label_agreement``: the fraction of the ``top`` ranks with the same class on both sides.
    """
    score_diff = box_diff = 0.0
    agree = total = 0
    pairs = pytorch_and_onnxruntime_outputs(wrapper, path, images)
    for (boxes, scores, labels), (q_boxes, q_scores, q_labels) in pairs:
        score_diff = max(score_diff, float(np.abs(q_scores - scores).max(initial=0.0)))
        for box, label in zip(boxes[:top], labels[:top]):
            same = q_boxes[q_labels == label]
            box_diff = max(box_diff, float(np.abs(same - box).max(axis=1).min()) if len(same) else float("inf"))
        n = min(top, len(labels))
        agree += int((q_labels[:n] == labels[:n]).sum())
        total += n
    return {"max_score_diff": score_diff, "max_box_diff": box_diff,
            "top_label_agreement": agree / total if total else 1.0, "top": top}


def feature_error(fp32_path: str, int8_path_: str, image: torch.Tensor, scope: str = "backbone") -> float:
    """Relative L2 error ``|int8 - fp32| / |fp32|`` of the output of the last quantised ``MatMul``
    of ``scope`` (with ``"backbone"``: the last MLP projection of the ViT), the INT8 graph against the
    fp32 one on ``image`` [1, 3, H, W]: the quantisation error before the detection head (a random
    or barely trained model's scores hardly depend on the features, so detections alone can hide a
    broken quantisation)."""
    import onnx
    import onnxruntime

    fp32 = onnx.load(fp32_path)
    prefixes = QUANTIZE_SCOPES[scope] or ("",)
    inits = {i.name for i in fp32.graph.initializer}
    candidates = [n for n in _nodes_in_modules(fp32.graph, "MatMul", prefixes) if n.input[1] in inits]
    if not candidates:
        raise ValueError(f"{fp32_path}: no MatMul with a constant weight in the {scope!r} scope.")
    name = candidates[-1].output[0]  # the quantiser gives the rescaled INT8 result the same name
    feed = {"image": image.numpy().astype(np.float32)}
    values = []
    for path in (fp32_path, int8_path_):
        model = onnx.load(path)
        model.graph.output.append(onnx.ValueInfoProto(name=name))
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        values.append(session.run([name], feed)[0])
    return float(np.linalg.norm(values[1] - values[0]) / np.linalg.norm(values[0]))

