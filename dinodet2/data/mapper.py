"""Dataset mapper for DETR training and inference on box-only COCO-style data, and the checked
training / evaluation dataset dicts it maps."""
import copy
import itertools
import logging
from typing import Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data import detection_utils as utils
from detectron2.data.build import print_instances_class_histogram
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

from .box_filters import MIN_BOX_SIZE, clip_and_filter_annotations, filter_by_visibility
from .checks import check_dataset_not_empty, check_num_classes, drop_images_without_usable_annotations
from .image_io import UnreadableImageError, read_image
from .multi_image import Sample
from .multi_image_pipeline import MultiImageAugmentation, multi_image_enabled, read_sample

__all__ = ["DetrDatasetMapper", "clip_and_filter_annotations", "eval_dataset_dicts", "filter_by_visibility",
           "train_dataset_dicts"]


def _load_datasets(names, config_key):
    """[(name, dicts)] of each dataset, each loaded once and checked to be non-empty."""
    datasets = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        check_dataset_not_empty(name, dicts, config_key)
        datasets.append((name, dicts))
    return datasets


def train_dataset_dicts(cfg):
    """``DATASETS.TRAIN`` as Detectron2's default train loader reads it for a box-only model
    (its ``get_detection_dataset_dicts``; precomputed proposals and keypoints are not used), each
    annotation file loaded once and checked before the first iteration: no dataset is empty,
    ``MODEL.DETR.NUM_CLASSES`` covers every category (:func:`check_num_classes`) and
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` leaves images
    (:func:`drop_images_without_usable_annotations`). Failures are ``ValueError`` s naming the
    dataset and the config key to change."""
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty; name at least one registered dataset.")
    datasets = _load_datasets(names, "DATASETS.TRAIN")
    check_num_classes(cfg.MODEL.DETR.NUM_CLASSES, datasets, "DATASETS.TRAIN")
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        datasets = drop_images_without_usable_annotations(datasets)
    dicts = list(itertools.chain.from_iterable(d for _, d in datasets))
    thing_classes = MetadataCatalog.get(names[0]).get("thing_classes", None)
    if "annotations" in dicts[0] and thing_classes is not None:
        utils.check_metadata_consistency("thing_classes", names)
        print_instances_class_histogram(dicts, thing_classes)
    return dicts


def eval_dataset_dicts(cfg, dataset_name: str):
    """One ``DATASETS.TEST`` dataset as Detectron2's test loader reads it (no filtering), checked
    to be non-empty and to need at most ``MODEL.DETR.NUM_CLASSES`` classes."""
    datasets = _load_datasets([dataset_name], "DATASETS.TEST")
    check_num_classes(cfg.MODEL.DETR.NUM_CLASSES, datasets, "DATASETS.TEST")
    return datasets[0][1]


class DetrDatasetMapper(DatasetMapper):
    """:class:`detectron2.data.DatasetMapper` made robust to imperfect data.

    On top of the parent (same config / constructor arguments):

    * Images are read with :func:`dinodet2.data.image_io.read_image`: Detectron2's reader, but
      16-bit / 32-bit / float grayscale pixels are scaled to 8 bits instead of clamped (an image
      whose pixels cannot be mapped raises :class:`~dinodet2.data.image_io.UnsupportedImageError`
      naming the file).
    * An image that cannot be read (missing, truncated, not an image) is skipped with a warning
      in training -- the mapper returns None and the loader draws another sample -- and raises a
      ``RuntimeError`` naming the file in inference.
    * Boxes are clipped to the image before augmentation; boxes that are non-finite or at most
      ``MIN_BOX_SIZE`` pixels wide or high after clipping are dropped (warned once per image).
    * Training outputs always carry ``instances`` with ``gt_boxes`` and ``gt_classes``, empty
      for images without (usable) annotations. Outputs are box-only: segmentations, keypoints,
      ``sem_seg_file_name`` and precomputed proposals are not mapped.
    * Training applies the multi-image augmentations of ``INPUT.AUG.*`` (Mosaic, MixUp, CutMix,
      Copy-Paste; :class:`MultiImageAugmentation`) before the single-image ones, unless built
      with ``strong_augmentation=False``; such outputs are box-only and, with MixUp label
      weighting, carry ``instances.gt_weights``.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_dicts=None, strong_augmentation: bool = True):
        """``dataset_dicts``: the training set multi-image augmentations draw from (default: read
        ``DATASETS.TRAIN`` like Detectron2's train loader, only if such an augmentation is on).
        ``strong_augmentation=False``: without the multi-image augmentations (the last iterations
        of :class:`~dinodet2.data.train_schedule.TrainDataSchedule`)."""
        ret = super().from_config(cfg, is_train)
        if is_train:
            from .augmentations import build_train_augmentations

            augs = build_train_augmentations(cfg)
            if cfg.INPUT.CROP.ENABLED:  # Detectron2's own crop option, kept as in DatasetMapper
                augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
            ret["augmentations"] = augs
            if strong_augmentation and multi_image_enabled(cfg):
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
        if not self.is_train:
            return self.map_for_inference(dataset_dict)
        try:
            sample = read_sample(dataset_dict, self.image_format)
        except UnreadableImageError as e:
            return self._unreadable_image(e)
        num_usable = sum(not anno.get("iscrowd", 0) for anno in dataset_dict.get("annotations", ()))
        num_dropped = num_usable - len(sample.boxes)  # read_sample dropped them
        if num_dropped:
            log_first_n(
                logging.WARNING,
                f"Dropped {num_dropped} annotation(s) of '{dataset_dict['file_name']}' with a "
                f"non-finite box or one at most {MIN_BOX_SIZE:g} px wide or high after clipping "
                "to the image.",
                key="message",
            )
        if self.multi_image is None:
            return self.map_sample(dataset_dict, sample)
        return self.map_sample(dataset_dict, self.multi_image(sample), weighted=self.multi_image.label_weighting)

    def map_for_inference(self, dataset_dict):
        """Inference output, as Detectron2's ``DatasetMapper``: the resized ``image``; ``height`` /
        ``width`` (the original size, the one predictions are mapped back to) kept or filled in;
        no ``annotations``."""
        try:
            image = read_image(dataset_dict["file_name"], format=self.image_format)
        except UnreadableImageError as e:
            return self._unreadable_image(e)
        mapped = {k: copy.deepcopy(v) for k, v in dataset_dict.items() if k not in ("annotations", "sem_seg_file_name")}
        utils.check_image_size(mapped, image)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        mapped["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return mapped

    def map_sample(self, dataset_dict, sample: Sample, weighted: bool = False):
        """Training output for a decoded (possibly composite) :class:`Sample`: the single-image
        augmentations, box clipping / filtering, ``instances`` (+ ``gt_weights`` if ``weighted``)."""
        aug_input = T.AugInput(sample.image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
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

    def _unreadable_image(self, error: UnreadableImageError):
        """Skip (training: warn once per file, return None) or fail (inference) on a bad image."""
        message = f"{error} Fix or replace the file, or remove it from the dataset's annotation JSON."
        if not self.is_train:
            raise RuntimeError(message) from error
        log_first_n(logging.WARNING, message + " Skipping it.", key="message")
        return None

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        """The parent's logic, after dropping boxes augmentation leaves too small / too hidden
        (``min_box_size`` / ``min_visibility``); MixUp weights become ``instances.gt_weights``."""
        annotations = dataset_dict["annotations"]
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
