"""An exported ONNX model used like the PyTorch one, through ONNX Runtime.

* :class:`OnnxDetector`: Detectron2's model interface (a list of mapped dataset dicts: ``"image"``
  ``[3, H, W]`` in ``INPUT.FORMAT``, already resized by the test mapper, optional ``"height"`` /
  ``"width"`` of the original -> ``[{"instances": Instances}]`` in original pixels), so Detectron2's
  ``inference_on_dataset`` / ``DefaultTrainer.test`` and ``COCOEvaluator`` score it unchanged.
* :class:`OnnxPredictor`: ``DefaultPredictor``'s interface (one ``H x W x 3`` BGR numpy image ->
  ``{"instances": Instances}`` in its pixels) with the same preprocessing: ``ResizeShortestEdge``
  to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` and the ``INPUT.FORMAT`` channel order.

Both rescale the graph's boxes (input pixels) to the original size with Detectron2's
``detector_postprocess``, exactly as ``DETR.forward`` does, so they return what the PyTorch model
returns up to the export's numerical parity. A graph exported at a fixed size only takes images
that ``ResizeShortestEdge`` brings to that size (same aspect ratio); any other image is refused
with a clear error rather than resized differently from the PyTorch path.
"""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from detectron2.data import transforms as T
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances

from .onnx_export import OUTPUT_NAMES

__all__ = ["OnnxDetector", "OnnxPredictor", "providers_for_device"]

logger = logging.getLogger(__name__)

Provider = Union[str, Tuple[str, Dict[str, str]]]


def providers_for_device(device: str, available: Sequence[str]) -> List[Provider]:
    """ONNX Runtime execution providers for ``MODEL.DEVICE``: ``"cuda"`` / ``"cuda:N"`` -> the CUDA
    provider on GPU ``N`` (CPU as fallback for operators it lacks) when this ONNX Runtime has it
    (``available``: ``onnxruntime.get_available_providers()``); otherwise, and for ``"cpu"``, the
    CPU provider. A CUDA device without the CUDA provider is a warning, not an error: the plain
    ``onnxruntime`` wheel has none, and Detectron2's default ``MODEL.DEVICE`` is ``"cuda"``."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": index or "0"}), "CPUExecutionProvider"]
        logger.warning("MODEL.DEVICE=%s but this ONNX Runtime has no CUDAExecutionProvider (it has %s): the "
                       "exported model runs on the CPU. pip install onnxruntime-gpu to run it on the GPU.",
                       device, list(available))
    elif kind != "cpu":
        logger.warning("MODEL.DEVICE=%s: the exported model runs on ONNX Runtime's CPU provider.", device)
    return ["CPUExecutionProvider"]


class OnnxDetector(nn.Module):
    """Detectron2 model interface over an ONNX Runtime session of an exported
    :class:`~dinodet2.export.ExportableDETR` graph (CPU by default; ``providers``: ONNX Runtime's
    execution providers). ``fixed_size``: ``(height, width)`` of a fixed-size graph, None for a
    ``--dynamic`` one."""

    def __init__(self, onnx_path: str, providers: Optional[Sequence[Provider]] = None):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as e:
            raise ImportError(f"Running the exported model {onnx_path} needs 'onnxruntime' "
                              "(pip install onnxruntime, or pip install -e .[export]).") from e
        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"No ONNX model at {onnx_path!r} (MODEL.WEIGHTS): write one with "
                                    "tools/export_model.py --output.")
        self.onnx_path = onnx_path
        self.session = onnxruntime.InferenceSession(onnx_path, providers=list(providers or ["CPUExecutionProvider"]))
        (graph_input,) = self.session.get_inputs()
        self.input_name = graph_input.name
        height, width = graph_input.shape[2:]
        self.fixed_size: Optional[Tuple[int, int]] = (
            (height, width) if isinstance(height, int) and isinstance(width, int) else None)

    def detect(self, image: torch.Tensor) -> Instances:
        """Detections of the graph on one ``[3, H, W]`` image (``INPUT.FORMAT``, 0-255, resized):
        ``Instances`` of size ``(H, W)`` with ``pred_boxes`` (XYXY, input pixels), ``scores`` and
        ``pred_classes``, in descending score order."""
        size = tuple(image.shape[-2:])
        if self.fixed_size is not None and size != self.fixed_size:
            raise ValueError(
                f"The ONNX model {self.onnx_path} was exported for a fixed input of {self.fixed_size[0]} x "
                f"{self.fixed_size[1]} pixels, but this image is {size[0]} x {size[1]} after ResizeShortestEdge "
                "(INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST). Export with --dynamic for images of any aspect "
                f"ratio, or with --height {size[0]} --width {size[1]} if all your images have this one.")
        array = image.detach().to("cpu", torch.float32).numpy()[None]
        boxes, scores, labels = self.session.run(list(OUTPUT_NAMES), {self.input_name: array})
        instances = Instances(size)
        instances.pred_boxes = Boxes(torch.from_numpy(boxes))
        instances.scores = torch.from_numpy(scores)
        instances.pred_classes = torch.from_numpy(labels)
        return instances

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        results = []
        for inputs in batched_inputs:
            instances = self.detect(inputs["image"])
            height, width = inputs.get("height", instances.image_size[0]), inputs.get("width", instances.image_size[1])
            results.append({"instances": detector_postprocess(instances, height, width)})
        return results


class OnnxPredictor:
    """``DefaultPredictor`` over an exported ONNX model: ``predictor(image_bgr) -> {"instances"}``.

    ``cfg`` is the config the model was exported with; only ``INPUT.FORMAT``,
    ``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST`` and ``MODEL.DEVICE`` (the execution provider,
    :func:`providers_for_device`, unless ``providers`` are given) are used (the model itself is the
    graph). ``self.model`` is the :class:`OnnxDetector`."""

    def __init__(self, cfg, onnx_path: str, providers: Optional[Sequence[Provider]] = None):
        self.cfg = cfg.clone()
        if providers is None:
            try:
                import onnxruntime
            except ImportError:  # OnnxDetector says how to install it
                pass
            else:
                providers = providers_for_device(cfg.MODEL.DEVICE, onnxruntime.get_available_providers())
        self.model = OnnxDetector(onnx_path, providers)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT {self.input_format!r}: the predictor takes 'RGB' or 'BGR'.")

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        """``original_image``: ``H x W x 3`` uint8 in BGR order (OpenCV's), as ``DefaultPredictor``."""
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return self.model([{"image": image, "height": height, "width": width}])[0]
