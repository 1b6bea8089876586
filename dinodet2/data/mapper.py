"""Dataset mapper for DETR training and inference on box-only COCO-style data."""
import logging

import numpy as np

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

__all__ = ["DetrDatasetMapper", "clip_and_filter_annotations", "filter_by_visibility"]

# Boxes whose width or height (after clipping to the image) is at most this many pixels are
# dropped.
MIN_BOX_SIZE = 1.0


def clip_and_filter_annotations(annotations, width, height, min_box_size=MIN_BOX_SIZE):
    """Clip annotation boxes to a ``width`` x ``height`` image and drop unusable ones.

    Boxes with a non-finite coordinate, or whose width or height is ``<= min_box_size`` after
    clipping, are dropped. Kept boxes are returned in ``BoxMode.XYXY_ABS``; crowd annotations are
    passed through unchanged (the mapper discards them during training).

    Returns:
        (list[dict], int): the kept annotations (new dicts) and the number dropped.
    """
    kept = []
    for anno in annotations:
        if anno.get("iscrowd", 0):
            kept.append(anno)
            continue
        box = np.asarray(
            BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS), dtype=np.float64
        )
        if not np.isfinite(box).all():
            continue
        box = np.clip(box, 0.0, [width, height, width, height])
        if box[2] - box[0] <= min_box_size or box[3] - box[1] <= min_box_size:
            continue
        kept.append({**anno, "bbox": box.tolist(), "bbox_mode": BoxMode.XYXY_ABS})
    return kept, len(annotations) - len(kept)


def filter_by_visibility(annotations, transforms, image_shape, min_box_size=0.0, min_visibility=0.0):
    """Drop boxes (``XYXY_ABS``, input-image coordinates) that augmentation leaves too small or too
    little visible in the output image of ``image_shape`` (h, w).

    A box is kept when, after ``transforms.apply_box`` and clipping to the output image, its width
    and height are > ``min_box_size`` and the clipped area is >= ``min_visibility`` x the
    transformed area. Crowd annotations pass through. Returns (kept, number dropped).
    """
    h, w = image_shape
    kept = []
    for anno in annotations:
        if anno.get("iscrowd", 0):
            kept.append(anno)
            continue
        box = transforms.apply_box(np.asarray([anno["bbox"]], dtype=np.float64))[0]
        area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
        clipped = np.clip(box, 0.0, [w, h, w, h])
        cw, ch = clipped[2] - clipped[0], clipped[3] - clipped[1]
        if cw <= min_box_size or ch <= min_box_size or area <= 0 or cw * ch < min_visibility * area:
            continue
        kept.append(anno)
    return kept, len(annotations) - len(kept)


class DetrDatasetMapper(DatasetMapper):
    """:class:`detectron2.data.DatasetMapper` made robust to imperfect data.

    On top of the parent (same config / constructor arguments):

    * An image that cannot be read (missing, truncated, not an image) is skipped with a warning
      in training -- the mapper returns None and Detectron2's ``MapDataset`` draws another
      sample -- and raises a ``RuntimeError`` naming the file in inference.
    * Boxes are clipped to the image before augmentation; boxes that are non-finite or at most
      ``MIN_BOX_SIZE`` pixels wide or high after clipping are dropped (warned once per image).
    * Training outputs always carry ``instances`` with ``gt_boxes`` and ``gt_classes``, empty
      for images without (usable) annotations.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train:
            from .augmentations import build_train_augmentations

            augs = build_train_augmentations(cfg)
            if cfg.INPUT.CROP.ENABLED:  # Detectron2's own crop option, kept as in DatasetMapper
                augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
            ret["augmentations"] = augs
        ret["min_box_size"] = cfg.INPUT.AUG.MIN_BOX_SIZE
        ret["min_visibility"] = cfg.INPUT.AUG.MIN_VISIBILITY
        return ret

    @configurable
    def __init__(self, is_train: bool, *, min_box_size: float = 0.0, min_visibility: float = 0.0, **kwargs):
        """``min_box_size`` / ``min_visibility``: see :func:`filter_by_visibility` (training only);
        every other argument is :class:`DatasetMapper`'s."""
        super().__init__(is_train, **kwargs)
        self.min_box_size = min_box_size
        self.min_visibility = min_visibility

    def __call__(self, dataset_dict):
        """Map one Detectron2 dataset dict; see the class docstring. May return None in training."""
        try:
            mapped = super().__call__(dataset_dict)
        except OSError as e:  # the parent's only I/O is reading the image (and sem-seg) file
            return self._unreadable_image(dataset_dict["file_name"], e)
        if self.is_train and "instances" not in mapped:
            image_size = tuple(mapped["image"].shape[-2:])
            mapped["instances"] = utils.annotations_to_instances([], image_size)
        return mapped

    def _unreadable_image(self, file_name, error):
        """Skip (training: warn once per file, return None) or fail (inference) on a bad image."""
        message = (
            f"Cannot read image '{file_name}' ({type(error).__name__}: {error}). "
            "Fix or replace the file, or remove it from the dataset's annotation JSON."
        )
        if not self.is_train:
            raise RuntimeError(message) from error
        log_first_n(logging.WARNING, message + " Skipping it.", key="message")
        return None

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        """Clip / drop bad boxes in original image coordinates, then apply the parent's logic."""
        annotations, num_dropped = clip_and_filter_annotations(
            dataset_dict["annotations"], dataset_dict["width"], dataset_dict["height"]
        )
        if num_dropped:
            log_first_n(
                logging.WARNING,
                f"Dropped {num_dropped} annotation(s) of '{dataset_dict['file_name']}' with a "
                f"non-finite box or one at most {MIN_BOX_SIZE:g} px wide or high after clipping "
                "to the image.",
                key="message",
            )
        if self.is_train and (self.min_box_size > 0 or self.min_visibility > 0):
            annotations, _ = filter_by_visibility(annotations, transforms, image_shape, self.min_box_size,
                                                  self.min_visibility)
        dataset_dict["annotations"] = annotations
        super()._transform_annotations(dataset_dict, transforms, image_shape)
