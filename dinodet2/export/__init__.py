"""Deployment export: the model as a single-image graph (:mod:`.exportable`) written to ONNX, with
an ONNX Runtime parity check and a training-only-parts check (:mod:`.onnx_export`), its INT8 dynamic
quantisation (:mod:`.quantization`), and the exported model run like the PyTorch one through ONNX
Runtime (:mod:`.onnx_predictor`)."""
from .exportable import ExportableDETR
from .onnx_export import (CLASS_NAMES_KEY, TRAINING_ONLY_NAME_PARTS, export_onnx, onnx_class_names, onnx_parity,
                          onnxruntime_outputs, training_only_names, convert_to_openvino)
from .onnx_predictor import OnnxDetector, OnnxPredictor, providers_for_device
from .quantization import QUANTIZE_SCOPES, feature_error, int8_parity, int8_path, quantize_int8, quantized_matmuls

__all__ = ["CLASS_NAMES_KEY", "ExportableDETR", "OnnxDetector", "OnnxPredictor", "QUANTIZE_SCOPES",
           "TRAINING_ONLY_NAME_PARTS", "convert_to_openvino", "export_onnx", "feature_error", "int8_parity",
           "int8_path", "onnx_class_names", "onnx_parity", "onnxruntime_outputs", "providers_for_device",
           "quantize_int8", "quantized_matmuls", "training_only_names"]
