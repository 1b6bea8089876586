"""Training signals: auxiliary losses computed beside the detection losses during training only,
from what one training forward of the detector produced (:class:`SignalInputs`). Each is a module
``SignalInputs -> {loss name: loss}``; the detector holds them in ``DETR.training_signals`` and
leaves them out of inference and of merged / exported weights (:meth:`DETR.inference_state_dict`).

* :class:`TokenAlignment` (``MODEL.TOKEN_ALIGNMENT``): tokens pulled towards a frozen DINOv2's.
* :class:`KnowledgeDistillation` (``MODEL.DISTILL``): a frozen teacher detector's tokens and
  predictions.
"""
from typing import Sequence

import torch.nn as nn

from ..classification import Classification
from .distillation import KnowledgeDistillation
from .feature_distillation import FEATURE_LOSSES, FeatureDistillation
from .frozen_dinov2 import FrozenDinov2Tokens, adapters_disabled, find_dinov2_backbone
from .prediction_distillation import PredictionDistillation
from .signal_inputs import SignalInputs
from .teacher import FrozenTeacher, TeacherOutputs
from .token_alignment import ALIGNMENT_LOSSES, ALIGNMENT_SOURCES, TokenAlignment

__all__ = ["ALIGNMENT_LOSSES", "ALIGNMENT_SOURCES", "FEATURE_LOSSES", "FeatureDistillation", "FrozenDinov2Tokens",
           "FrozenTeacher", "KnowledgeDistillation", "PredictionDistillation", "SignalInputs", "TeacherOutputs",
           "TokenAlignment", "adapters_disabled", "build_training_signals", "find_dinov2_backbone"]


def build_training_signals(cfg, backbone: nn.Module, level_strides: Sequence[float],
                           classification: Classification) -> nn.ModuleDict:
    """The training signals the config switches on (an empty ``ModuleDict`` when none is), for a
    detector whose transformer levels have ``level_strides``. Call before weights are loaded."""
    signals = nn.ModuleDict()
    c = cfg.MODEL.TOKEN_ALIGNMENT
    if c.ENABLED:
        target = FrozenDinov2Tokens.from_backbone(backbone, block=c.TEACHER_BLOCK, teacher=c.TEACHER,
                                                  local_files_only=cfg.MODEL.DINOV2.LOCAL_FILES_ONLY)
        level = c.LEVEL if c.LEVEL >= 0 else TokenAlignment.nearest_level(level_strides, target.patch_size)
        if level >= len(level_strides):
            raise ValueError(f"MODEL.TOKEN_ALIGNMENT.LEVEL={c.LEVEL}, but the transformer has {len(level_strides)} "
                             f"levels (strides {list(level_strides)}); use -1 for the one nearest the patch size.")
        signals["token_alignment"] = TokenAlignment(target, cfg.MODEL.DETR.HIDDEN_DIM, level, source=c.SOURCE,
                                                    loss=c.LOSS, weight=c.WEIGHT)
    if cfg.MODEL.DISTILL.ENABLED:
        signals["distillation"] = build_distillation(cfg, level_strides, classification)
    return signals


def build_distillation(cfg, level_strides: Sequence[float], classification: Classification) -> KnowledgeDistillation:
    """``MODEL.DISTILL``'s teacher and losses, checked against the student (classes, levels)."""
    c = cfg.MODEL.DISTILL
    teacher = FrozenTeacher.from_files(c.TEACHER_CONFIG, c.TEACHER_WEIGHTS, cfg.MODEL.DEVICE, c.TEACHER_OPTS)
    feature = None
    if c.FEATURE_WEIGHT < 0:
        raise ValueError(f"MODEL.DISTILL.FEATURE_WEIGHT={c.FEATURE_WEIGHT} must be >= 0.")
    if c.FEATURE_WEIGHT > 0:  # the levels are checked against the teacher's at the first step
        feature = FeatureDistillation(cfg.MODEL.DETR.HIDDEN_DIM, teacher.hidden_dim, len(level_strides),
                                      source=c.FEATURE_SOURCE, loss=c.FEATURE_LOSS,
                                      foreground_weight=c.FEATURE_FOREGROUND_WEIGHT)
    prediction = None
    if c.PREDICTION.ENABLED:
        if teacher.num_classes != classification.num_classes:
            raise ValueError(f"The teacher ({c.TEACHER_CONFIG}) has {teacher.num_classes} classes, the student "
                             f"MODEL.DETR.NUM_CLASSES={classification.num_classes}: prediction distillation needs the "
                             "same classes (or set MODEL.DISTILL.PREDICTION.ENABLED False).")
        p = c.PREDICTION
        prediction = PredictionDistillation(classification, class_weight=p.CLASS_WEIGHT, box_weight=p.BOX_WEIGHT,
                                            giou_weight=p.GIOU_WEIGHT, temperature=p.TEMPERATURE, top_k=p.TOP_K)
    return KnowledgeDistillation(teacher, feature, prediction, feature_weight=c.FEATURE_WEIGHT,
                                 warmup_iters=c.WARMUP_ITERS, student_strides=level_strides)
