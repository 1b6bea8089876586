"""Scale-aware prediction heads (``MODEL.DETR.SCALE_AWARE``): small and large objects get their own
head parameters instead of sharing one head.

* :class:`LevelHeads` (``PROPOSAL_HEADS "per_level"``): the two-stage proposals of every feature
  level come from that level's own copy of the class / box head, so the fine stride-7 tokens, which
  carry the small objects, are not scored by the head the coarse levels also train.
* :class:`SizeConditioning` (``DECODER_HEADS "size_conditioned"``): every decoder layer's normalised
  state is modulated by the size of the box its prediction is relative to (FiLM: ``state x (1 + gamma)
  + beta``, both from ``log(w), log(h)``) before the class and box heads read it. Its last layer
  starts at zero, so an untrained conditioning is the identity and a trained shared-head model loads
  and predicts unchanged.
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["DECODER_HEAD_KINDS", "LevelHeads", "PROPOSAL_HEAD_KINDS", "SizeConditioning"]

PROPOSAL_HEAD_KINDS = ("shared", "per_level")
DECODER_HEAD_KINDS = ("shared", "size_conditioned")


class LevelHeads(nn.Module):
    """One head per feature level: ``forward(x [B, N, C], level_sizes)`` applies head ``l`` to level
    ``l``'s tokens (levels flattened one after the other, as in the multi-level tokens)."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor, level_sizes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        if len(level_sizes) != len(self.heads):
            raise ValueError(f"{len(self.heads)} per-level heads for {len(level_sizes)} levels: "
                             "MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS 'per_level' needs the levels it was built for.")
        parts = x.split([h * w for h, w in level_sizes], dim=1)
        return torch.cat([head(part) for head, part in zip(self.heads, parts)], dim=1)


class SizeConditioning(nn.Module):
    """FiLM of decoder states by their reference box size (see the module docstring)."""

    def __init__(self, d_model: int, hidden_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * d_model))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, state: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``state`` ``[..., C]``, ``boxes`` ``[..., 4]`` normalised cxcywh (a point ``[..., 2]`` has no
        size: returned unchanged)."""
        if boxes.shape[-1] < 4:
            return state
        size = boxes[..., 2:4].float().clamp(min=1e-4).log()
        gamma, beta = self.net(size).to(state.dtype).chunk(2, dim=-1)
        return state * (1 + gamma) + beta
