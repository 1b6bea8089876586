"""Prediction-level distillation by Hungarian matching on the teacher's outputs (DETRDistill's
approach): per image, the teacher's final predictions are matched one to one to the student's
matching queries with the cost ``class_weight * |p_s - p_t|_1 + box_weight * L1(b_s, b_t) -
giou_weight * GIoU(b_s, b_t)`` (scipy's ``linear_sum_assignment``), and every matched student query
learns its teacher's class scores and box:

* ``loss_distill_class``: sigmoid heads: binary cross-entropy of the student's logits against the
  teacher's probabilities, summed over classes; softmax heads: ``T^2 KL(teacher || student)`` at
  temperature ``T``;
* ``loss_distill_bbox`` / ``loss_distill_giou``: L1 and ``1 - GIoU`` of the boxes.

Each pair weighs the teacher's detection score (its best class probability), so confident teacher
detections teach the most and the teacher's background queries little; the losses are divided by
the sum of the weights (at least 1).

Why matching on the teacher's outputs and not KD-DETR's shared distillation queries: it works for any
teacher (other width, depth, query count, query selection) without a second pass of the student's
decoder, and costs one matching per image, which the student's own loss already pays.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

from ..classification import Classification
from .signal_inputs import SignalInputs
from .teacher import TeacherOutputs

__all__ = ["PredictionDistillation"]


class PredictionDistillation(nn.Module):
    """Args:
        classification: the student's class reading (sigmoid or softmax), shared by the teacher.
        class_weight / box_weight / giou_weight: weights of the three losses, and of their matching costs.
        temperature: softmax heads' distillation temperature.
        top_k: match only the teacher's ``top_k`` best-scoring queries per image (0: all).
    """

    def __init__(self, classification: Classification, class_weight: float = 1.0, box_weight: float = 5.0,
                 giou_weight: float = 2.0, temperature: float = 1.0, top_k: int = 0):
        super().__init__()
        for key, value in (("CLASS_WEIGHT", class_weight), ("BOX_WEIGHT", box_weight), ("GIOU_WEIGHT", giou_weight),
                           ("TOP_K", top_k)):
            if value < 0:
                raise ValueError(f"MODEL.DISTILL.PREDICTION.{key}={value} must be >= 0.")
        if temperature <= 0:
            raise ValueError(f"MODEL.DISTILL.PREDICTION.TEMPERATURE={temperature} must be > 0.")
        self.classification = classification
        self.class_weight, self.box_weight, self.giou_weight = class_weight, box_weight, giou_weight
        self.temperature, self.top_k = temperature, top_k

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities compared by the matching cost: sigmoid per class, or the softmax."""
        return logits.sigmoid() if self.classification.sigmoid else logits.softmax(-1)

    def _teacher_queries(self, logits: torch.Tensor, padding: Optional[torch.Tensor]) -> torch.Tensor:
        """Indices of the teacher queries of one image that are distilled."""
        scores = self.classification.best_class_scores(logits)
        if padding is not None:
            scores = scores.masked_fill(padding, -1.0)
        keep = (scores >= 0).nonzero().squeeze(1)
        if self.top_k and len(keep) > self.top_k:
            keep = keep[scores[keep].topk(self.top_k).indices]
        return keep

    @torch.no_grad()
    def match(self, student_logits: torch.Tensor, student_boxes: torch.Tensor, teacher_logits: torch.Tensor,
              teacher_boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Optimal one-to-one pairs ``(student_idx, teacher_idx)`` of one image's queries."""
        cost = self.class_weight * torch.cdist(self._probabilities(student_logits.float()),
                                               self._probabilities(teacher_logits.float()), p=1)
        cost = cost + self.box_weight * torch.cdist(student_boxes.float(), teacher_boxes.float(), p=1)
        cost = cost - self.giou_weight * generalized_box_iou(box_convert(student_boxes.float(), "cxcywh", "xyxy"),
                                                             box_convert(teacher_boxes.float(), "cxcywh", "xyxy"))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        device = student_logits.device
        return torch.as_tensor(rows, dtype=torch.int64, device=device), torch.as_tensor(cols, dtype=torch.int64,
                                                                                         device=device)

    def _class_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per pair ``[n]``."""
        if self.classification.sigmoid:
            return F.binary_cross_entropy_with_logits(student, teacher.sigmoid(), reduction="none").sum(-1)
        t = self.temperature
        return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="none").sum(-1) * t * t

    def forward(self, inputs: SignalInputs, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        s_logits, s_boxes = inputs.outputs["pred_logits"], inputs.outputs["pred_boxes"]
        t_logits, t_boxes = teacher.outputs["pred_logits"].float(), teacher.outputs["pred_boxes"].float()
        if t_logits.shape[-1] != s_logits.shape[-1]:
            raise ValueError(f"The teacher predicts {t_logits.shape[-1]} class logits, the student {s_logits.shape[-1]}: "
                             "prediction distillation needs the same classes and class loss (MODEL.DETR.NUM_CLASSES, "
                             "MODEL.DETR.CLASS_LOSS).")
        s_padding, t_padding = inputs.outputs.get("query_padding"), teacher.outputs.get("query_padding")
        pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(s_logits.shape[0]):
            keep = self._teacher_queries(t_logits[i], t_padding[i] if t_padding is not None else None)
            student = torch.arange(s_logits.shape[1], device=s_logits.device)
            if s_padding is not None:
                student = student[~s_padding[i]]
            rows, cols = self.match(s_logits[i, student], s_boxes[i, student], t_logits[i, keep], t_boxes[i, keep])
            pairs.append((student[rows], keep[cols]))
        batch = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(pairs)])
        s_idx = torch.cat([s for s, _ in pairs])
        t_idx = torch.cat([t for _, t in pairs])
        weights = self.classification.best_class_scores(t_logits[batch, t_idx])
        norm = weights.sum().clamp(min=1.0)
        s_box, t_box = s_boxes[batch, s_idx].float(), t_boxes[batch, t_idx]
        giou_loss = generalized_box_iou_loss(box_convert(s_box, "cxcywh", "xyxy"), box_convert(t_box, "cxcywh", "xyxy"))
        return {
            "loss_distill_class": self.class_weight * (self._class_loss(s_logits[batch, s_idx].float(),
                                                                        t_logits[batch, t_idx]) * weights).sum() / norm,
            "loss_distill_bbox": self.box_weight * ((s_box - t_box).abs().sum(-1) * weights).sum() / norm,
            "loss_distill_giou": self.giou_weight * (giou_loss * weights).sum() / norm,
        }
