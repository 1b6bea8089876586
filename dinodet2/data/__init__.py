"""Data layer: the synthetic shapes dataset, dataset checks, the DETR dataset mapper and its
single- and multi-image augmentations.

Importing this package registers ``shapes_train`` and ``shapes_val`` with Detectron2's
catalogs (under ``$DETECTRON2_DATASETS/shapes``, as read at import time).
"""
from .checks import DatasetNotRegisteredError, check_datasets_exist
from .curriculum import CurriculumSampler, build_curriculum_sampler, difficulty_scores
from .mapper import DetrDatasetMapper, clip_and_filter_annotations, train_dataset_dicts
from .multi_image_pipeline import MultiImageAugmentation
from .shapes import (
    SHAPES_CLASSES,
    default_shapes_root,
    generate_shapes_dataset,
    is_shapes_dataset,
    prepare_shapes_dataset,
    register_shapes_dataset,
    register_shapes_datasets,
    render_shapes_image,
)

register_shapes_datasets()

__all__ = [
    "CurriculumSampler",
    "DatasetNotRegisteredError",
    "DetrDatasetMapper",
    "MultiImageAugmentation",
    "build_curriculum_sampler",
    "SHAPES_CLASSES",
    "check_datasets_exist",
    "clip_and_filter_annotations",
    "default_shapes_root",
    "difficulty_scores",
    "generate_shapes_dataset",
    "is_shapes_dataset",
    "prepare_shapes_dataset",
    "register_shapes_dataset",
    "register_shapes_datasets",
    "render_shapes_image",
    "train_dataset_dicts",
]
