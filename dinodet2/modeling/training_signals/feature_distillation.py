"""Feature-level distillation: every level of the student's tokens (encoder output or the neck's
projected tokens), through a per-level linear projector to the teacher's width, is pulled towards
the teacher's tokens of the same level (``loss_distill_feature``).

Levels correspond one to one and must have the same strides, so token ``(i, j)`` of a level sits on
the same pixels in both models; where the two pad a batch differently the maps are compared on their
common top-left grid (padding is at the bottom / right). Tokens count where both models see image
(not padding); a token whose centre lies inside a ground-truth box weighs ``foreground_weight``, the
others 1 (FGD's foreground emphasis; 1 = uniform). Per token the loss is the squared error per
channel (``"mse"``) or ``1 - cos`` (``"cosine"``), averaged with these weights.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..transformer.sparse_encoder import token_cell_sizes, token_foreground_targets
from .signal_inputs import SignalInputs
from .teacher import TeacherOutputs

__all__ = ["FeatureDistillation", "FEATURE_LOSSES"]

FEATURE_LOSSES = ("mse", "cosine")


class FeatureDistillation(nn.Module):
    """Args:
        student_dim / teacher_dim: token widths.
        num_levels: levels of both transformers.
        source: ``"encoder"`` or ``"neck"`` (the same source in both models).
        loss: ``"mse"`` or ``"cosine"``.
        foreground_weight: weight of tokens inside ground-truth boxes (others: 1).
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_levels: int, source: str = "encoder",
                 loss: str = "mse", foreground_weight: float = 1.0):
        super().__init__()
        if source not in ("encoder", "neck"):
            raise ValueError(f"MODEL.DISTILL.FEATURE_SOURCE={source!r} must be 'encoder' or 'neck'.")
        if loss not in FEATURE_LOSSES:
            raise ValueError(f"MODEL.DISTILL.FEATURE_LOSS={loss!r} must be one of {FEATURE_LOSSES}.")
        if foreground_weight < 0:
            raise ValueError(f"MODEL.DISTILL.FEATURE_FOREGROUND_WEIGHT={foreground_weight} must be >= 0.")
        self.source, self.loss, self.foreground_weight = source, loss, foreground_weight
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_levels))

    @staticmethod
    def check_levels(student_strides: Sequence[float], teacher_strides: Sequence[float]) -> None:
        if [float(s) for s in student_strides] != [float(s) for s in teacher_strides]:
            raise ValueError(f"Feature distillation pairs the levels one to one, but the student's strides "
                             f"{list(student_strides)} differ from the teacher's {list(teacher_strides)}; give "
                             "the teacher the same pyramid (MODEL.SFP.SCALE_FACTORS, MODEL.DETR.IN_FEATURES) or "
                             "set MODEL.DISTILL.FEATURE_WEIGHT 0.")

    @staticmethod
    def _levels(tokens, features: torch.Tensor) -> List[torch.Tensor]:
        """Per level ``[B, C, h, w]``."""
        sizes = tokens.spatial_shapes.level_sizes
        split = features.split([h * w for h, w in sizes], dim=1)
        return [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w) for x, (h, w) in zip(split, sizes)]

    def _token_weights(self, tokens, targets) -> List[torch.Tensor]:
        """Per level ``[B, h, w]``: 0 on padding, ``foreground_weight`` inside a box, else 1."""
        anchors, valid = tokens.anchors
        weights = valid.float()
        if self.foreground_weight != 1.0:
            inside = token_foreground_targets(anchors[..., :2], token_cell_sizes(tokens.level_masks), valid,
                                              [t["boxes"] for t in targets])
            weights = torch.where(inside, torch.full_like(weights, self.foreground_weight), weights)
        sizes = tokens.spatial_shapes.level_sizes
        return [w.view(-1, h, ww) for w, (h, ww) in zip(weights.split([h * w for h, w in sizes], 1), sizes)]

    def forward(self, inputs: SignalInputs, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        if len(teacher.tokens.level_masks) != len(self.projectors):
            raise ValueError(f"Feature distillation pairs the levels one to one: the student has {len(self.projectors)}, "
                             f"the teacher {len(teacher.tokens.level_masks)}; give the teacher the same pyramid or set "
                             "MODEL.DISTILL.FEATURE_WEIGHT 0.")
        student_tokens = inputs.memory if self.source == "encoder" else inputs.tokens.src
        teacher_tokens = teacher.memory if self.source == "encoder" else teacher.tokens.src
        student_levels = self._levels(inputs.tokens, student_tokens)
        teacher_levels = self._levels(teacher.tokens, teacher_tokens)
        weights = self._token_weights(inputs.tokens, inputs.targets)
        teacher_valid = [~m for m in teacher.tokens.level_masks]
        total = student_tokens.new_zeros((), dtype=torch.float32)
        norm = student_tokens.new_zeros((), dtype=torch.float32)
        for s, t, w, tv, projector in zip(student_levels, teacher_levels, weights, teacher_valid, self.projectors):
            h, ww = min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1])
            s = projector(s[..., :h, :ww].flatten(2).transpose(1, 2)).float()  # [B, h*ww, Ct]
            t = t[..., :h, :ww].flatten(2).transpose(1, 2).float()
            w = (w[:, :h, :ww] * tv[:, :h, :ww]).flatten(1)
            per_token = (s - t).pow(2).mean(-1) if self.loss == "mse" else 1.0 - F.cosine_similarity(s, t, dim=-1)
            total = total + (per_token * w).sum()
            norm = norm + w.sum()
        return {"loss_distill_feature": total / norm.clamp(min=1.0)}
