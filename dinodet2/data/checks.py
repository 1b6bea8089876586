"""Early, actionable checks that the datasets named in a config are usable."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .shapes import is_shapes_dataset, prepare_shapes_dataset

__all__ = ["DatasetNotRegisteredError", "check_datasets_exist"]

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
