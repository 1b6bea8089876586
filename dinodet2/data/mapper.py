"""Dataset mapper for DETR training and inference on box-only COCO-style data."""
import logging

import numpy as np

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

__all__ = ["DetrDatasetMapper", "clip_and_filter_annotations"]

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
        dataset_dict["annotations"] = annotations
        super()._transform_annotations(dataset_dict, transforms, image_shape)
