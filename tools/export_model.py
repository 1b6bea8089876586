#!/usr/bin/env python
"""Export a trained model to ONNX (and optionally OpenVINO IR), with an ONNX Runtime parity check.

Builds the model of ``--config-file`` (+ overrides), loads ``--weights`` (full, trainable-only or
merged checkpoint), merges its LoRA adapters into the DINOv2 weights, and writes the single-image
graph of :class:`dinodet2.export.ExportableDETR` to ``--output``: input ``image`` ``[1, 3, H, W]``
float in ``INPUT.FORMAT`` (0-255, already resized), outputs ``boxes`` ``[K, 4]`` (XYXY, input
pixels), ``scores`` ``[K]``, ``labels`` ``[K]``; normalisation, padding and the top-k
(``TEST.DETECTIONS_PER_IMAGE``) are inside the graph. The exporter is ``torch.onnx.export(...,
dynamo=True)``, opset 18 by default (deformable attention needs ``GridSample``, opset >= 16).

``--check`` runs ONNX Runtime and PyTorch on random images of the export size (with ``--dynamic``
also on other sizes) and prints max |Δscore| and max |Δbox|, and lists the graph names that
contain a training-only part (:data:`dinodet2.export.TRAINING_ONLY_NAME_PARTS`; none expected).

``--evaluate DATASET`` scores the (merged) PyTorch model and the ONNX file through ONNX Runtime
(:class:`dinodet2.export.OnnxDetector`) on the registered dataset with the same test loader and
Detectron2's ``COCOEvaluator`` (``Trainer.test``), and prints both box APs side by side. The class
names of the checkpoint (or of the registered training dataset) are stored in the ONNX metadata,
so ``tools/demo.py`` with ``MODEL.WEIGHTS model.onnx`` names the classes.

``--quantize int8`` also writes ``<output stem>.int8.onnx``: ONNX Runtime's dynamic INT8
quantisation of the ``MatMul`` nodes of ``--quantize-scope`` (default ``backbone``: the DINOv2 ViT's linear
layers; ``all``: every linear layer written as ``MatMul``), int8 per-channel weights and uint8
activations quantised at run time; the rest stays fp32 (:mod:`dinodet2.export.quantization`). With
``--check`` its detections are compared with PyTorch's (max |Δscore|, max |Δbox| to the nearest
same-class detection, top-10 label agreement) and its ViT features with the fp32 graph's (relative
error); with ``--evaluate`` it is scored too. ``MODEL.WEIGHTS model.int8.onnx`` runs it in the demo.

Example::

    python tools/export_model.py --config-file output/demo/config.yaml --weights output/demo/model_final.pth \\
        --output output/demo/model.onnx --dynamic --check --evaluate shapes_val [--openvino] [--quantize int8]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.engine.cpu_allocator import apply_allocator_config  # noqa: E402
from dinodet2.engine import Dinodet2Checkpointer, Trainer, stored_class_names  # noqa: E402
from dinodet2.export import (QUANTIZE_SCOPES, TRAINING_ONLY_NAME_PARTS, OnnxDetector,  # noqa: E402
                             convert_to_openvino, export_onnx, feature_error, int8_parity, onnx_parity,
                             quantize_int8, training_only_names)
from dinodet2.modeling.backbone.lora import merge_lora_  # noqa: E402


def check_sizes(height, width, divisor, dynamic):
    """The export size, plus (dynamic) two others that need padding: by half a divisor (the image
    edge then falls exactly on a token edge of the finer levels, where a float nearest resize of the
    padding mask goes wrong) and by one pixel less than a divisor."""
    sizes = [(height, width)]
    if dynamic:
        def half_past(n):
            return -(-n // divisor) * divisor + divisor // 2
        sizes += [(half_past(height), half_past(width)), (height + divisor + 1, width + 2 * divisor + 1)]
    return sizes


def coco_ap_pytorch_and_onnx(cfg, model, onnx_path, dataset_name, output_dir, int8_onnx_path=None):
    """COCO box metrics (``COCOEvaluator``'s ``bbox`` dict) of the PyTorch ``model`` and of the ONNX
    file through ONNX Runtime on the registered ``dataset_name``: ``{"pytorch": ..., "onnxruntime":
    ...}``, plus ``"onnxruntime_int8"`` with ``int8_onnx_path`` (the ``--quantize int8`` file). All go
    through ``Trainer.test`` (the same test loader, resize and evaluator); each evaluator writes its
    results under ``output_dir/<pytorch|onnxruntime|onnxruntime_int8>``."""
    if cfg.TEST.SLICED.ENABLED:
        raise ValueError("--evaluate: TEST.SLICED.ENABLED is not supported for the exported model; set it False.")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset_name,)
    results = {}
    detectors = [("pytorch", model), ("onnxruntime", OnnxDetector(onnx_path))]
    if int8_onnx_path:
        detectors.append(("onnxruntime_int8", OnnxDetector(int8_onnx_path)))
    for name, detector in detectors:
        evaluator = Trainer.build_evaluator(cfg, dataset_name, os.path.join(output_dir, name))
        results[name] = Trainer.test(cfg, detector, [evaluator])["bbox"]
    return results


def export(cfg, weights, output, height, width, *, dynamic=False, opset=18, openvino=False, check=False, seed=0,
           evaluate=None, quantize=None, quantize_scope="backbone"):
    """Export ``cfg``'s model with ``weights`` to ``output``; returns a report dict (paths, sizes and,
    with ``check``, the parity numbers per checked size and the training-only names found; with
    ``evaluate`` (a registered dataset), :func:`coco_ap_pytorch_and_onnx` on it). ``quantize="int8"``:
    also :func:`~dinodet2.export.quantize_int8` (``quantize_scope``) to ``<output stem>.int8.onnx``,
    reported under ``"int8"`` (with ``check``: ``"int8_parity"`` per size and ``"int8_feature_error"``)."""
    if quantize not in (None, "", "int8"):
        raise ValueError(f"--quantize {quantize!r}: only 'int8' is supported.")
    model = build_model(cfg).eval()
    if weights:
        Dinodet2Checkpointer(model).load(weights)
    merged = merge_lora_(model)
    with_weights = cfg.clone()
    with_weights.defrost()
    with_weights.MODEL.WEIGHTS = weights
    class_names, _ = stored_class_names(with_weights)
    wrapper = export_onnx(model, output, height, width, dynamic=dynamic, opset=opset, class_names=class_names)
    report = {"onnx": os.path.abspath(output), "opset": opset, "merged_lora_layers": merged,
              "input_size": [height, width], "dynamic": dynamic, "class_names": class_names}
    if check:
        g = torch.Generator().manual_seed(seed)
        report["parity"] = []
        for h, w in check_sizes(height, width, model.backbone.size_divisibility, dynamic):
            numbers = onnx_parity(wrapper, output, [torch.rand(1, 3, h, w, generator=g) * 255])
            report["parity"].append({"size": [h, w], **numbers})
        report["training_only_names"] = training_only_names(output, model)
    if quantize:
        report["int8"] = quantize_int8(output, scope=quantize_scope)
        if check:
            g = torch.Generator().manual_seed(seed)
            images = [torch.rand(1, 3, h, w, generator=g) * 255
                      for h, w in check_sizes(height, width, model.backbone.size_divisibility, dynamic)]
            report["int8_parity"] = [{"size": list(image.shape[2:]), **int8_parity(wrapper, report["int8"]["path"],
                                                                                   [image])} for image in images]
            report["int8_feature_error"] = max(feature_error(output, report["int8"]["path"], image, quantize_scope)
                                               for image in images)
    if openvino:
        report["openvino"] = convert_to_openvino(output)
    if evaluate:
        output_dir = os.path.join(os.path.dirname(os.path.abspath(output)), "evaluation", evaluate)
        report["evaluation"] = coco_ap_pytorch_and_onnx(cfg, model, output, evaluate, output_dir,
                                                        report["int8"]["path"] if quantize else None)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="checkpoint (full, trainable-only or merged); default: MODEL.WEIGHTS")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--height", type=int, default=0, help="input height (default: INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--width", type=int, default=0, help="input width (default: INPUT.MAX_SIZE_TEST)")
    parser.add_argument("--dynamic", action="store_true",
                        help="symbolic height / width (see the README for which sizes match PyTorch)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16 for GridSample)")
    parser.add_argument("--openvino", action="store_true", help="also write OpenVINO IR (.xml/.bin) next to it")
    parser.add_argument("--check", action="store_true", help="ONNX Runtime vs PyTorch parity + training-only check")
    parser.add_argument("--evaluate", metavar="DATASET", default="",
                        help="also score PyTorch and ONNX Runtime on this registered dataset (COCOEvaluator); "
                             "a fixed-size export needs images that resize to its size, use --dynamic otherwise")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="also write <output stem>.int8.onnx: ONNX Runtime dynamic INT8 quantisation of the "
                             "linear layers of --quantize-scope (checked / evaluated with --check / --evaluate)")
    parser.add_argument("--quantize-scope", choices=tuple(QUANTIZE_SCOPES), default="backbone",
                        help="backbone: the DINOv2 ViT's linear layers (default; the decoder stays fp32); "
                             "all: every linear layer exported as MatMul")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_dinodet2_config(args.config_file, args.opts)
    apply_allocator_config(cfg)
    report = export(cfg, args.weights or cfg.MODEL.WEIGHTS, args.output, args.height or cfg.INPUT.MIN_SIZE_TEST,
                    args.width or cfg.INPUT.MAX_SIZE_TEST, dynamic=args.dynamic, opset=args.opset,
                    openvino=args.openvino, check=args.check, evaluate=args.evaluate, quantize=args.quantize,
                    quantize_scope=args.quantize_scope)
    print(f"wrote {report['onnx']} (opset {args.opset}, input 1x3x{report['input_size'][0]}x{report['input_size'][1]}"
          f"{', dynamic height/width' if args.dynamic else ''}; {report['merged_lora_layers']} LoRA layers merged)")
    for p in report.get("parity", []):
        print(f"parity at {p['size'][0]}x{p['size'][1]}: max |Δscore| {p['max_score_diff']:.3g}, "
              f"max |Δbox| {p['max_box_diff']:.3g} px, label mismatches {p['label_mismatches']}")
    if args.check:
        found = report["training_only_names"]
        print("training-only parts in the graph: " + (", ".join(found) if found else "none") +
              f" (checked name parts: {', '.join(json.dumps(p) for p in TRAINING_ONLY_NAME_PARTS)})")
    if "int8" in report:
        q = report["int8"]
        print(f"wrote {q['path']} (INT8, scope {q['scope']}: {q['quantized_matmuls']} MatMuls quantised, "
              f"{q['int8_weights']} int8 weights, {q['fp32_matmuls']} MatMul/Gemm left in fp32)")
    for p in report.get("int8_parity", []):
        print(f"INT8 vs PyTorch at {p['size'][0]}x{p['size'][1]}: max |Δscore| {p['max_score_diff']:.3g}, max |Δbox| "
              f"{p['max_box_diff']:.3g} px (nearest same-class detection, top {p['top']}), top-{p['top']} label "
              f"agreement {p['top_label_agreement']:.0%}")
    if "int8_feature_error" in report:
        print("INT8 vs fp32 ONNX: relative error of the last quantised layer's output "
              f"{report['int8_feature_error']:.3g}")
    if "openvino" in report:
        print(f"wrote OpenVINO IR {report['openvino']}")
    if "evaluation" in report:
        evaluation = report["evaluation"]
        torch_ap, onnx_ap = evaluation["pytorch"], evaluation["onnxruntime"]
        int8_ap = evaluation.get("onnxruntime_int8")
        print(f"COCO box AP on {args.evaluate}: " + ", ".join(
            f"{k} PyTorch {torch_ap[k]:.2f} / ONNX Runtime {onnx_ap[k]:.2f}" +
            (f" / INT8 {int8_ap[k]:.2f}" if int8_ap else "") for k in ("AP", "AP50", "AP75")))
    return report


if __name__ == "__main__":
    main()
