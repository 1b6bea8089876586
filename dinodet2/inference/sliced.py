"""Sliced inference for large images (SAHI-style tiling): the detector runs on overlapping tiles cut
from the original image (plus, optionally, the whole image), and the tiles' detections, mapped back to
the original image, are merged class-aware.

* :class:`SlicedInference` -- the component (``TEST.SLICED.*``): ``sliced(model, image)`` gives the
  detections of one original-size ``CHW`` image as :class:`~detectron2.structures.Instances` in its
  coordinates.
* :class:`SlicedDetector` -- a model wrapper whose inference forward is sliced, for Detectron2's
  evaluation (``Trainer.test`` uses it with ``TEST.SLICED.ENABLED``; its test loader then gives the
  original images).
* :class:`SlicedPredictor` -- ``DefaultPredictor``'s interface (a BGR ``HWC`` array in, ``{"instances"}``
  out) with sliced inference.

Each tile is given to the detector as a normal input dict, ``{"image", "height", "width"}``: the
tile's original pixels resized by the model's test-time resize (``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``, the transform ``DatasetMapper(is_train=False)`` and ``DefaultPredictor`` apply),
with the tile's own size as ``height`` / ``width``, so the detector's ``detector_postprocess`` returns
boxes in tile pixels; they are shifted by the tile's offset. Tiles go through the model in batches
of ``TEST.SLICED.TILE_BATCH``. A tile's box that an inner tile edge cuts and that the neighbour across
the edge sees more of is dropped before merging (:meth:`.tiling.TileGrid.cut_by_inner_edge`).
"""
from typing import Dict, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model, detector_postprocess
from detectron2.structures import Boxes, Instances

from .box_merging import MERGE_METHODS, merge_detections
from .tiling import TileGrid, overlap_pixels

__all__ = ["SlicedDetector", "SlicedInference", "SlicedPredictor", "check_sliced_config"]


def check_sliced_config(cfg) -> None:
    """``ValueError`` naming the ``TEST.SLICED`` key that is out of range, and how to fix it."""
    s = cfg.TEST.SLICED
    if int(s.TILE_SIZE) != s.TILE_SIZE or s.TILE_SIZE < 1:
        raise ValueError(f"TEST.SLICED.TILE_SIZE={s.TILE_SIZE} must be a positive integer (tile side in pixels).")
    if s.OVERLAP < 0 or overlap_pixels(s.OVERLAP, int(s.TILE_SIZE)) >= s.TILE_SIZE:
        raise ValueError(f"TEST.SLICED.OVERLAP={s.OVERLAP} must be >= 0 and leave tiles a step: a fraction "
                         f"of TILE_SIZE below 1, or pixels below TILE_SIZE={s.TILE_SIZE}.")
    if s.MERGE not in MERGE_METHODS:
        raise ValueError(f"TEST.SLICED.MERGE='{s.MERGE}' is not a merge method; use one of {sorted(MERGE_METHODS)}.")
    if not 0 < s.MERGE_IOU < 1:
        raise ValueError(f"TEST.SLICED.MERGE_IOU={s.MERGE_IOU} must be in (0, 1).")
    for key in ("TILE_BATCH", "MAX_DETECTIONS"):
        if int(s[key]) != s[key] or s[key] < 1:
            raise ValueError(f"TEST.SLICED.{key}={s[key]} must be a positive integer.")
    if s.CUT_BOX_MARGIN < 0:
        raise ValueError(f"TEST.SLICED.CUT_BOX_MARGIN={s.CUT_BOX_MARGIN} must be >= 0 (pixels).")


class SlicedInference:
    """Detections of a large image from overlapping tiles (see the module docstring)."""

    @configurable
    def __init__(self, *, tile_size: int, overlap: float, full_image: bool, merge: str, merge_iou: float,
                 max_detections: int, tile_batch: int, cut_box_margin: float, resize: List[T.Augmentation]):
        """``tile_size``: tile side in pixels (tiles are clipped to smaller images); ``overlap``: between
        neighbouring tiles, a fraction of ``tile_size`` (< 1) or pixels (>= 1); ``full_image``: also run
        the whole image (catches objects larger than the overlap); ``merge``: "nms" or "wbf"
        (:mod:`.box_merging`) with ``merge_iou``; ``max_detections``: kept per image after merging;
        ``tile_batch``: tiles per forward; ``cut_box_margin``: how near (pixels) an inner tile edge a
        box counts as cut by it; ``resize``: the model's test-time resize, applied to each tile."""
        if merge not in MERGE_METHODS:
            raise ValueError(f"Unknown merge method '{merge}'; use one of {sorted(MERGE_METHODS)}.")
        self.tile_size = int(tile_size)
        self.overlap = overlap_pixels(overlap, self.tile_size)
        self.full_image = bool(full_image)
        self.merge = merge
        self.merge_iou = float(merge_iou)
        self.max_detections = int(max_detections)
        self.tile_batch = int(tile_batch)
        self.cut_box_margin = float(cut_box_margin)
        self.resize = T.AugmentationList(list(resize))

    @classmethod
    def from_config(cls, cfg):
        check_sliced_config(cfg)
        s = cfg.TEST.SLICED
        return {"tile_size": s.TILE_SIZE, "overlap": s.OVERLAP, "full_image": s.FULL_IMAGE, "merge": s.MERGE,
                "merge_iou": s.MERGE_IOU, "max_detections": s.MAX_DETECTIONS, "tile_batch": s.TILE_BATCH,
                "cut_box_margin": s.CUT_BOX_MARGIN,
                # what DatasetMapper(cfg, is_train=False) and DefaultPredictor resize with
                "resize": utils.build_augmentation(cfg, is_train=False)}

    def model_input(self, crop: torch.Tensor) -> Dict:
        """The detector's input dict for one ``CHW`` crop: resized as a test image, its own size as
        ``height`` / ``width`` (predictions come back in crop pixels)."""
        aug_input = T.AugInput(crop.permute(1, 2, 0).cpu().numpy())
        self.resize(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return {"image": image, "height": crop.shape[-2], "width": crop.shape[-1]}

    def run_model(self, model, inputs: List[Dict]) -> List[Instances]:
        """``model``'s instances for ``inputs``, ``tile_batch`` inputs per forward."""
        outputs = []
        for start in range(0, len(inputs), self.tile_batch):
            outputs.extend(out["instances"] for out in model(inputs[start:start + self.tile_batch]))
        return outputs

    def __call__(self, model, image: torch.Tensor) -> Instances:
        """Detections of ``image`` (``CHW``, original pixels, in the model's ``INPUT.FORMAT``) as
        ``Instances`` of size ``(H, W)`` with ``pred_boxes`` (XYXY, image pixels), ``scores`` and
        ``pred_classes``, at most ``max_detections``. ``model``: a Detectron2 detector in eval mode."""
        height, width = image.shape[-2:]
        grid = TileGrid.over(height, width, self.tile_size, self.overlap)
        tiles = grid.tiles()
        crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in tiles]
        if self.full_image and len(tiles) > 1:  # one tile is already the whole image
            crops.append(image)
        outputs = self.run_model(model, [self.model_input(crop) for crop in crops])
        boxes, scores, classes = [], [], []
        for k, instances in enumerate(outputs):
            tile_boxes = instances.pred_boxes.tensor
            keep = slice(None)
            if k < len(tiles):
                x0, y0 = tiles[k][:2]
                tile_boxes = tile_boxes + tile_boxes.new_tensor([x0, y0, x0, y0])
                keep = ~grid.cut_by_inner_edge(tile_boxes, k, self.cut_box_margin)
            boxes.append(tile_boxes[keep])
            scores.append(instances.scores[keep])
            classes.append(instances.pred_classes[keep])
        boxes, scores, classes = merge_detections(self.merge, torch.cat(boxes), torch.cat(scores),
                                                  torch.cat(classes), self.merge_iou, self.max_detections)
        result = Instances((height, width))
        result.pred_boxes = Boxes(boxes)
        result.scores = scores
        result.pred_classes = classes
        return result


class SlicedDetector(torch.nn.Module):
    """``model`` whose inference is sliced: each input dict's ``image`` (original size, as the test
    loader gives it with no resize) goes through :class:`SlicedInference`, and the detections are
    mapped to the input's ``height`` / ``width`` (``detector_postprocess``), as the detector's own
    forward would. Inference only: training goes to ``model`` itself."""

    def __init__(self, model: torch.nn.Module, sliced: SlicedInference):
        super().__init__()
        self.model = model
        self.sliced = sliced

    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            raise RuntimeError("SlicedDetector is for inference; train the wrapped model (SlicedDetector.model).")
        processed = []
        for x in batched_inputs:
            instances = self.sliced(self.model, x["image"])
            height, width = x.get("height", instances.image_size[0]), x.get("width", instances.image_size[1])
            processed.append({"instances": detector_postprocess(instances, height, width)})
        return processed


class SlicedPredictor:
    """``DefaultPredictor`` with sliced inference: ``predictor(bgr_hwc_uint8)`` -> ``{"instances"}``
    in the image's coordinates. The model is built from ``cfg`` and ``MODEL.WEIGHTS`` loaded by
    ``Dinodet2Checkpointer`` (LoRA and trainable-only checkpoints load as in training); the tiles
    follow ``TEST.SLICED.*`` (``TEST.SLICED.ENABLED`` is not needed)."""

    def __init__(self, cfg):
        from ..engine.checkpoint import Dinodet2Checkpointer  # the engine imports this package

        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            Dinodet2Checkpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.sliced = SlicedInference(self.cfg)
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"SlicedPredictor reads BGR arrays; INPUT.FORMAT='{cfg.INPUT.FORMAT}' must be RGB or BGR.")
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            image = torch.as_tensor(np.ascontiguousarray(original_image.transpose(2, 0, 1)))
            return {"instances": self.sliced(self.model, image)}
