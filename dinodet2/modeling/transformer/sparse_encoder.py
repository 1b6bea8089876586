"""Sparse encoder tokens (the idea of Sparse DETR, Focus-DETR and Salience DETR), ``MODEL.DETR.SPARSE_ENCODER``.

Most image tokens are background, yet every encoder layer updates all of them. Here a light
scorer (:class:`TokenScorer`, an MLP on the encoder's input tokens) gives every token a foreground
logit; only the top fraction of each image's tokens is updated by the encoder layers, the others
pass through unchanged:

* **selection** (:func:`select_tokens`): per image the ``ceil(KEEP_RATIO x valid tokens)`` best-scoring
  tokens (at least one), over all levels at once, or with ``PER_LEVEL`` that rule on every level;
  padding tokens are never chosen. Images of a batch keep different numbers of tokens: the
  selection has as many slots as the largest count and a ``keep`` mask; the slots past an image's
  own count are written back unchanged. Chosen once, from the encoder's input, for every layer.
* **encoder layers** (:meth:`~.transformer.DetrEncoder.encode_selected`): the selected tokens are a
  layer's queries; keys / values are all tokens, i.e. the selected ones as updated so far and the
  others unchanged. A deformable layer samples the full multi-level value map into which the
  selected tokens' new features are scattered back after every layer, as in Sparse DETR; a
  standard layer attends to all tokens. Batched with gather / scatter.
* **supervision** (:func:`token_foreground_targets`, the ``loss_token_fg`` loss of
  :class:`~dinodet2.modeling.criterion.SetCriterion`): a token is foreground when its centre lies
  inside a ground-truth box, the box widened to at least one token cell of the token's level (so a
  box smaller than a cell still marks the cell holding its centre). Every level takes part; there is
  no Focus-DETR-style "box size suits the level" filter: which level serves an object best is left to
  the global top-k and the decoder, and size ranges tuned for one image size would silently drop
  objects on another. Sigmoid focal loss over the valid tokens, normalised by the number of
  foreground tokens (averaged over workers). The selection itself is not differentiable; the scorer
  learns from this loss only, which always has a gradient, so DDP needs no ``find_unused_parameters``.

``KEEP_RATIO`` 1 updates every token (padding included) exactly as the dense encoder: the same
detections as without the sparse encoder, with the scorer still trained.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

from .multilevel_tokens import MultiLevelTokens

__all__ = ["SparseTokenSelector", "TokenScorer", "TokenSelection", "keep_counts", "select_tokens",
           "token_cell_sizes", "token_foreground_targets"]


class TokenScorer(nn.Module):
    """``Linear -> ReLU -> Linear(1)`` foreground logit of every token ``[B, N, C] -> [B, N]``; the last
    bias starts at the focal prior (p = 0.01), so the untrained scorer calls every token background."""

    PRIOR_PROBABILITY = 0.01

    def __init__(self, d_model: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 1))
        nn.init.constant_(self.layers[-1].bias, -math.log((1 - self.PRIOR_PROBABILITY) / self.PRIOR_PROBABILITY))

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        return self.layers(src).squeeze(-1)


@dataclass
class TokenSelection:
    """Tokens the encoder layers update.

    Attributes:
        index: ``[B, K]`` int64 token indices, distinct within a row.
        keep: ``[B, K]`` bool; False on the slots past an image's own count (left unchanged).
    """

    index: torch.Tensor
    keep: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` number of tokens updated per image."""
        return self.keep.sum(1)

    def mask(self, num_tokens: int) -> torch.Tensor:
        """``[B, N]`` bool, True on the updated tokens."""
        mask = torch.zeros(self.index.shape[0], num_tokens, dtype=torch.bool, device=self.index.device)
        return mask.scatter(1, self.index, self.keep)


def keep_counts(num_valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ceil(ratio x num_valid)``, at least 1 and at most ``num_valid`` (0 stays 0). The tolerance
    keeps e.g. ``0.3 x 10`` at 3 although it is ``3.0000000000000004`` in floating point."""
    counts = torch.ceil(num_valid.double() * ratio - 1e-9).long().clamp(min=1)
    return torch.minimum(counts, num_valid.long())


def _top_tokens(scores: torch.Tensor, valid: torch.Tensor, ratio: float):
    counts = keep_counts(valid.sum(1), ratio)
    k = int(counts.max()) if counts.numel() else 0
    index = scores.masked_fill(~valid, float("-inf")).topk(k, dim=1).indices
    return index, torch.arange(k, device=scores.device) < counts[:, None]


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, ratio: float,
                  level_sizes: Optional[Sequence[int]] = None) -> TokenSelection:
    """The best-scoring ``ceil(ratio x valid)`` tokens of every image (see the module docstring).

    Args:
        scores: ``[B, N]`` token scores (higher = more likely foreground).
        valid: ``[B, N]`` bool, False on padding tokens (never selected).
        level_sizes: tokens per level (``h x w``, in token order) to apply the rule on every level;
            None: one selection over all tokens.
    """
    scores = scores.detach().float()
    if level_sizes is None:
        return TokenSelection(*_top_tokens(scores, valid, ratio))
    indices, keeps, start = [], [], 0
    for size in level_sizes:  # a few levels; every image at once
        index, keep = _top_tokens(scores[:, start:start + size], valid[:, start:start + size], ratio)
        indices.append(index + start)
        keeps.append(keep)
        start += size
    return TokenSelection(torch.cat(indices, 1), torch.cat(keeps, 1))


def token_cell_sizes(level_masks: List[torch.Tensor]) -> torch.Tensor:
    """``[B, N, 2]``: the ``(w, h)`` of every token's cell, normalised by its image's valid extent on
    that level (the frame of :func:`~.token_geometry.token_anchors` and of the targets)."""
    cells = []
    for mask in level_masks:
        _, h, w = mask.shape
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).float()
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).float()
        cells.append(torch.stack([1.0 / valid_w, 1.0 / valid_h], -1)[:, None, :].expand(-1, h * w, -1))
    return torch.cat(cells, 1)


def token_foreground_targets(centres: torch.Tensor, cells: torch.Tensor, valid: torch.Tensor,
                             boxes: List[torch.Tensor]) -> torch.Tensor:
    """``[B, N]`` bool: the token's centre lies inside one of its image's boxes, each box widened to at
    least the token's cell; padding tokens are never foreground.

    Args:
        centres: ``[B, N, 2]`` token centres, cells: ``[B, N, 2]`` their cell sizes, both normalised
            by each image's own valid extent (:func:`token_cell_sizes`).
        boxes: per image ``[n, 4]`` normalised cxcywh boxes (the targets' frame).
    """
    batch = centres.shape[0]
    lengths = torch.tensor([len(b) for b in boxes], device=centres.device)
    if batch == 0 or int(lengths.max()) == 0:
        return torch.zeros_like(valid)
    padded = pad_sequence([b.to(centres.device, torch.float32) for b in boxes], batch_first=True)  # [B, T, 4]
    present = torch.arange(padded.shape[1], device=centres.device) < lengths[:, None]  # [B, T]
    centres, cells = centres.float(), cells.float()
    inside = present[:, None, :]
    for axis in range(2):  # x, then y: [B, N, T] each
        half = torch.maximum(padded[:, None, :, 2 + axis], cells[:, :, None, axis]) / 2
        inside = inside & ((centres[:, :, None, axis] - padded[:, None, :, axis]).abs() <= half)
    return inside.any(-1) & valid


class SparseTokenSelector(nn.Module):
    """The scorer and the selection rule of ``MODEL.DETR.SPARSE_ENCODER`` (see the module docstring).

    Args:
        d_model: token width.
        keep_ratio: fraction of every image's valid tokens (or of every level's, ``per_level``) updated.
        per_level: apply the ratio on every level instead of once over all levels.
        test_keep_ratio: the ratio in eval mode (0: ``keep_ratio``). A model trained with ratio 1
            (dense encoder, the scorer still learns) can run sparse at inference with the same weights.
    """

    def __init__(self, d_model: int, keep_ratio: float, per_level: bool = False, test_keep_ratio: float = 0.0):
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO must be in (0, 1], got {keep_ratio}.")
        if not 0.0 <= test_keep_ratio <= 1.0:
            raise ValueError("MODEL.DETR.SPARSE_ENCODER.TEST_KEEP_RATIO must be in (0, 1] (0: KEEP_RATIO), "
                             f"got {test_keep_ratio}.")
        self.scorer = TokenScorer(d_model)
        self.keep_ratio = float(keep_ratio)
        self.test_keep_ratio = float(test_keep_ratio) or self.keep_ratio
        self.per_level = bool(per_level)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, test_keep_ratio={self.test_keep_ratio}, per_level={self.per_level}"

    @property
    def ratio(self) -> float:
        """The keep ratio in use: ``keep_ratio`` in training, ``test_keep_ratio`` in eval mode."""
        return self.keep_ratio if self.training else self.test_keep_ratio

    @classmethod
    def from_config(cls, cfg) -> Optional["SparseTokenSelector"]:
        """The selector ``MODEL.DETR.SPARSE_ENCODER`` describes, or None when it is off."""
        c = cfg.MODEL.DETR
        s = c.SPARSE_ENCODER
        if not s.ENABLED:
            return None
        if c.ENC_LAYERS < 1:
            raise ValueError("MODEL.DETR.SPARSE_ENCODER.ENABLED selects the tokens the encoder layers update and "
                             f"needs MODEL.DETR.ENC_LAYERS >= 1, got {c.ENC_LAYERS}.")
        if not s.LOSS_WEIGHT > 0:
            raise ValueError("MODEL.DETR.SPARSE_ENCODER.LOSS_WEIGHT must be > 0 (the token scorer learns from "
                             f"loss_token_fg only), got {s.LOSS_WEIGHT}.")
        return cls(c.HIDDEN_DIM, s.KEEP_RATIO, s.PER_LEVEL, s.TEST_KEEP_RATIO)

    @property
    def keeps_every_token(self) -> bool:
        """Ratio 1: the dense encoder runs (every token, padding included, is updated)."""
        return self.ratio >= 1.0

    def select(self, logits: torch.Tensor, tokens: MultiLevelTokens,
               eligible: Optional[torch.Tensor] = None) -> TokenSelection:
        """The tokens to update, from the scorer's ``[B, N]`` logits; ``eligible`` ``[N]`` (None: all)
        restricts the choice (and the counts the ratio applies to) to some tokens, e.g. those of the
        levels the encoder updates."""
        sizes = [m.shape[-2] * m.shape[-1] for m in tokens.level_masks] if self.per_level else None
        valid = tokens.anchors[1] if eligible is None else tokens.anchors[1] & eligible
        return select_tokens(logits, valid, self.ratio, sizes)

    @staticmethod
    def loss_inputs(logits: torch.Tensor, tokens: MultiLevelTokens) -> Dict[str, torch.Tensor]:
        """What ``loss_token_fg`` needs: the logits and the tokens' centres, cell sizes and validity."""
        anchors, valid = tokens.anchors
        return {"logits": logits, "centres": anchors[..., :2], "cells": token_cell_sizes(tokens.level_masks),
                "valid": valid}
