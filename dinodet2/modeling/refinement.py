"""Cascade box refinement on the finest feature level (``MODEL.DETR.REFINEMENT``, off by default).

After the decoder, each :class:`RefinementStage` pools the finest level of the transformer's input
tokens (the projected backbone features, before the encoder: the highest resolution the model has)
inside every matching query's box with :func:`torchvision.ops.roi_align`, adds the pooled features
(flattened, projected) to the query's final decoder state and predicts

* a box delta in the decoder's parameterisation: ``sigmoid(inverse_sigmoid(box_in) + delta)``;
* optionally (``RESCORE``) a class-logit delta added to the incoming logits.

Stages are chained: stage ``k`` refines stage ``k - 1``'s boxes, which it receives detached (like
the decoder's iterative refinement); the incoming logits are detached too, so the refinement trains
only its own parameters. The last layer of both heads is zero-initialised, so an untrained cascade
returns the decoder's boxes and logits exactly.

Training (Cascade R-CNN): stage ``k`` is supervised on the final decoder layer's Hungarian matches
(reused, not recomputed, :meth:`~dinodet2.modeling.criterion.SetCriterion.refinement_losses`)
whose *incoming* box has IoU >= ``IOU_THRESHOLDS[k]`` with its target; losses
``loss_bbox_refine_{k}`` / ``loss_giou_refine_{k}`` (+ ``loss_class_refine_{k}`` with
``RESCORE``), weighted like the decoder's. Inference: the last stage's boxes (and logits) replace
the decoder's before :meth:`~dinodet2.modeling.meta_arch.detr.DETR.inference`.

Boxes are ``(cx, cy, w, h)`` normalised by each image's own unpadded extent (like the targets); on
the pooled level that extent is ``valid_ratio * level size`` (:func:`box_to_level_xyxy`).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, roi_align

from .classification import Classification
from .transformer.box_encoding import inverse_sigmoid
from .transformer.multilevel_tokens import MultiLevelTokens
from .transformer.transformer import BoxHead

__all__ = ["CascadeRefinement", "RefinementStage", "box_to_level_xyxy", "finest_level"]


def finest_level(tokens: MultiLevelTokens) -> Tuple[torch.Tensor, int]:
    """The token level with the most positions as a map ``[B, C, h, w]``, and its index (the first
    one on ties)."""
    sizes = [int(m.shape[-2]) * int(m.shape[-1]) for m in tokens.level_masks]
    level = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
    start = sum(sizes[:level])
    h, w = tokens.level_masks[level].shape[-2:]
    src = tokens.src[:, start:start + sizes[level]]
    return src.transpose(1, 2).reshape(src.shape[0], src.shape[2], h, w), level


def box_to_level_xyxy(boxes: torch.Tensor, level_mask: torch.Tensor) -> torch.Tensor:
    """Image-normalised cxcywh boxes ``[B, Q, 4]`` -> absolute XYXY on a level ``[B, Q, 4]``.

    ``level_mask`` ``[B, h, w]`` (True = padding) gives each image's valid extent on the level: a
    box normalised by the image maps to ``x * valid_w``, ``y * valid_h`` level pixels, pixel ``i``
    covering ``[i, i + 1)`` (pool with ``aligned=True``).
    """
    valid_h = (~level_mask[:, :, 0]).sum(1).to(boxes.dtype)
    valid_w = (~level_mask[:, 0, :]).sum(1).to(boxes.dtype)
    scale = torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None, :]
    return box_convert(boxes, "cxcywh", "xyxy") * scale


class RefinementStage(nn.Module):
    """One cascade stage: pool the level inside each box, fuse with the decoder state, predict deltas.

    Args:
        d_model: channels of the pooled level and of the decoder states.
        hidden_dim: width of the fused feature and of the heads.
        pool_size: ``roi_align`` output size (``pool_size x pool_size``).
        sampling_ratio: ``roi_align`` samples per bin side (<= 0: adaptive).
        iou_threshold: the incoming-box IoU a matched query needs to train this stage.
        class_head: predicts a class-logit delta from the fused feature (None: no rescoring).
    """

    def __init__(self, d_model: int, hidden_dim: int, pool_size: int, sampling_ratio: int,
                 iou_threshold: float, class_head: Optional[nn.Linear] = None):
        super().__init__()
        self.pool_size = pool_size
        self.sampling_ratio = sampling_ratio
        self.iou_threshold = float(iou_threshold)
        self.pooled_proj = nn.Linear(d_model * pool_size * pool_size, hidden_dim)
        self.state_proj = nn.Linear(d_model, hidden_dim)
        self.box_head = BoxHead(hidden_dim, hidden_dim, 4, 2)  # last layer zero: identity at init
        self.class_head = class_head
        if class_head is not None:
            nn.init.zeros_(class_head.weight)
            nn.init.zeros_(class_head.bias)

    def pool(self, level: torch.Tensor, level_mask: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``[B, Q, C * P * P]``: the level pooled inside every box (normalised cxcywh ``[B, Q, 4]``)."""
        batch, num_queries = boxes.shape[:2]
        xyxy = box_to_level_xyxy(boxes.float(), level_mask).to(level.dtype)
        pooled = roi_align(level, list(xyxy.unbind(0)), self.pool_size, spatial_scale=1.0,
                           sampling_ratio=self.sampling_ratio, aligned=True)
        return pooled.reshape(batch, num_queries, -1)

    def forward(self, level: torch.Tensor, level_mask: torch.Tensor, states: torch.Tensor,
                boxes: torch.Tensor, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Refine ``boxes`` / ``logits`` (taken as given: the caller detaches them)."""
        pooled = self.pool(level, level_mask, boxes)
        fused = F.relu(self.pooled_proj(pooled) + self.state_proj(states.to(pooled.dtype)))
        box = (inverse_sigmoid(boxes) + self.box_head(fused).to(boxes.dtype)).sigmoid()
        if self.class_head is not None:
            logits = logits + self.class_head(fused).to(logits.dtype)
        return {"pred_logits": logits, "pred_boxes": box}


class CascadeRefinement(nn.Module):
    """Chained :class:`RefinementStage` s over the finest token level (see the module docstring)."""

    def __init__(self, stages: Sequence[RefinementStage]):
        super().__init__()
        if not len(stages):
            raise ValueError("MODEL.DETR.REFINEMENT.NUM_STAGES must be >= 1.")
        self.stages = nn.ModuleList(stages)

    @property
    def rescores(self) -> bool:
        return any(stage.class_head is not None for stage in self.stages)

    @classmethod
    def from_config(cls, cfg, classification: Classification) -> Optional["CascadeRefinement"]:
        """The cascade ``MODEL.DETR.REFINEMENT`` describes, or None when it is not enabled."""
        c = cfg.MODEL.DETR.REFINEMENT
        if not c.ENABLED:
            return None
        thresholds = list(c.IOU_THRESHOLDS)
        if c.NUM_STAGES < 1:
            raise ValueError(f"MODEL.DETR.REFINEMENT.NUM_STAGES must be >= 1, got {c.NUM_STAGES}.")
        if len(thresholds) != c.NUM_STAGES:
            raise ValueError(f"MODEL.DETR.REFINEMENT.IOU_THRESHOLDS {thresholds} needs one value per stage "
                             f"(NUM_STAGES={c.NUM_STAGES}).")
        if not all(0.0 <= t < 1.0 for t in thresholds):
            raise ValueError(f"MODEL.DETR.REFINEMENT.IOU_THRESHOLDS {thresholds} must lie in [0, 1).")
        if c.POOL_SIZE < 1:
            raise ValueError(f"MODEL.DETR.REFINEMENT.POOL_SIZE must be >= 1, got {c.POOL_SIZE}.")
        d_model = cfg.MODEL.DETR.HIDDEN_DIM
        hidden = c.HIDDEN_DIM or d_model
        return cls([RefinementStage(d_model, hidden, c.POOL_SIZE, c.SAMPLING_RATIO, t,
                                    classification.head(hidden) if c.RESCORE else None) for t in thresholds])

    def forward(self, tokens: MultiLevelTokens, states: torch.Tensor, boxes: torch.Tensor,
                logits: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Every stage's outputs for the matching queries' final decoder ``states`` ``[B, Q, C]``,
        ``boxes`` ``[B, Q, 4]`` and ``logits``: ``pred_logits``, ``pred_boxes`` and
        ``incoming_boxes`` (the detached boxes the stage refined), ``iou_threshold`` and ``rescored``
        (whether ``pred_logits`` are the stage's own)."""
        level, index = finest_level(tokens)
        level_mask = tokens.level_masks[index]
        outputs = []
        for stage in self.stages:
            boxes, logits = boxes.detach(), logits.detach()
            out = stage(level, level_mask, states, boxes, logits)
            out.update(incoming_boxes=boxes, iou_threshold=stage.iou_threshold, rescored=stage.class_head is not None)
            outputs.append(out)
            boxes, logits = out["pred_boxes"], out["pred_logits"]
        return outputs
