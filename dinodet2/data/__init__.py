"""Data layer: the synthetic shapes datasets, dataset checks, the image reader, the DETR dataset
mapper and its single- and multi-image augmentations.

Importing this package registers ``shapes_train`` and ``shapes_val`` (under
``$DETECTRON2_DATASETS/shapes``) and ``shapes_hard_train`` and ``shapes_hard_val`` (under
``$DETECTRON2_DATASETS/shapes_hard``) with Detectron2's catalogs, the variable as read at import
time.
"""
from .checks import (
    DatasetNotRegisteredError,
    check_dataset_not_empty,
    check_datasets_exist,
    check_num_classes,
    drop_images_without_usable_annotations,
)
from .curriculum_sampler import CurriculumSampler, build_curriculum_sampler, difficulty_scores
from .image_io import UnreadableImageError, UnsupportedImageError, read_image
from .mapper import DetrDatasetMapper, clip_and_filter_annotations, eval_dataset_dicts, train_dataset_dicts
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
from .shapes_hard import (
    SHAPES_HARD_CLASSES,
    default_shapes_hard_root,
    generate_shapes_hard_dataset,
    register_shapes_hard_dataset,
    register_shapes_hard_datasets,
    render_shapes_hard_image,
)
from .train_schedule import TrainDataSchedule

register_shapes_datasets()
register_shapes_hard_datasets()

__all__ = [
    "CurriculumSampler",
    "DatasetNotRegisteredError",
    "DetrDatasetMapper",
    "MultiImageAugmentation",
    "UnreadableImageError",
    "UnsupportedImageError",
    "build_curriculum_sampler",
    "SHAPES_CLASSES",
    "SHAPES_HARD_CLASSES",
    "TrainDataSchedule",
    "check_dataset_not_empty",
    "check_datasets_exist",
    "check_num_classes",
    "clip_and_filter_annotations",
    "default_shapes_hard_root",
    "default_shapes_root",
    "difficulty_scores",
    "drop_images_without_usable_annotations",
    "eval_dataset_dicts",
    "generate_shapes_dataset",
    "generate_shapes_hard_dataset",
    "is_shapes_dataset",
    "prepare_shapes_dataset",
    "read_image",
    "register_shapes_dataset",
    "register_shapes_datasets",
    "register_shapes_hard_dataset",
    "register_shapes_hard_datasets",
    "render_shapes_image",
    "render_shapes_hard_image",
    "train_dataset_dicts",
]
