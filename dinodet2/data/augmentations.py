"""Single-image training augmentations built from ``INPUT.AUG.*`` (all off by default).

They are ordinary :mod:`detectron2.data.transforms` augmentations, so boxes go through the exact
transform of the image (``Transform.apply_box``), and the mapper then clips boxes to the output
image and drops boxes that are too small or too little visible (``INPUT.AUG.MIN_BOX_SIZE``,
``INPUT.AUG.MIN_VISIBILITY``):

* ``LSJ``: large-scale jitter (ViTDet / Copy-Paste recipe): resize by a random factor in
  ``[MIN_SCALE, MAX_SCALE]`` of a ``SIZE`` x ``SIZE`` target, then crop / pad to exactly that size
  (Detectron2's ``ResizeScale`` + ``FixedSizeCrop``). Replaces the shortest-edge resize.
* ``DETR_CROP``: DETR's random resize + crop: with probability ``PROB``, resize the shortest edge
  to one of ``RESIZE_SIZES`` and crop a random ``CROP_SIZE``-range patch, before the usual
  multi-scale resize.
* ``PHOTOMETRIC``: brightness, contrast, saturation (Detectron2's) and hue (:class:`RandomHue`),
  each applied with probability ``PROB``.
* horizontal flip: Detectron2's ``INPUT.RANDOM_FLIP``.
"""
import math
from typing import List

import numpy as np
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation
from detectron2.data.transforms import ColorTransform

__all__ = ["RandomHue", "build_train_augmentations"]


def _rotate_hue(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate the hue of an RGB/BGR uint8 or float image by ``angle`` radians about the grey axis.

    The rotation is an orthogonal map that keeps grey pixels grey and preserves luminance up to
    the final clipping to [0, 255]; the channel order does not matter for a rotation about the
    grey axis (only its direction flips).
    """
    cos, sin = np.cos(angle), np.sin(angle)
    k = 1.0 / 3.0
    root = np.sqrt(k)
    # Rodrigues rotation about the unit vector (1, 1, 1) / sqrt(3).
    matrix = np.array([
        [cos + k * (1 - cos), k * (1 - cos) - root * sin, k * (1 - cos) + root * sin],
        [k * (1 - cos) + root * sin, cos + k * (1 - cos), k * (1 - cos) - root * sin],
        [k * (1 - cos) - root * sin, k * (1 - cos) + root * sin, cos + k * (1 - cos)],
    ])
    out = image.astype(np.float32) @ matrix.T.astype(np.float32)
    out = np.clip(out, 0, 255)
    return out.astype(image.dtype) if image.dtype == np.uint8 else out


class RandomHue(T.Augmentation):
    """Shift the hue by a random fraction of the colour circle in ``[-max_shift, max_shift]``."""

    def __init__(self, max_shift: float):
        super().__init__()
        if not 0.0 <= max_shift <= 0.5:
            raise ValueError(f"INPUT.AUG.PHOTOMETRIC.HUE must be in [0, 0.5] (fraction of the hue circle), "
                             f"got {max_shift}.")
        self._init(locals())

    def get_transform(self, image):
        angle = np.random.uniform(-self.max_shift, self.max_shift) * 2 * np.pi
        return ColorTransform(lambda img: _rotate_hue(img, angle))


def check_range(values, key, low=0.0, high=math.inf):
    """``values`` as a float pair ``(lo, hi)`` with ``low <= lo <= hi <= high``; else a ValueError naming ``key``."""
    values = tuple(float(v) for v in values)
    if len(values) != 2 or not low <= values[0] <= values[1] <= high:
        raise ValueError(f"{key} must be (low, high) with {low:g} <= low <= high <= {high:g}, got {values}.")
    return values


def build_train_augmentations(cfg) -> List[T.Augmentation]:
    """Training augmentations: Detectron2's default list, changed by ``INPUT.AUG.*``."""
    aug = cfg.INPUT.AUG
    if aug.LSJ.ENABLED and aug.DETR_CROP.ENABLED:
        raise ValueError("INPUT.AUG.LSJ and INPUT.AUG.DETR_CROP both replace the resize; enable one of them.")
    augs = build_augmentation(cfg, True)  # [ResizeShortestEdge, RandomFlip?]
    if aug.LSJ.ENABLED:
        lo, hi = check_range(aug.LSJ.SCALE_RANGE, "INPUT.AUG.LSJ.SCALE_RANGE")
        size = int(aug.LSJ.SIZE)
        augs = [T.ResizeScale(lo, hi, size, size), T.FixedSizeCrop((size, size), pad=True)] + augs[1:]
    if aug.DETR_CROP.ENABLED:
        lo, hi = check_range(aug.DETR_CROP.CROP_SIZE, "INPUT.AUG.DETR_CROP.CROP_SIZE")
        crop = T.AugmentationList([
            T.ResizeShortestEdge(list(aug.DETR_CROP.RESIZE_SIZES), sample_style="choice"),
            T.RandomCrop("absolute_range", (int(lo), int(hi))),
        ])
        augs = [T.RandomApply(crop, prob=aug.DETR_CROP.PROB)] + augs
    p = aug.PHOTOMETRIC
    if p.ENABLED:
        photometric = [
            T.RandomApply(T.RandomBrightness(*check_range(p.BRIGHTNESS, "INPUT.AUG.PHOTOMETRIC.BRIGHTNESS")), p.PROB),
            T.RandomApply(T.RandomContrast(*check_range(p.CONTRAST, "INPUT.AUG.PHOTOMETRIC.CONTRAST")), p.PROB),
            T.RandomApply(T.RandomSaturation(*check_range(p.SATURATION, "INPUT.AUG.PHOTOMETRIC.SATURATION")), p.PROB),
            T.RandomApply(RandomHue(p.HUE), p.PROB),
        ]
        augs = photometric + augs
    return augs
