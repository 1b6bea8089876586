"""Dataset mapper for DETR training and inference on box-only COCO-style data."""
import copy
import logging
from typing import Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

from .box_filters import MIN_BOX_SIZE, clip_and_filter_annotations, filter_by_visibility
from .multi_image import Sample
from .multi_image_pipeline import MultiImageAugmentation, read_sample

__all__ = ["DetrDatasetMapper", "clip_and_filter_annotations", "filter_by_visibility", "train_dataset_dicts"]


def train_dataset_dicts(cfg):
    """``DATASETS.TRAIN`` as Detectron2's default train loader reads it."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


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
    * Training applies the multi-image augmentations of ``INPUT.AUG.*`` (Mosaic, MixUp, CutMix,
      Copy-Paste; :class:`MultiImageAugmentation`) before the single-image ones while
      ``multi_image.active``; such outputs are box-only and, with MixUp label weighting, carry
      ``instances.gt_weights``.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_dicts=None):
        """``dataset_dicts``: the training set multi-image augmentations draw from (default: read
        ``DATASETS.TRAIN`` like Detectron2's train loader, only if such an augmentation is on)."""
        ret = super().from_config(cfg, is_train)
        if is_train:
            from .augmentations import build_train_augmentations

            augs = build_train_augmentations(cfg)
            if cfg.INPUT.CROP.ENABLED:  # Detectron2's own crop option, kept as in DatasetMapper
                augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
            ret["augmentations"] = augs
            aug = cfg.INPUT.AUG
            if any(op.ENABLED for op in (aug.MOSAIC, aug.MIXUP, aug.CUTMIX, aug.COPY_PASTE)):
                if dataset_dicts is None:
                    dataset_dicts = train_dataset_dicts(cfg)
                ret["multi_image"] = MultiImageAugmentation.from_config(cfg, dataset_dicts)
        ret["min_box_size"] = cfg.INPUT.AUG.MIN_BOX_SIZE
        ret["min_visibility"] = cfg.INPUT.AUG.MIN_VISIBILITY
        return ret

    @configurable
    def __init__(self, is_train: bool, *, min_box_size: float = 0.0, min_visibility: float = 0.0,
                 multi_image: Optional[MultiImageAugmentation] = None, **kwargs):
        """``min_box_size`` / ``min_visibility``: see :func:`filter_by_visibility` (training only);
        ``multi_image``: multi-image augmentations (training only); every other argument is
        :class:`DatasetMapper`'s."""
        super().__init__(is_train, **kwargs)
        self.min_box_size = min_box_size
        self.min_visibility = min_visibility
        self.multi_image = multi_image if is_train else None
        if self.multi_image is not None:
            logging.getLogger(__name__).info("[DetrDatasetMapper] Multi-image augmentations: %s", self.multi_image)

    def __call__(self, dataset_dict):
        """Map one Detectron2 dataset dict; see the class docstring. May return None in training."""
        if self.multi_image is not None and self.multi_image.active:
            try:
                sample = read_sample(dataset_dict, self.image_format)
            except OSError as e:
                return self._unreadable_image(dataset_dict["file_name"], e)
            return self.map_sample(dataset_dict, self.multi_image(sample))
        try:
            mapped = super().__call__(dataset_dict)
        except OSError as e:  # the parent's only I/O is reading the image (and sem-seg) file
            return self._unreadable_image(dataset_dict["file_name"], e)
        if self.is_train and "instances" not in mapped:
            image_size = tuple(mapped["image"].shape[-2:])
            mapped["instances"] = utils.annotations_to_instances([], image_size)
        return mapped

    def map_sample(self, dataset_dict, sample: Sample):
        """Training output for an already decoded (possibly composite) :class:`Sample`: the
        single-image augmentations, box clipping / filtering, ``instances`` (+ ``gt_weights``)."""
        aug_input = T.AugInput(sample.image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        weighted = self.multi_image is not None and self.multi_image.label_weighting
        annotations = [
            {"bbox": box.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c), "iscrowd": 0,
             **({"weight": float(w)} if weighted else {})}
            for box, c, w in zip(sample.boxes, sample.classes, sample.weights)
        ]
        # Slivers (<= MIN_BOX_SIZE px) that cutting boxes leaves are expected, not data errors: drop them silently.
        annotations, _ = clip_and_filter_annotations(annotations, sample.width, sample.height)
        mapped = {k: copy.deepcopy(v) for k, v in dataset_dict.items() if k not in ("annotations", "sem_seg_file_name")}
        mapped["height"], mapped["width"] = sample.height, sample.width  # the (composite) input image
        mapped["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        mapped["annotations"] = annotations
        self._transform_annotations(mapped, transforms, image_shape)
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
        if not any("weight" in anno for anno in annotations):
            super()._transform_annotations(dataset_dict, transforms, image_shape)
            return
        # MixUp label weights: carried through as instances.gt_weights (same filtering as the boxes).
        annotations = [utils.transform_instance_annotations(anno, transforms, image_shape)
                       for anno in dataset_dict.pop("annotations") if not anno.get("iscrowd", 0)]
        instances = utils.annotations_to_instances(annotations, image_shape)
        instances.gt_weights = torch.tensor([anno["weight"] for anno in annotations], dtype=torch.float32)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
