"""Multi-image augmentations on decoded samples: Mosaic, MixUp, CutMix and Copy-Paste.

Every operation takes :class:`Sample` objects (an HxWxC uint8 image with absolute ``XYXY`` boxes,
class ids and per-box loss weights) and returns a new one; randomness is drawn from ``rng``
(``numpy.random`` by default -- the generator Detectron2 seeds per dataloader worker -- or a
``numpy.random.RandomState``). Box handling is exact at pixel level:

* Boxes of an image that is resized follow the image's :class:`detectron2.data.transforms.ResizeTransform`.
* Boxes cut by a window (a mosaic cell, a CutMix region, the frame) are clipped to it.
* Boxes of an image partly covered by pasted pixels are *occluded* (:func:`occlude_boxes`): a box
  keeps the tight bounding box of its still-visible pixels; its visibility is the fraction of its
  pixels left uncovered.
* A box is dropped when its width or height is ``<= min_box_size`` or its visibility (cut or
  covered) is ``< min_visibility``; a box with no visible pixel is always dropped.

The composite samples are box-only (segmentations are used by Copy-Paste to cut objects, not
carried further). :mod:`dinodet2.data.multi_image_pipeline` draws the extra images from the
dataset and applies these operations from ``INPUT.AUG.*``.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data.transforms import ResizeTransform
from PIL import Image

__all__ = [
    "PasteObject",
    "Sample",
    "copy_paste",
    "cutmix",
    "fit_inside",
    "mixup",
    "mosaic",
    "occlude_boxes",
    "resize_sample",
]


@dataclass
class Sample:
    """A decoded training image with its boxes.

    ``image``: HxWxC uint8; ``boxes``: [N, 4] float64 absolute XYXY; ``classes``: [N] int64
    contiguous ids; ``weights``: [N] float64 loss weights (1 unless MixUp label weighting);
    ``segmentations``: per box a COCO segmentation (polygons or RLE) in this image's
    coordinates, or None -- only filled for samples read from the dataset.
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    weights: Optional[np.ndarray] = None
    segmentations: Optional[List] = field(default=None)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        if self.weights is None:
            self.weights = np.ones(len(self.boxes), dtype=np.float64)
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if not (len(self.boxes) == len(self.classes) == len(self.weights)):
            raise ValueError(f"Sample has {len(self.boxes)} boxes, {len(self.classes)} classes and "
                             f"{len(self.weights)} weights; they must match.")

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    def subset(self, keep: np.ndarray, boxes: Optional[np.ndarray] = None) -> "Sample":
        """The boxes selected by ``keep`` (replaced by ``boxes`` if given), same image, no segmentations."""
        keep = np.asarray(keep, dtype=bool)
        new_boxes = self.boxes if boxes is None else boxes
        return Sample(self.image, new_boxes[keep], self.classes[keep], self.weights[keep])


def _concat(image: np.ndarray, samples: Sequence[Sample]) -> Sample:
    return Sample(image,
                  np.concatenate([s.boxes for s in samples]) if samples else np.zeros((0, 4)),
                  np.concatenate([s.classes for s in samples]) if samples else np.zeros(0),
                  np.concatenate([s.weights for s in samples]) if samples else np.zeros(0))


def _size_ok(boxes: np.ndarray, min_box_size: float) -> np.ndarray:
    return ((boxes[:, 2] - boxes[:, 0]) > min_box_size) & ((boxes[:, 3] - boxes[:, 1]) > min_box_size)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def clip_to_window(sample: Sample, window: Tuple[float, float, float, float], min_box_size: float = 0.0,
                   min_visibility: float = 0.0) -> Sample:
    """Clip boxes to ``window`` (x0, y0, x1, y1); drop boxes too small or too little inside it."""
    x0, y0, x1, y1 = window
    area = _area(sample.boxes)
    clipped = np.clip(sample.boxes, [x0, y0, x0, y0], [x1, y1, x1, y1])
    keep = _size_ok(clipped, min_box_size) & (_area(clipped) > 0)
    keep &= _area(clipped) >= min_visibility * area
    return sample.subset(keep, clipped)


def resize_sample(sample: Sample, new_h: int, new_w: int) -> Sample:
    """Resize image (bilinear) and boxes (the same :class:`ResizeTransform`); keeps segmentations off."""
    if (new_h, new_w) == (sample.height, sample.width):
        return Sample(sample.image, sample.boxes.copy(), sample.classes, sample.weights)
    transform = ResizeTransform(sample.height, sample.width, new_h, new_w, Image.BILINEAR)
    boxes = transform.apply_box(sample.boxes) if len(sample.boxes) else sample.boxes.copy()
    return Sample(transform.apply_image(sample.image), boxes, sample.classes, sample.weights)


def _scaled_size(h: int, w: int, scale: float) -> Tuple[int, int]:
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def fit_inside(h: int, w: int, outer_h: int, outer_w: int) -> Tuple[int, int]:
    """Size of an ``h`` x ``w`` image resized, keeping its aspect ratio, to fit ``outer_h`` x ``outer_w``."""
    h2, w2 = _scaled_size(h, w, min(outer_h / h, outer_w / w))
    return min(h2, outer_h), min(w2, outer_w)


def occlude_boxes(sample: Sample, cover: np.ndarray, min_box_size: float = 0.0,
                  min_visibility: float = 0.0) -> Sample:
    """Reduce ``sample``'s boxes to their pixels not in the boolean ``cover`` mask (HxW).

    A box covers the pixels ``[floor(x0), ceil(x1)) x [floor(y0), ceil(y1))``. It keeps its
    original coordinate on every side where a visible pixel remains on the border pixel row or
    column and moves inwards to the tight bounding box of the visible pixels elsewhere. It is
    dropped when no pixel stays visible, when less than ``min_visibility`` of its pixels stay
    visible, or when the reduced box is ``<= min_box_size`` wide or high.
    """
    boxes = sample.boxes.copy()
    keep = np.ones(len(boxes), dtype=bool)
    h, w = cover.shape
    for i, (bx0, by0, bx1, by1) in enumerate(boxes):
        px0, py0 = max(int(math.floor(bx0)), 0), max(int(math.floor(by0)), 0)
        px1, py1 = min(int(math.ceil(bx1)), w), min(int(math.ceil(by1)), h)
        if px1 <= px0 or py1 <= py0:
            keep[i] = False
            continue
        visible = ~cover[py0:py1, px0:px1]
        count = int(visible.sum())
        if count == visible.size:
            continue
        if count == 0 or count < min_visibility * visible.size:
            keep[i] = False
            continue
        cols = np.flatnonzero(visible.any(0))
        rows = np.flatnonzero(visible.any(1))
        boxes[i] = [max(bx0, px0 + cols[0]), max(by0, py0 + rows[0]),
                    min(bx1, px0 + cols[-1] + 1), min(by1, py0 + rows[-1] + 1)]
    keep &= _size_ok(boxes, min_box_size)
    return sample.subset(keep, boxes)


# ---------------------------------------------------------------------------------------------
def mosaic(samples: Sequence[Sample], size: int, center: Tuple[int, int], pad_value: int = 114,
           min_box_size: float = 0.0, min_visibility: float = 0.0) -> Sample:
    """YOLO-style mosaic of 4 samples around ``center`` (cx, cy) of a ``2*size`` square canvas.

    Sample ``i`` is resized so that its longer side is ``size`` and placed with its bottom-right
    (i=0), bottom-left (1), top-right (2) or top-left (3) corner at the centre; parts outside
    the canvas are cut. The canvas is then cropped to the area the 4 images cover.
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic needs 4 samples, got {len(samples)}")
    cx, cy = int(center[0]), int(center[1])
    extent = 2 * size
    if not (0 < cx < extent and 0 < cy < extent):
        raise ValueError(f"mosaic centre {center} must lie inside the {extent}x{extent} canvas")
    channels = samples[0].image.shape[2]
    canvas = np.full((extent, extent, channels), pad_value, dtype=np.uint8)
    placed = []
    bounds = [extent, extent, 0, 0]
    for i, sample in enumerate(samples):
        h, w = _scaled_size(sample.height, sample.width, size / max(sample.height, sample.width))
        sample = resize_sample(sample, h, w)
        # Canvas window (x0, y0, x1, y1) of the image, before cutting to the canvas.
        left = cx - w if i in (0, 2) else cx
        top = cy - h if i in (0, 1) else cy
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + w, extent), min(top + h, extent)
        canvas[y0:y1, x0:x1] = sample.image[y0 - top:y1 - top, x0 - left:x1 - left]
        shifted = Sample(sample.image, sample.boxes + [left, top, left, top], sample.classes, sample.weights)
        placed.append(clip_to_window(shifted, (x0, y0, x1, y1), min_box_size, min_visibility))
        bounds = [min(bounds[0], x0), min(bounds[1], y0), max(bounds[2], x1), max(bounds[3], y1)]
    bx0, by0, bx1, by1 = bounds
    out = _concat(canvas[by0:by1, bx0:bx1], placed)
    out.boxes -= [bx0, by0, bx0, by0]
    return out


def mixup(first: Sample, second: Sample, ratio: float, offset: Tuple[int, int] = (0, 0),
          pad_value: int = 114, label_weighting: bool = False) -> Sample:
    """Blend ``ratio * first + (1 - ratio) * second`` on ``first``'s canvas; keep both box sets.

    ``second`` is resized (keeping its aspect ratio) to fit inside ``first`` and placed at
    ``offset`` (x, y); the rest of its layer is ``pad_value``. With ``label_weighting`` the boxes
    of ``first`` are weighted ``ratio`` and those of ``second`` ``1 - ratio``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mixup ratio must be in [0, 1], got {ratio}")
    h, w = fit_inside(second.height, second.width, first.height, first.width)
    second = resize_sample(second, h, w)
    ox, oy = int(offset[0]), int(offset[1])
    if not (0 <= ox <= first.width - w and 0 <= oy <= first.height - h):
        raise ValueError(f"mixup offset {offset} puts the {w}x{h} image outside the {first.width}x{first.height} one")
    layer = np.full_like(first.image, pad_value)
    layer[oy:oy + h, ox:ox + w] = second.image
    image = ratio * first.image.astype(np.float32) + (1.0 - ratio) * layer.astype(np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    a_weights, b_weights = first.weights, second.weights
    if label_weighting:
        a_weights, b_weights = a_weights * ratio, b_weights * (1.0 - ratio)
    moved = second.boxes + [ox, oy, ox, oy]
    return _concat(image, [Sample(image, first.boxes, first.classes, a_weights),
                           Sample(image, moved, second.classes, b_weights)])


def cutmix(first: Sample, second: Sample, region: Tuple[int, int, int, int], min_box_size: float = 0.0,
           min_visibility: float = 0.0) -> Sample:
    """Replace ``region`` (x0, y0, x1, y1, pixels) of ``first`` by the same region of ``second``.

    ``second`` is first resized (keeping its aspect ratio) to cover ``first`` (aligned at the
    top-left corner). Its boxes are cut to the region; ``first``'s boxes are occluded by it.
    """
    x0, y0, x1, y1 = (int(v) for v in region)
    if not (0 <= x0 < x1 <= first.width and 0 <= y0 < y1 <= first.height):
        raise ValueError(f"cutmix region {region} is not a non-empty part of the {first.width}x{first.height} image")
    scale = max(first.height / second.height, first.width / second.width)
    h, w = _scaled_size(second.height, second.width, scale)
    h, w = max(h, first.height), max(w, first.width)
    second = resize_sample(second, h, w)
    image = first.image.copy()
    image[y0:y1, x0:x1] = second.image[y0:y1, x0:x1]
    cover = np.zeros(image.shape[:2], dtype=bool)
    cover[y0:y1, x0:x1] = True
    kept = occlude_boxes(first, cover, min_box_size, min_visibility)
    pasted = clip_to_window(second, (x0, y0, x1, y1), min_box_size, min_visibility)
    return _concat(image, [kept, pasted])


@dataclass
class PasteObject:
    """An object cut out of an image: ``patch`` hxwxC uint8, ``mask`` hxw bool (None = whole
    rectangle), its class id and loss weight."""

    patch: np.ndarray
    mask: Optional[np.ndarray]
    category: int
    weight: float = 1.0

    def resized(self, h: int, w: int) -> "PasteObject":
        if (h, w) == self.patch.shape[:2]:
            return self
        transform = ResizeTransform(self.patch.shape[0], self.patch.shape[1], h, w, Image.BILINEAR)
        mask = None
        if self.mask is not None:
            mask = ResizeTransform(self.patch.shape[0], self.patch.shape[1], h, w, Image.NEAREST).apply_segmentation(
                self.mask.astype(np.uint8)).astype(bool)
        return PasteObject(transform.apply_image(self.patch), mask, self.category, self.weight)


def copy_paste(base: Sample, objects: Sequence[PasteObject], positions: Sequence[Tuple[int, int]],
               min_box_size: float = 0.0, min_visibility: float = 0.0) -> Sample:
    """Paste ``objects`` in order, top-left corner at ``positions`` (x, y), each fully inside.

    Every paste occludes the boxes already there (the base's and earlier pasted ones); a pasted
    object's box is the tight box of its mask (of its patch when it has no mask).
    """
    if len(objects) != len(positions):
        raise ValueError(f"copy_paste got {len(objects)} objects and {len(positions)} positions")
    image = base.image.copy()
    current = Sample(image, base.boxes, base.classes, base.weights)
    for obj, (x, y) in zip(objects, positions):
        h, w = obj.patch.shape[:2]
        if not (0 <= x <= image.shape[1] - w and 0 <= y <= image.shape[0] - h):
            raise ValueError(f"copy_paste position {(x, y)} puts a {w}x{h} object outside the image")
        mask = np.ones((h, w), dtype=bool) if obj.mask is None else obj.mask
        if not mask.any():
            continue
        window = image[y:y + h, x:x + w]
        window[mask] = obj.patch[mask]
        cover = np.zeros(image.shape[:2], dtype=bool)
        cover[y:y + h, x:x + w] = mask
        current = occlude_boxes(current, cover, min_box_size, min_visibility)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = np.array([[x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1]], dtype=np.float64)
        new = Sample(image, box, [obj.category], [obj.weight])
        new = new.subset(_size_ok(box, min_box_size))
        current = _concat(image, [current, new])
    return current
