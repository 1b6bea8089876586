"""A predictor for single images (Detectron2's ``DefaultPredictor`` path, or ONNX Runtime for an
exported ``.onnx`` model) and the class names to show its predictions with: what the tools that
run a trained model on images need (``tools/demo.py``, ``tools/visualize_predictions.py``)."""
import logging
import os
from typing import List, Optional, Tuple

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor

from ..inference import SlicedPredictor
from .checkpoint import Dinodet2Checkpointer, class_names_of
from .compilation import compile_model

logger = logging.getLogger(__name__)


def is_onnx_model(weights: str) -> bool:
    """Whether ``MODEL.WEIGHTS`` names a model exported by ``tools/export_model.py`` (``.onnx``)."""
    return weights.lower().endswith(".onnx")


def build_predictor(cfg):
    """DefaultPredictor (preprocessing, single-image inference, boxes in the original image's
    pixels) with ``MODEL.WEIGHTS`` loaded by Dinodet2Checkpointer instead of Detectron2's
    checkpointer (which unpickles .pkl files), so full, trainable-only, LoRA and LoRA-merged
    checkpoints all load; its model compiled as in training with ``MODEL.COMPILE.ENABLED``. With
    ``TEST.SLICED.ENABLED``: :class:`SlicedPredictor` (tiles of the original image; same checkpointer).
    ``MODEL.WEIGHTS`` ending in ``.onnx`` (an exported model): :class:`~dinodet2.export.OnnxPredictor`,
    the same interface and preprocessing through ONNX Runtime (on the GPU of a ``cuda`` ``MODEL.DEVICE``
    when ONNX Runtime has its CUDA provider, else the CPU)."""
    if is_onnx_model(cfg.MODEL.WEIGHTS):
        if cfg.TEST.SLICED.ENABLED:
            raise ValueError(f"TEST.SLICED.ENABLED is not supported with an exported model (MODEL.WEIGHTS="
                             f"{cfg.MODEL.WEIGHTS}): set it False, or run the .pth checkpoint.")
        from ..export.onnx_predictor import OnnxPredictor

        return OnnxPredictor(cfg, cfg.MODEL.WEIGHTS)
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


def stored_class_names(cfg) -> Tuple[Optional[List[str]], str]:
    """``(names, where from)``: the class names stored with ``MODEL.WEIGHTS`` (a checkpoint's,
    :func:`.checkpoint.class_names_of`; an exported ``.onnx`` model's metadata,
    :func:`~dinodet2.export.onnx_class_names`), else the ``thing_classes`` of the registered
    training dataset ``DATASETS.TRAIN[0]``; ``(None, "")`` when neither has them."""
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and os.path.isfile(weights):
        if is_onnx_model(weights):
            from ..export.onnx_export import onnx_class_names

            names, source = onnx_class_names(weights), f"ONNX model {weights}"
        else:
            names, source = class_names_of(weights), f"checkpoint {weights}"
        if names:
            return [str(n) for n in names], source
    train = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
    if train and train in MetadataCatalog.list():
        names = MetadataCatalog.get(train).get("thing_classes", None)
        if names:
            return [str(n) for n in names], f"dataset '{train}'"
    return None, ""


def model_class_names(cfg) -> List[str]:
    """The names of the model's ``MODEL.DETR.NUM_CLASSES`` classes: :func:`stored_class_names`,
    else ``"class {i}"`` with a warning. A list shorter than the number of classes is completed
    with ``"class {i}"`` (warned)."""
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    names, source = stored_class_names(cfg)
    if not names:
        logger.warning("No class names: the model file MODEL.WEIGHTS=%r stores none and the training dataset "
                       "DATASETS.TRAIN[0]=%r is not registered (or has no thing_classes); predictions are "
                       "named 'class <i>'. Register the dataset before running, or use a checkpoint saved by "
                       "this version's trainer.", cfg.MODEL.WEIGHTS,
                       cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
        return [f"class {i}" for i in range(num_classes)]
    if len(names) < num_classes:
        logger.warning("%s names %d classes but MODEL.DETR.NUM_CLASSES is %d; the others are named 'class <i>'.",
                       source, len(names), num_classes)
        names += [f"class {i}" for i in range(len(names), num_classes)]
    logger.info("Class names from %s: %s", source, names)
    return names
