"""Hungarian (bipartite) matching between DETR predictions and ground-truth boxes.

For each image, every ground-truth box is assigned to exactly one query (and every query to at
most one box) so that the summed matching cost is minimal. The cost of pairing query ``q`` with
target ``t`` is::

    cost_class * C_cls(q, t) + cost_bbox * L1(box_q, box_t) + cost_giou * -GIoU(box_q, box_t)

where the L1 distance is taken on normalised ``(cx, cy, w, h)`` boxes and GIoU on their
``(x1, y1, x2, y2)`` form.

Staged matching (curriculum, see :mod:`dinodet2.engine.curriculum_schedules`): the settable
``HungarianMatcher.stage`` (one of :data:`MATCHING_STAGES`) picks which terms are used:

* ``"l1"``: ``cost_bbox * L1`` only (weight 1 if ``cost_bbox`` is 0);
* ``"boxes"``: class-agnostic ``cost_bbox * L1 + cost_giou * -GIoU`` (L1 with weight 1 if both
  box weights are 0);
* ``"full"`` (default): the full cost above.
"""

from typing import Dict, List, Optional, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .classification import Classification, SoftmaxClassification

MATCHING_STAGES = ("l1", "boxes", "full")
# Cost given to NaN/inf entries of the cost matrix: larger than any finite cost the terms produce.
NON_FINITE_COST = 1e8


class HungarianMatcher(nn.Module):
    """Assigns targets to queries by minimising the DETR matching cost (no learnable state).

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 distance between normalised cxcywh boxes.
        cost_giou: weight of the negative generalized IoU.
        classification: how logits are read and their class cost
            (:mod:`dinodet2.modeling.classification`); default: softmax with a trailing no-object
            logit (the cost, minus the target class probability, needs no class count).
        stage: which cost terms are used, one of :data:`MATCHING_STAGES` (see the module
            docstring); settable at any time as ``matcher.stage``.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        classification: Optional[Classification] = None,
        stage: str = "full",
    ):
        super().__init__()
        costs = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        negative = [name for name, value in costs.items() if value < 0]
        if negative:
            raise ValueError(f"Matching costs must be >= 0, got negative {negative}: {costs}")
        if all(value == 0 for value in costs.values()):
            raise ValueError(f"At least one matching cost must be > 0, got {costs}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.classification = classification if classification is not None else SoftmaxClassification(1)
        self.stage = stage

    @classmethod
    def from_config(cls, cfg, classification: Classification) -> "HungarianMatcher":
        c = cfg.MODEL.DETR
        return cls(c.COST_CLASS, c.COST_BBOX, c.COST_GIOU, classification)

    @property
    def stage(self) -> str:
        """Matching stage: ``"l1"``, ``"boxes"`` or ``"full"`` (see the module docstring)."""
        return self._stage

    @stage.setter
    def stage(self, stage: str) -> None:
        if stage not in MATCHING_STAGES:
            raise ValueError(f"HungarianMatcher stage must be one of {MATCHING_STAGES}, got {stage!r}")
        self._stage = stage

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, classification={self.classification.name!r}, stage={self.stage!r}"
        )

    def _cost(self, logits: Tensor, boxes: Tensor, tgt_ids: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Matching cost [N, T] of the current stage for flattened float32 predictions."""
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        if self.stage == "l1":
            return (self.cost_bbox or 1.0) * cost_bbox
        cost_giou = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        if self.stage == "boxes":
            if self.cost_bbox == 0 and self.cost_giou == 0:
                return cost_bbox
            return self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        return (
            self.cost_class * self.classification.matching_cost(logits, tgt_ids)
            + self.cost_bbox * cost_bbox
            + self.cost_giou * cost_giou
        )

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Match predictions to targets, image by image.

        Args:
            pred_logits: [B, Q, K+1] for ``"ce"`` (last index = no-object), [B, Q, K] for
                ``"focal"``; any floating dtype (computed in float32).
            pred_boxes: [B, Q, 4] normalised ``(cx, cy, w, h)`` boxes in [0, 1].
            targets: B dicts with ``"labels"`` (int64 [n], ids in 0..K-1) and ``"boxes"``
                ([n, 4] normalised cxcywh), on the same device as the predictions.

        Returns:
            B tuples ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length ``min(Q, n)``:
            query ``pred_idx[j]`` is matched to target ``tgt_idx[j]``; ``pred_idx`` is sorted.
        """
        batch_size, num_queries = pred_logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"Got {len(targets)} target dicts for a batch of {batch_size}")
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]

        # All images at once: [B*Q, sum(n)] costs, later split into the per-image diagonal blocks.
        logits = pred_logits.flatten(0, 1).float()
        boxes = pred_boxes.flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()

        cost = self._cost(logits, boxes, tgt_ids, tgt_boxes).view(batch_size, num_queries, -1).cpu()
        # A NaN/inf cost (a diverged prediction, or two zero-area boxes) is matched last instead of
        # failing here: the loss of such a step is non-finite, and the trainer's non-finite guard
        # (SOLVER.NONFINITE) stops or skips it with one clear message, on every DDP rank together.
        cost = torch.nan_to_num(cost, nan=NON_FINITE_COST, posinf=NON_FINITE_COST, neginf=NON_FINITE_COST)

        indices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            pred_idx, tgt_idx = linear_sum_assignment(block[i].numpy())
            indices.append((torch.from_numpy(pred_idx).long(), torch.from_numpy(tgt_idx).long()))
        return indices
