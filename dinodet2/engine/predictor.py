"""A predictor for single images (Detectron2's ``DefaultPredictor`` path) and the class names to
show its predictions with: what the tools that run a trained model on images need
(``tools/demo.py``, ``tools/visualize_predictions.py``)."""
import logging
import os
from typing import List

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor

from ..inference import SlicedPredictor
from .checkpoint import Dinodet2Checkpointer, class_names_of
from .compilation import compile_model

logger = logging.getLogger(__name__)


def build_predictor(cfg):
    """DefaultPredictor (preprocessing, single-image inference, boxes in the original image's
    pixels) with ``MODEL.WEIGHTS`` loaded by Dinodet2Checkpointer instead of Detectron2's
    checkpointer (which unpickles .pkl files), so full, trainable-only, LoRA and LoRA-merged
    checkpoints all load; its model compiled as in training with ``MODEL.COMPILE.ENABLED``. With
    ``TEST.SLICED.ENABLED``: :class:`SlicedPredictor` (tiles of the original image; same checkpointer)."""
    if cfg.TEST.SLICED.ENABLED:
        predictor = SlicedPredictor(cfg)
        compile_model(cfg, predictor.model)
        return predictor
    without_weights = cfg.clone()
    without_weights.defrost()
    without_weights.MODEL.WEIGHTS = ""
    without_weights.freeze()
    predictor = DefaultPredictor(without_weights)
    if cfg.MODEL.WEIGHTS:
        Dinodet2Checkpointer(predictor.model).load(cfg.MODEL.WEIGHTS)
    compile_model(cfg, predictor.model)
    return predictor


def model_class_names(cfg) -> List[str]:
    """The names of the model's ``MODEL.DETR.NUM_CLASSES`` classes, from (in order) the class names
    stored in the checkpoint ``MODEL.WEIGHTS`` (:func:`.checkpoint.class_names_of`), the metadata of
    the registered training dataset ``DATASETS.TRAIN[0]``, else ``"class {i}"`` with a warning.
    A list shorter than the number of classes is completed with ``"class {i}"`` (warned)."""
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    names, source = None, None
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and os.path.isfile(weights):
        names, source = class_names_of(weights), f"checkpoint {weights}"
    train = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
    if not names and train and train in MetadataCatalog.list():
        names, source = MetadataCatalog.get(train).get("thing_classes", None), f"dataset '{train}'"
    if not names:
        logger.warning("No class names: the checkpoint MODEL.WEIGHTS=%r stores none and the training dataset "
                       "DATASETS.TRAIN[0]=%r is not registered (or has no thing_classes); predictions are "
                       "named 'class <i>'. Register the dataset before running, or use a checkpoint saved by "
                       "this version's trainer.", weights, train)
        return [f"class {i}" for i in range(num_classes)]
    names = [str(n) for n in names]
    if len(names) < num_classes:
        logger.warning("%s names %d classes but MODEL.DETR.NUM_CLASSES is %d; the others are named 'class <i>'.",
                       source, len(names), num_classes)
        names += [f"class {i}" for i in range(len(names), num_classes)]
    logger.info("Class names from %s: %s", source, names)
    return names
