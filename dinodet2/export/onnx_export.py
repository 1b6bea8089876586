"""ONNX export of :class:`.ExportableDETR`, ONNX Runtime parity and the training-only-parts check.

``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter) is used; opset 17 is the
default (``GridSample``, which deformable attention's ``F.grid_sample`` becomes, needs opset >= 16).
"""
import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .exportable import ExportableDETR

__all__ = ["CLASS_NAMES_KEY", "TRAINING_ONLY_NAME_PARTS", "convert_to_openvino", "export_onnx", "onnx_class_names",
           "onnx_parity", "onnxruntime_outputs", "pytorch_and_onnxruntime_outputs", "training_only_names"]

#: Substrings of parameter / initializer names that only training uses: denoising (``denoising.``,
#: its ``label_embed``), the auxiliary training signals (token alignment, distillation heads), LoRA
#: adapters (merged before export) and the frozen distillation teacher. None may appear in the graph.
TRAINING_ONLY_NAME_PARTS = ("denoising", "label_embed", "training_signals", "teacher", "lora_")

OUTPUT_NAMES = ("boxes", "scores", "labels")
#: upper bound of a dynamic height / width (pixels)
MAX_DYNAMIC_SIZE = 4096
#: ONNX ``metadata_props`` key of the class names (a JSON list), what checkpoints store as ``class_names``
CLASS_NAMES_KEY = "dinodet2_class_names"


def export_onnx(model: torch.nn.Module, path: str, height: int, width: int, *, dynamic: bool = False,
                opset: int = 18, class_names: Optional[Sequence[str]] = None) -> ExportableDETR:
    """Write ``model`` (an eval-mode DETR, adapters already merged) as ONNX to ``path`` for a
    ``[1, 3, height, width]`` input; ``dynamic``: height and width are symbolic (any size from
    ``size_divisibility + 1`` to :data:`MAX_DYNAMIC_SIZE`); ``class_names`` are stored in the
    model's metadata (:data:`CLASS_NAMES_KEY`, read by :func:`onnx_class_names`). Returns the
    wrapper that was exported."""
    if opset < 16:
        raise ValueError(f"--opset {opset}: deformable attention needs ONNX GridSample (opset >= 16); use 17 or more.")
    wrapper = ExportableDETR(model).eval()
    example = torch.rand(1, 3, height, width) * 255
    dynamic_shapes = None
    if dynamic:
        # more than size_divisibility pixels per side, i.e. at least two tokens per side on the coarsest
        # level: a 1-token level is a different graph (size-1 broadcasting) the exporter cannot cover
        smallest = model.backbone.size_divisibility + 1
        dynamic_shapes = ({2: torch.export.Dim("height", min=smallest, max=MAX_DYNAMIC_SIZE),
                           3: torch.export.Dim("width", min=smallest, max=MAX_DYNAMIC_SIZE)},)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset, input_names=["image"],
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes,
                                    external_data=False, verbose=False)
    if class_names:
        program.model.metadata_props[CLASS_NAMES_KEY] = json.dumps([str(n) for n in class_names])
    program.save(path)
    return wrapper


def onnx_class_names(path: str) -> Optional[List[str]]:
    """The class names stored in the ONNX model at ``path`` by :func:`export_onnx`, or None."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(props[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in props else None


def onnxruntime_outputs(path: str, image: torch.Tensor) -> Tuple[np.ndarray, ...]:
    """``(boxes, scores, labels)`` of the ONNX model at ``path`` on ``image`` [1, 3, H, W] (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return tuple(session.run(list(OUTPUT_NAMES), {"image": image.numpy().astype(np.float32)}))


def pytorch_and_onnxruntime_outputs(wrapper: torch.nn.Module, path: str, images: Iterable[torch.Tensor]
                                    ) -> Iterator[Tuple[Tuple[np.ndarray, ...], Tuple[np.ndarray, ...]]]:
    """Per image: ``(boxes, scores, labels)`` of PyTorch (``wrapper``) and of ONNX Runtime (``path``),
    as numpy; both must return the same number of detections."""
    for image in images:
        with torch.no_grad():
            expected = tuple(t.numpy() for t in wrapper(image))
        exported = onnxruntime_outputs(path, image)
        if exported[1].shape != expected[1].shape:
            raise AssertionError(f"ONNX returned {exported[1].shape[0]} detections, PyTorch {expected[1].shape[0]}")
        yield expected, exported


def onnx_parity(wrapper: torch.nn.Module, path: str, images: Iterable[torch.Tensor]) -> Dict[str, float]:
    """Run PyTorch (``wrapper``) and ONNX Runtime (``path``) on every image and compare the top-k
    detections. Returns ``max_score_diff`` (max |Δ| between the two descending score lists),
    ``max_box_diff`` (input pixels: for every PyTorch detection, the max-coordinate distance to the
    nearest ONNX detection of the same class; ``inf`` if that class is missing) and
    ``label_mismatches`` (top-k positions whose label differs). Near-equal scores (an untrained
    model's) may swap ranks between the two runtimes; the nearest-same-class box distance does not
    count such a swap as a box error, where a rank-by-rank comparison would."""
    score_diff = box_diff = 0.0
    mismatches = 0
    pairs = pytorch_and_onnxruntime_outputs(wrapper, path, images)
    for (boxes, scores, labels), (o_boxes, o_scores, o_labels) in pairs:
        score_diff = max(score_diff, float(np.abs(o_scores - scores).max(initial=0.0)))
        for box, label in zip(boxes, labels):
            same = o_boxes[o_labels == label]
            box_diff = max(box_diff, float(np.abs(same - box).max(axis=1).min()) if len(same) else float("inf"))
        mismatches += int((o_labels != labels).sum())
    return {"max_score_diff": score_diff, "max_box_diff": box_diff, "label_mismatches": mismatches}


def training_only_names(path: str, model: Optional[torch.nn.Module] = None,
                        parts: Sequence[str] = TRAINING_ONLY_NAME_PARTS) -> List[str]:
    """What of the training-only parts is in the ONNX graph at ``path`` (an empty list: nothing).

    By name: initializers, nodes and values whose name contains one of ``parts``. By value (with
    ``model``, the exported one): every parameter / buffer of ``model`` whose name contains one of
    ``parts`` is looked for among the initializers, as is or transposed (the exporter renames
    weights it folds or transposes, so a name check alone could miss them); found ones are listed
    as ``"value of <name>"``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    names = [i.name for i in graph.initializer] + [n.name for n in graph.node]
    names += [v for n in graph.node for v in list(n.input) + list(n.output)]
    found = sorted({name for name in names if any(part in name for part in parts)})
    if model is not None:
        arrays = [numpy_helper.to_array(i) for i in graph.initializer]
        for name, tensor in model.state_dict().items():
            if not any(part in name for part in parts) or tensor.numel() < 2:
                continue
            value = tensor.detach().cpu().numpy()
            if any(_same(a, value) or (value.ndim == 2 and _same(a, value.T)) for a in arrays):
                found.append(f"value of {name}")
    return found


def _same(array: np.ndarray, value: np.ndarray) -> bool:
    return array.shape == value.shape and array.dtype == value.dtype and np.array_equal(array, value)


def convert_to_openvino(onnx_path: str, xml_path: Optional[str] = None) -> str:
    """Convert the ONNX file to OpenVINO IR (``.xml`` + ``.bin``); returns the ``.xml`` path."""
    try:
        import openvino
    except ImportError as e:
        raise SystemExit("--openvino needs the 'openvino' package: pip install openvino "
                         f"(the ONNX file {onnx_path} is written and usable without it).") from e
    xml_path = xml_path or os.path.splitext(onnx_path)[0] + ".xml"
    openvino.save_model(openvino.convert_model(onnx_path), xml_path)
    return xml_path
