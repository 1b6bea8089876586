"""Early, actionable checks that the datasets named in a config are usable.

Before any dataset is loaded: :func:`check_datasets_exist` (registered, files on disk). On the
loaded dataset dicts, before the first iteration / evaluation: :func:`check_dataset_not_empty`,
:func:`check_num_classes` and :func:`drop_images_without_usable_annotations`
(``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).
"""
import inspect
import logging
import os
from typing import List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.utils.file_io import PathManager

from .shapes import is_shapes_dataset, prepare_shapes_dataset

__all__ = [
    "DatasetNotRegisteredError",
    "check_dataset_not_empty",
    "check_datasets_exist",
    "check_num_classes",
    "drop_images_without_usable_annotations",
]

logger = logging.getLogger(__name__)

# (dataset name, its Detectron2 dataset dicts), in config order (a name may repeat).
NamedDatasets = List[Tuple[str, Sequence[dict]]]

_README = "datasets/README.md"


class DatasetNotRegisteredError(KeyError):
    """A dataset name that is not in Detectron2's ``DatasetCatalog``."""

    def __str__(self):
        # KeyError would print the message repr()-quoted, newlines escaped.
        return str(self.args[0])


def _datasets_root_description():
    """Where Detectron2 looks for its builtin datasets, for error messages."""
    value = os.getenv("DETECTRON2_DATASETS")
    if value is None:
        return "$DETECTRON2_DATASETS is not set, so the default './datasets' is used"
    return f"$DETECTRON2_DATASETS is currently '{value}'"


def _not_registered_message(name):
    return (
        f"Dataset '{name}' is not registered. Registered datasets: "
        f"{', '.join(sorted(DatasetCatalog.list()))}.\n"
        "To use your own COCO-format dataset, register it before building the trainer, e.g.\n"
        "    from detectron2.data.datasets import register_coco_instances\n"
        f"    register_coco_instances('{name}', {{}}, 'path/to/instances.json', "
        "'path/to/images')\n"
        f"See {_README}."
    )


def _missing_file_message(name, key, path):
    return (
        f"Dataset '{name}': its {key} '{path}' (absolute: '{os.path.abspath(path)}') does not "
        "exist. Detectron2's builtin datasets (e.g. coco_2017_train) are looked up under "
        f"$DETECTRON2_DATASETS, read when detectron2.data is first imported; "
        f"{_datasets_root_description()}. Put the files there, point DETECTRON2_DATASETS at the "
        f"folder that contains them, or register the dataset with the right paths. See {_README} "
        "for the expected layout."
    )


def check_datasets_exist(dataset_names):
    """Make sure every dataset in ``dataset_names`` is registered and its files are on disk.

    Shapes datasets are generated if needed. For other datasets the ``json_file`` and
    ``image_root`` recorded in their metadata (when present) must exist.

    Args:
        dataset_names (str or Iterable[str]): e.g. ``cfg.DATASETS.TRAIN``.

    Raises:
        DatasetNotRegisteredError: (a ``KeyError``) a name is not registered.
        FileNotFoundError: a recorded file or folder is missing.
    """
    if isinstance(dataset_names, str):
        dataset_names = [dataset_names]
    for name in dataset_names:
        if name not in DatasetCatalog.list():
            raise DatasetNotRegisteredError(_not_registered_message(name))
        if is_shapes_dataset(name):
            prepare_shapes_dataset(name)
            continue
        metadata = MetadataCatalog.get(name)
        for key in ("json_file", "image_root"):
            path = metadata.get(key, None)
            if path is not None and not PathManager.exists(path):
                raise FileNotFoundError(_missing_file_message(name, key, path))


def _annotation_file(name):
    """" (annotation file '...')" when the dataset's metadata records one, else ""."""
    json_file = MetadataCatalog.get(name).get("json_file", None)
    return f" (annotation file '{json_file}')" if json_file else ""


def check_dataset_not_empty(name: str, dataset_dicts: Sequence[dict], config_key: str = "DATASETS.TRAIN") -> None:
    """Raise a ``ValueError`` naming the dataset (and its annotation file) if it has no images.

    ``config_key``: where the dataset is named in the config, for the message.
    """
    if len(dataset_dicts) == 0:
        raise ValueError(
            f"Dataset '{name}'{_annotation_file(name)} contains no images (its \"images\" list is empty or "
            f"every image was skipped while loading). Fix the annotation file or the dataset's registration, "
            f"or remove '{name}' from {config_key}. See {_README}."
        )


def check_num_classes(num_classes: int, datasets: NamedDatasets, config_key: str = "DATASETS.TRAIN") -> None:
    """Make sure ``MODEL.DETR.NUM_CLASSES`` (``num_classes``) covers every category of ``datasets``.

    A dataset needs ``max(len(thing_classes), largest contiguous category_id + 1)`` classes (the
    metadata Detectron2's COCO loader records, and the ids its dicts carry). Fewer raise a
    ``ValueError`` naming the dataset, both counts and the key -- training would otherwise fail with
    an ``IndexError`` in the matcher / denoising queries at the first image with such a class.
    More are legal (those classes are never a target; e.g. COCO's 91 original ids) and are logged.
    """
    needed = {}  # name -> (classes needed, description)
    for name, dicts in datasets:
        thing_classes = MetadataCatalog.get(name).get("thing_classes", None)
        largest = max((anno["category_id"] for record in dicts for anno in record.get("annotations", ())),
                      default=None)
        counts = []
        if thing_classes is not None:
            counts.append((len(thing_classes), f"{len(thing_classes)} categories (len(thing_classes))"))
        if largest is not None:
            counts.append((largest + 1, f"largest contiguous category_id {largest}"))
        if counts:
            needed[name] = (max(c for c, _ in counts), ", ".join(d for _, d in counts))
    if not needed:
        return
    short = {name: n for name, (n, _) in needed.items() if n > num_classes}
    if short:
        required = max(short.values())
        details = "; ".join(f"dataset '{name}'{_annotation_file(name)} has {needed[name][1]}, so it needs "
                            f"{needed[name][0]} classes" for name in short)
        raise ValueError(
            f"MODEL.DETR.NUM_CLASSES={num_classes} is too small for {config_key}: {details}. The model "
            f"predicts classes 0..{num_classes - 1} only, and training would stop with an IndexError at the "
            f"first image of a higher class. Set MODEL.DETR.NUM_CLASSES {required} (the number of categories "
            f"in the annotation file) in the config or on the command line. See {_README}."
        )
    required = max(n for n, _ in needed.values())
    if num_classes > required:
        logger.info(
            "MODEL.DETR.NUM_CLASSES=%d is larger than the %d classes %s need (%s); the extra classes are "
            "never a target. This is allowed (e.g. COCO's original 91 category ids); NUM_CLASSES %d is enough.",
            num_classes, required, config_key,
            "; ".join(f"'{name}': {description}" for name, (_, description) in needed.items()), required,
        )


def _filter_images_with_only_crowd_annotations(dataset_dicts, name):
    """Detectron2's filter; newer versions also take the dataset name(s) for their log line."""
    if len(inspect.signature(filter_images_with_only_crowd_annotations).parameters) > 1:
        return filter_images_with_only_crowd_annotations(dataset_dicts, [name])
    return filter_images_with_only_crowd_annotations(dataset_dicts)


def _dropped_images_description(name, dataset_dicts):
    """How many images a dataset has, how many the filter drops, and why that probably is."""
    no_annotations = sum(1 for record in dataset_dicts if not record["annotations"])
    crowd_only = sum(1 for record in dataset_dicts
                     if record["annotations"] and all(a.get("iscrowd", 0) for a in record["annotations"]))
    causes = []
    if no_annotations:
        causes.append("the \"annotations\" list is empty, or the annotations' \"image_id\" values do not match "
                      "the \"id\" of any entry in \"images\" (Detectron2 then attaches no annotation to any image)")
    if crowd_only:
        causes.append("every annotation is a crowd region (\"iscrowd\": 1), which training ignores")
    return (f"dataset '{name}'{_annotation_file(name)}: {len(dataset_dicts)} images found, "
            f"{no_annotations + crowd_only} dropped ({no_annotations} without any annotation, {crowd_only} with "
            f"crowd annotations only); likely cause: {'; or '.join(causes)}")


def drop_images_without_usable_annotations(datasets: NamedDatasets) -> NamedDatasets:
    """``DATALOADER.FILTER_EMPTY_ANNOTATIONS=True``: drop the images without a non-crowd
    annotation (Detectron2's ``filter_images_with_only_crowd_annotations``, per dataset).

    Datasets whose dicts carry no ``annotations`` key are kept as they are (as Detectron2 does).
    Raises a ``ValueError`` naming the datasets, their image counts, the likely cause and the key
    when no image is left; warns about each dataset that loses all of its images.
    """
    kept = [(name, _filter_images_with_only_crowd_annotations(list(dicts), name)
             if len(dicts) and "annotations" in dicts[0] else dicts) for name, dicts in datasets]
    emptied = [_dropped_images_description(name, dicts)
               for (name, dicts), (_, left) in zip(datasets, kept) if len(dicts) and not len(left)]
    remedy = ("Set DATALOADER.FILTER_EMPTY_ANNOTATIONS False to train on unannotated images as pure "
              "background, or fix the annotations. See " + _README + ".")
    if not sum(len(left) for _, left in kept):
        raise ValueError(
            "No training image is left: DATALOADER.FILTER_EMPTY_ANNOTATIONS=True drops images without a "
            "non-crowd annotation, and that is every image of DATASETS.TRAIN -- " + "; ".join(emptied) + ". " + remedy
        )
    for description in emptied:
        logger.warning("DATALOADER.FILTER_EMPTY_ANNOTATIONS=True drops every image of %s. %s",
                       description, remedy)
    return kept
