"""Mosaic -> MixUp -> CutMix -> Copy-Paste from ``INPUT.AUG.*``, drawing extra images from the dataset.

:class:`MultiImageAugmentation` lives inside the training dataset mapper (so it runs in the
dataloader workers). It holds the training set serialised once (Detectron2's
``DatasetFromList``) and draws the extra images of every operation at random from it with
``numpy.random`` -- the generator Detectron2 seeds per worker from ``SEED`` -- so a run is
deterministic for a fixed seed and number of workers. For the last iterations
(``INPUT.AUG.STRONG_OFF_LAST_ITERS``) the training loader is rebuilt with a mapper that has none
(:class:`dinodet2.data.train_schedule.TrainDataSchedule`).

Copy-Paste draws objects, not images: an object of class ``c`` is drawn with probability
proportional to ``n_c ** -RARE_CLASS_POWER`` where ``n_c`` is the number of (non-crowd)
objects of class ``c`` in the training set, so rare classes are pasted more often for
``RARE_CLASS_POWER > 0`` (1: every class equally often).
"""
import logging
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.data.common import DatasetFromList
from detectron2.structures import BoxMode
from detectron2.structures.masks import polygons_to_bitmask

from .augmentations import check_range
from .box_filters import clip_and_filter_annotations
from .image_io import read_image
from .multi_image import PasteObject, Sample, copy_paste, cutmix, fit_inside, mixup, mosaic

__all__ = ["MultiImageAugmentation", "ObjectIndex", "cut_object", "multi_image_enabled", "read_sample"]

logger = logging.getLogger(__name__)

# Extra images that cannot be read are replaced by other random images this many times.
MAX_DRAW_ATTEMPTS = 10


def multi_image_enabled(cfg) -> bool:
    """Whether ``INPUT.AUG`` enables any multi-image operation (Mosaic, MixUp, CutMix, Copy-Paste)."""
    aug = cfg.INPUT.AUG
    return any(op.ENABLED for op in (aug.MOSAIC, aug.MIXUP, aug.CUTMIX, aug.COPY_PASTE))


def _probability(value, key):
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be a probability in [0, 1], got {value}.")
    return value


def _decode_mask(segmentation, height: int, width: int) -> Optional[np.ndarray]:
    """COCO polygons or RLE -> HxW bool mask (None if the format is not understood)."""
    if isinstance(segmentation, list):
        polygons = [np.asarray(p, dtype=np.float64) for p in segmentation if len(p) >= 6]
        return polygons_to_bitmask(polygons, height, width) if polygons else None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        from pycocotools import mask as mask_util

        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_util.frPyObjects(rle, *rle["size"])
        return mask_util.decode(rle).astype(bool)
    return None


def read_sample(record: Dict, image_format: str) -> Sample:
    """A dataset dict's image (``image_format``, read by :func:`dinodet2.data.image_io.read_image`)
    and its usable non-crowd boxes (clipped; non-finite / degenerate ones dropped) with their
    segmentations. Raises :class:`~dinodet2.data.image_io.UnreadableImageError` (an ``OSError``)
    if the image cannot be read."""
    image = read_image(record["file_name"], format=image_format)
    utils.check_image_size(record, image)
    annotations, _ = clip_and_filter_annotations(record.get("annotations", []), image.shape[1], image.shape[0])
    annotations = [a for a in annotations if not a.get("iscrowd", 0)]
    return Sample(image, [a["bbox"] for a in annotations], [a["category_id"] for a in annotations],
                  segmentations=[a.get("segmentation") for a in annotations])


def cut_object(image: np.ndarray, annotation: Dict, use_masks: bool = True) -> Optional[PasteObject]:
    """The pixels of one annotated object (its box, masked by its segmentation if present)."""
    height, width = image.shape[:2]
    box = BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS)
    x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x1, y1 = min(int(math.ceil(box[2])), width), min(int(math.ceil(box[3])), height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    mask = None
    if use_masks and annotation.get("segmentation"):
        full = _decode_mask(annotation["segmentation"], height, width)
        if full is not None:
            mask = full[y0:y1, x0:x1]
            if not mask.any():
                return None
    return PasteObject(image[y0:y1, x0:x1].copy(), mask, int(annotation["category_id"]))


class ObjectIndex:
    """Every non-crowd object of a dataset, for drawing objects with a class preference."""

    def __init__(self, dataset_dicts: Sequence[Dict], rare_class_power: float):
        images, annos, classes = [], [], []
        for i in range(len(dataset_dicts)):
            record = dataset_dicts[i]
            for j, anno in enumerate(record.get("annotations", [])):
                if not anno.get("iscrowd", 0):
                    images.append(i)
                    annos.append(j)
                    classes.append(int(anno["category_id"]))
        self.image_index = np.asarray(images, dtype=np.int64)
        self.annotation_index = np.asarray(annos, dtype=np.int64)
        classes = np.asarray(classes, dtype=np.int64)
        self.classes, counts = np.unique(classes, return_counts=True)
        self.class_counts = dict(zip(self.classes.tolist(), counts.tolist()))
        weights = counts.astype(np.float64) ** (1.0 - rare_class_power)
        self.class_probabilities = weights / weights.sum() if len(weights) else weights
        self._objects_of_class = [np.flatnonzero(classes == c) for c in self.classes]

    def __len__(self) -> int:
        return len(self.image_index)

    def draw(self, rng) -> tuple:
        """(dataset index, annotation index) of a random object."""
        c = rng.choice(len(self.classes), p=self.class_probabilities)
        objects = self._objects_of_class[c]
        k = objects[rng.randint(len(objects))]
        return int(self.image_index[k]), int(self.annotation_index[k])


class MultiImageAugmentation:
    """Applies the enabled multi-image operations to a training sample.

    Args:
        dataset_dicts: the training set (Detectron2 dataset dicts, or the loader's
            ``DatasetFromList`` of them) extra images are drawn from.
        image_format: ``INPUT.FORMAT``, how images are read.
        mosaic / mixup / cutmix / copy_paste: each None (off) or a dict of its parameters
            (``prob`` and the keyword arguments shown in :meth:`from_config`).
        pad_value, min_box_size, min_visibility: see :mod:`dinodet2.data.multi_image`.
    """

    def __init__(self, dataset_dicts: Sequence[Dict], image_format: str = "BGR", *, mosaic: Optional[Dict] = None,
                 mixup: Optional[Dict] = None, cutmix: Optional[Dict] = None, copy_paste: Optional[Dict] = None,
                 pad_value: int = 114, min_box_size: float = 0.0, min_visibility: float = 0.0):
        if len(dataset_dicts) == 0:
            raise ValueError("Multi-image augmentation needs a non-empty training set to draw images from.")
        self.mosaic_args, self.mixup_args, self.cutmix_args, self.copy_paste_args = mosaic, mixup, cutmix, copy_paste
        self.pad_value = int(pad_value)
        self.min_box_size = float(min_box_size)
        self.min_visibility = float(min_visibility)
        self.image_format = image_format
        self.objects = None
        if copy_paste is not None:
            self.objects = ObjectIndex(dataset_dicts, copy_paste["rare_class_power"])
            if len(self.objects) == 0:
                raise ValueError("INPUT.AUG.COPY_PASTE.ENABLED needs annotated objects in DATASETS.TRAIN; found none.")
            logger.info("Copy-Paste draws from %d objects; class probabilities: %s", len(self.objects),
                        {int(c): round(float(p), 4) for c, p in zip(self.objects.classes, self.objects.class_probabilities)})
        # Detectron2's serialised list (one pickled buffer, shared by forked workers); the training
        # loader's own DatasetFromList is reused when given, so the dataset is held once.
        self.dataset = (dataset_dicts if isinstance(dataset_dicts, DatasetFromList)
                        else DatasetFromList(list(dataset_dicts), copy=False, serialize=True))

    @classmethod
    def from_config(cls, cfg, dataset_dicts) -> Optional["MultiImageAugmentation"]:
        """The operations enabled under ``INPUT.AUG.*`` (None when none is)."""
        aug = cfg.INPUT.AUG
        ops = {}
        if aug.MOSAIC.ENABLED:
            if int(aug.MOSAIC.SIZE) < 2:
                raise ValueError(f"INPUT.AUG.MOSAIC.SIZE must be >= 2 pixels, got {aug.MOSAIC.SIZE}.")
            ops["mosaic"] = {"prob": _probability(aug.MOSAIC.PROB, "INPUT.AUG.MOSAIC.PROB"),
                             "size": int(aug.MOSAIC.SIZE),
                             "center_range": check_range(aug.MOSAIC.CENTER_RANGE, "INPUT.AUG.MOSAIC.CENTER_RANGE", 0.0, 2.0)}
        if aug.MIXUP.ENABLED:
            if float(aug.MIXUP.ALPHA) <= 0:
                raise ValueError(f"INPUT.AUG.MIXUP.ALPHA must be > 0 (Beta(ALPHA, ALPHA) blend ratio), got {aug.MIXUP.ALPHA}.")
            ops["mixup"] = {"prob": _probability(aug.MIXUP.PROB, "INPUT.AUG.MIXUP.PROB"),
                            "alpha": float(aug.MIXUP.ALPHA), "label_weighting": bool(aug.MIXUP.LABEL_WEIGHTING)}
        if aug.CUTMIX.ENABLED:
            area = check_range(aug.CUTMIX.AREA_RANGE, "INPUT.AUG.CUTMIX.AREA_RANGE", 0.0, 1.0)
            if area[1] <= 0:
                raise ValueError(f"INPUT.AUG.CUTMIX.AREA_RANGE must allow an area > 0, got {area}.")
            ops["cutmix"] = {"prob": _probability(aug.CUTMIX.PROB, "INPUT.AUG.CUTMIX.PROB"), "area_range": area}
        if aug.COPY_PASTE.ENABLED:
            if int(aug.COPY_PASTE.MAX_OBJECTS) < 1:
                raise ValueError(f"INPUT.AUG.COPY_PASTE.MAX_OBJECTS must be >= 1, got {aug.COPY_PASTE.MAX_OBJECTS}.")
            scale = check_range(aug.COPY_PASTE.SCALE_RANGE, "INPUT.AUG.COPY_PASTE.SCALE_RANGE")
            if scale[0] <= 0:
                raise ValueError(f"INPUT.AUG.COPY_PASTE.SCALE_RANGE must be > 0, got {scale}.")
            ops["copy_paste"] = {"prob": _probability(aug.COPY_PASTE.PROB, "INPUT.AUG.COPY_PASTE.PROB"),
                                 "max_objects": int(aug.COPY_PASTE.MAX_OBJECTS), "scale_range": scale,
                                 "rare_class_power": float(aug.COPY_PASTE.RARE_CLASS_POWER),
                                 "use_masks": bool(aug.COPY_PASTE.USE_MASKS)}
        if not ops:
            return None
        if not 0 <= int(aug.PAD_VALUE) <= 255:
            raise ValueError(f"INPUT.AUG.PAD_VALUE must be a grey level in [0, 255], got {aug.PAD_VALUE}.")
        return cls(dataset_dicts, cfg.INPUT.FORMAT, pad_value=aug.PAD_VALUE, min_box_size=aug.MIN_BOX_SIZE,
                   min_visibility=aug.MIN_VISIBILITY, **ops)

    @property
    def label_weighting(self) -> bool:
        """Whether samples carry MixUp loss weights (the mapper then adds ``gt_weights``)."""
        return bool(self.mixup_args and self.mixup_args["label_weighting"])

    def __repr__(self) -> str:
        ops = {k: v for k, v in (("mosaic", self.mosaic_args), ("mixup", self.mixup_args),
                                 ("cutmix", self.cutmix_args), ("copy_paste", self.copy_paste_args)) if v}
        return f"MultiImageAugmentation({ops})"

    # ------------------------------------------------------------------------------------------
    def draw_sample(self, rng) -> Optional[Sample]:
        """A random readable sample of the dataset (None after MAX_DRAW_ATTEMPTS unreadable ones)."""
        for _ in range(MAX_DRAW_ATTEMPTS):
            record = self.dataset[rng.randint(len(self.dataset))]
            try:
                return read_sample(record, self.image_format)
            except OSError as e:
                logger.warning("Multi-image augmentation skips unreadable image '%s' (%s).", record["file_name"], e)
        return None

    def __call__(self, sample: Sample, rng=np.random) -> Sample:
        """Apply each enabled operation with its probability, in the order of the module docstring."""
        if self.mosaic_args and rng.rand() < self.mosaic_args["prob"]:
            sample = self.apply_mosaic(sample, rng)
        if self.mixup_args and rng.rand() < self.mixup_args["prob"]:
            sample = self.apply_mixup(sample, rng)
        if self.cutmix_args and rng.rand() < self.cutmix_args["prob"]:
            sample = self.apply_cutmix(sample, rng)
        if self.copy_paste_args and rng.rand() < self.copy_paste_args["prob"]:
            sample = self.apply_copy_paste(sample, rng)
        return sample

    def apply_mosaic(self, sample: Sample, rng) -> Sample:
        others = [self.draw_sample(rng) for _ in range(3)]
        if any(o is None for o in others):
            return sample
        size = self.mosaic_args["size"]
        lo, hi = self.mosaic_args["center_range"]
        center = tuple(int(round(rng.uniform(lo, hi) * size)) for _ in range(2))
        center = tuple(min(max(c, 1), 2 * size - 1) for c in center)
        samples = [sample] + others
        order = rng.permutation(4)  # the base image is not always in the same cell
        return mosaic([samples[i] for i in order], size, center, self.pad_value, self.min_box_size,
                      self.min_visibility)

    def apply_mixup(self, sample: Sample, rng) -> Sample:
        other = self.draw_sample(rng)
        if other is None:
            return sample
        ratio = float(rng.beta(self.mixup_args["alpha"], self.mixup_args["alpha"]))
        h, w = fit_inside(other.height, other.width, sample.height, sample.width)
        offset = (rng.randint(sample.width - w + 1), rng.randint(sample.height - h + 1))
        return mixup(sample, other, ratio, offset, self.pad_value, self.mixup_args["label_weighting"])

    def apply_cutmix(self, sample: Sample, rng) -> Sample:
        other = self.draw_sample(rng)
        if other is None:
            return sample
        side = math.sqrt(rng.uniform(*self.cutmix_args["area_range"]))
        w = min(max(1, int(round(side * sample.width))), sample.width)
        h = min(max(1, int(round(side * sample.height))), sample.height)
        x0, y0 = rng.randint(sample.width - w + 1), rng.randint(sample.height - h + 1)
        return cutmix(sample, other, (x0, y0, x0 + w, y0 + h), self.min_box_size, self.min_visibility)

    def apply_copy_paste(self, sample: Sample, rng) -> Sample:
        args = self.copy_paste_args
        objects: List[PasteObject] = []
        positions = []
        for _ in range(rng.randint(1, args["max_objects"] + 1)):
            image_index, anno_index = self.objects.draw(rng)
            record = self.dataset[image_index]
            try:
                image = read_image(record["file_name"], format=self.image_format)
            except OSError as e:
                logger.warning("Copy-Paste skips unreadable image '%s' (%s).", record["file_name"], e)
                continue
            obj = cut_object(image, record["annotations"][anno_index], args["use_masks"])
            if obj is None:
                continue
            scale = rng.uniform(*args["scale_range"]) * min(sample.height, sample.width) / min(image.shape[:2])
            h, w = obj.patch.shape[:2]
            scale = min(scale, sample.height / h, sample.width / w)  # must fit inside the image
            h, w = min(max(1, int(round(h * scale))), sample.height), min(max(1, int(round(w * scale))), sample.width)
            if h < 2 or w < 2:
                continue
            objects.append(obj.resized(h, w))
            positions.append((rng.randint(sample.width - w + 1), rng.randint(sample.height - h + 1)))
        if not objects:
            return sample
        return copy_paste(sample, objects, positions, self.min_box_size, self.min_visibility)
