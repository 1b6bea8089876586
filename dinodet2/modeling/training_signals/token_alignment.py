"""Token feature alignment ("token matching loss"): the detector's own tokens, through a training-only
projector, are pulled towards the token features a frozen DINOv2 gives the same image, so the
LoRA-adapted and newly trained layers keep DINOv2's semantics (RT-DETRv4's idea, there with a
DINOv3 teacher and the detector's encoder features).

The student tokens are one level of the encoder output (``SOURCE "encoder"``) or of the neck's
projected tokens (``"neck"``); by default the level whose stride is nearest to the DINOv2 patch size
(stride 14 in the default pyramid). When its grid differs from the DINOv2 patch grid it is resampled
bilinearly to it. The loss averages over the tokens inside the image (padding excluded):
``1 - cos(proj(student), target)`` (``LOSS "cosine"``) or the squared error per channel (``"mse"``),
times ``WEIGHT``, as ``loss_token_align``.
"""
from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .frozen_dinov2 import FrozenDinov2Tokens
from .signal_inputs import SignalInputs

__all__ = ["TokenAlignment", "ALIGNMENT_LOSSES", "ALIGNMENT_SOURCES"]

ALIGNMENT_LOSSES = ("cosine", "mse")
ALIGNMENT_SOURCES = ("encoder", "neck")


class TokenAlignment(nn.Module):
    """Projector + loss of token feature alignment (see the module docstring).

    Args:
        target: the frozen DINOv2 whose tokens are the target (held outside the module tree).
        student_dim: the detector's token width (``MODEL.DETR.HIDDEN_DIM``).
        level: index of the student level among the transformer's levels.
        source: ``"encoder"`` (encoder output) or ``"neck"`` (the tokens the encoder reads).
        loss: ``"cosine"`` or ``"mse"``.
        weight: the loss weight.
    """

    def __init__(self, target: FrozenDinov2Tokens, student_dim: int, level: int, source: str = "encoder",
                 loss: str = "cosine", weight: float = 1.0):
        super().__init__()
        if source not in ALIGNMENT_SOURCES:
            raise ValueError(f"MODEL.TOKEN_ALIGNMENT.SOURCE={source!r} must be one of {ALIGNMENT_SOURCES}.")
        if loss not in ALIGNMENT_LOSSES:
            raise ValueError(f"MODEL.TOKEN_ALIGNMENT.LOSS={loss!r} must be one of {ALIGNMENT_LOSSES}.")
        if weight < 0:
            raise ValueError(f"MODEL.TOKEN_ALIGNMENT.WEIGHT={weight} must be >= 0.")
        self.__dict__["target"] = target  # not a submodule: never in state_dict / the optimizer / DDP
        self.level = level
        self.source = source
        self.loss = loss
        self.weight = weight
        self.projector = nn.Linear(student_dim, target.dim)

    @staticmethod
    def nearest_level(level_strides: Sequence[float], patch_size: int) -> int:
        """The level whose stride is nearest to ``patch_size`` (the first of equals)."""
        return min(range(len(level_strides)), key=lambda i: abs(level_strides[i] - patch_size))

    def student_map(self, inputs: SignalInputs) -> torch.Tensor:
        """The student level as a map ``[B, C, h, w]``."""
        tokens = inputs.memory if self.source == "encoder" else inputs.tokens.src
        sizes = [h * w for h, w in inputs.tokens.spatial_shapes.level_sizes]
        if not 0 <= self.level < len(sizes):
            raise ValueError(f"MODEL.TOKEN_ALIGNMENT.LEVEL={self.level}, but the transformer has {len(sizes)} levels.")
        h, w = inputs.tokens.spatial_shapes.level_sizes[self.level]
        level = tokens.split(sizes, dim=1)[self.level]
        return level.transpose(1, 2).reshape(level.shape[0], level.shape[2], h, w)

    def forward(self, inputs: SignalInputs) -> Dict[str, torch.Tensor]:
        target = self.target(inputs.images.tensor).float()  # [B, D, ht, wt]
        student = self.student_map(inputs)
        size = target.shape[-2:]
        valid = ~inputs.tokens.level_masks[self.level]
        if student.shape[-2:] != size:
            student = F.interpolate(student, size=size, mode="bilinear", align_corners=False)
            valid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
        student = self.projector(student.flatten(2).transpose(1, 2)).float()  # [B, ht*wt, D]
        target = target.flatten(2).transpose(1, 2)
        if self.loss == "cosine":
            per_token = 1.0 - F.cosine_similarity(student, target, dim=-1)
        else:
            per_token = (student - target).pow(2).mean(-1)
        valid = valid.flatten(1).to(per_token.dtype)
        loss = (per_token * valid).sum() / valid.sum().clamp(min=1.0)
        return {"loss_token_align": self.weight * loss}
