"""Deployment export: the model as a single-image graph (:mod:`.exportable`) written to ONNX, with
an ONNX Runtime parity check and a training-only-parts check (:mod:`.onnx_export`)."""
from .exportable import ExportableDETR
from .onnx_export import (TRAINING_ONLY_NAME_PARTS, export_onnx, onnx_parity, onnxruntime_outputs,
                          training_only_names, convert_to_openvino)

__all__ = ["ExportableDETR", "TRAINING_ONLY_NAME_PARTS", "convert_to_openvino", "export_onnx", "onnx_parity",
           "onnxruntime_outputs", "training_only_names"]
