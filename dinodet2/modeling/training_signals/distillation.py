"""Knowledge distillation from a larger model (``MODEL.DISTILL``): one training signal that runs the
frozen teacher (:mod:`.teacher`) once per step and hands its outputs to the feature-level
(:mod:`.feature_distillation`) and prediction-level (:mod:`.prediction_distillation`) losses, all
scaled by a linear warm-up from 0 over ``warmup_iters`` (read from Detectron2's event storage; 1
outside a trainer)."""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from .feature_distillation import FeatureDistillation
from .prediction_distillation import PredictionDistillation
from .signal_inputs import SignalInputs
from .teacher import FrozenTeacher

__all__ = ["KnowledgeDistillation"]


def _current_iteration() -> Optional[int]:
    from detectron2.utils.events import get_event_storage

    try:
        return get_event_storage().iter
    except AssertionError:  # no EventStorage: called outside a trainer
        return None


class KnowledgeDistillation(nn.Module):
    """Args:
        teacher: the frozen teacher (held outside the module tree).
        feature: feature-level distillation and its weight, or None.
        prediction: prediction-level distillation, or None.
        feature_weight: weight of ``loss_distill_feature``.
        warmup_iters: the losses ramp linearly from 0 to their weights over these iterations.
        student_strides: the student's level strides, checked against the teacher's at the first step
            (feature distillation pairs levels of equal stride).
    """

    def __init__(self, teacher: FrozenTeacher, feature: Optional[FeatureDistillation] = None,
                 prediction: Optional[PredictionDistillation] = None, feature_weight: float = 1.0,
                 warmup_iters: int = 0, student_strides: Optional[Sequence[float]] = None):
        super().__init__()
        if feature is None and prediction is None:
            raise ValueError("MODEL.DISTILL.ENABLED with neither feature nor prediction distillation: set "
                             "MODEL.DISTILL.FEATURE_WEIGHT > 0 or MODEL.DISTILL.PREDICTION.ENABLED True.")
        if warmup_iters < 0:
            raise ValueError(f"MODEL.DISTILL.WARMUP_ITERS={warmup_iters} must be >= 0.")
        self.__dict__["teacher"] = teacher  # not a submodule: never in state_dict / the optimizer / DDP
        self.feature, self.prediction = feature, prediction
        self.feature_weight, self.warmup_iters = feature_weight, warmup_iters
        self.student_strides = list(student_strides) if student_strides is not None else None
        self._levels_checked = False

    def ramp(self) -> float:
        iteration = _current_iteration()
        if not self.warmup_iters or iteration is None:
            return 1.0
        return min(1.0, (iteration + 1) / self.warmup_iters)

    def forward(self, inputs: SignalInputs) -> Dict[str, torch.Tensor]:
        if self.feature is not None and self.student_strides is not None and not self._levels_checked:
            FeatureDistillation.check_levels(self.student_strides, self.teacher.level_strides())
            self._levels_checked = True
        teacher = self.teacher(inputs.batched_inputs)
        losses: Dict[str, torch.Tensor] = {}
        if self.feature is not None:
            losses.update({k: self.feature_weight * v for k, v in self.feature(inputs, teacher).items()})
        if self.prediction is not None:
            losses.update(self.prediction(inputs, teacher))
        ramp = self.ramp()
        return {k: v * ramp for k, v in losses.items()} if ramp != 1.0 else losses
