"""Clipping and filtering of annotation boxes, before and after augmentation."""
import numpy as np
from detectron2.structures import BoxMode

__all__ = ["MIN_BOX_SIZE", "clip_and_filter_annotations", "filter_by_visibility"]

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
