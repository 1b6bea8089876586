"""DETR set-prediction losses (classification, L1 box and GIoU) with deep supervision.

Each decoder output layer is matched to the targets on its own with the Hungarian matcher; the
losses of the matched pairs (and the no-object classification of the unmatched queries) are then
weighted and returned in a flat dict that Detectron2's trainer sums.

Matching and losses run in fp32 with autocast disabled, whatever the training precision
(``SOLVER.AMP``). With gradient accumulation the trainer declares each micro-batch part of one
batch (:meth:`SetCriterion.effective_batch`), so that the box-normalised losses use that batch's
box count.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage, has_event_storage
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .classification import Classification
from .matcher import HungarianMatcher
from .transformer.sparse_encoder import token_foreground_targets


@dataclass
class _EffectiveBatch:
    """One batch run as ``num_micro_batches`` forwards (:meth:`SetCriterion.effective_batch`)."""

    num_boxes: int  # target boxes of the whole batch on this rank
    num_micro_batches: int
    normaliser: Optional[float] = None  # the per-micro-batch box normaliser, once computed
    correct: int = 0  # matched queries (final layer) with the right class, over the micro-batches so far
    matched: int = 0


class SetCriterion(nn.Module):
    """Computes the weighted DETR losses for the final decoder layer and every auxiliary layer.

    Args:
        classification: how logits are read and which classification loss they get
            (:mod:`dinodet2.modeling.classification`: softmax CE, sigmoid focal or varifocal).
        matcher: callable ``(pred_logits, pred_boxes, targets) -> [(pred_idx, tgt_idx)] * B``,
            normally a :class:`~dinodet2.modeling.matcher.HungarianMatcher` reading logits the
            same way.
        class_weight: weight of the classification loss.
        l1_weight: weight of the L1 box loss.
        giou_weight: weight of the GIoU loss.
        token_fg_weight: weight of ``loss_token_fg`` (the sparse encoder's token scorer).
        token_focal: ``(alpha, gamma)`` of that focal loss.
    """

    def __init__(self, classification: Classification, matcher: nn.Module, class_weight: float = 1.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0, token_fg_weight: float = 1.0,
                 token_focal: Tuple[float, float] = (0.25, 2.0)):
        super().__init__()
        matcher_reading = getattr(matcher, "classification", classification)
        if matcher_reading.name != classification.name:
            raise ValueError(
                f"The matcher reads logits as {matcher_reading.name!r} but the criterion as "
                f"{classification.name!r}; they interpret the logits differently and must agree"
            )
        self.classification = classification
        self.matcher = matcher
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.token_fg_weight = token_fg_weight
        self.token_focal = tuple(token_focal)
        self.last_metrics: Dict[str, float] = {}
        self._effective_batch: Optional[_EffectiveBatch] = None

    @classmethod
    def from_config(cls, cfg, classification: Classification) -> "SetCriterion":
        """The criterion of ``MODEL.DETR`` (loss weights) with its Hungarian matcher (costs)."""
        c = cfg.MODEL.DETR
        return cls(classification, HungarianMatcher.from_config(cfg, classification), class_weight=c.CLASS_WEIGHT,
                   l1_weight=c.L1_WEIGHT, giou_weight=c.GIOU_WEIGHT, token_fg_weight=c.SPARSE_ENCODER.LOSS_WEIGHT,
                   token_focal=(c.FOCAL_ALPHA, c.FOCAL_GAMMA))

    @property
    def num_classes(self) -> int:
        return self.classification.num_classes

    def extra_repr(self) -> str:
        return f"weights=(class={self.class_weight}, l1={self.l1_weight}, giou={self.giou_weight})"

    def forward(
        self, outputs: Dict[str, Any], targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """Compute the weighted losses.

        Args:
            outputs: ``"pred_logits"`` ([B, Q, K+1] for ``"ce"``, [B, Q, K] for ``"focal"``),
                ``"pred_boxes"`` ([B, Q, 4] normalised cxcywh) and optionally ``"aux_outputs"``,
                a list of dicts with the same two keys, one per earlier decoder layer, and
                optionally ``"enc_outputs"`` (two-stage token proposals, losses suffixed ``_enc``)
                and ``"dn_outputs"`` (denoising queries: the two keys, ``"aux_outputs"``,
                ``"indices"`` (their fixed assignment) and ``"num_groups"``; losses ``_dn``), and
                optionally ``"token_scores"`` (the sparse encoder's token scorer, ``loss_token_fg``,
                :meth:`token_foreground_loss`), and optionally ``"refine_outputs"`` (cascade
                refinement stages, losses ``_refine_{k}``, :meth:`refinement_losses`).
            targets: B dicts with ``"labels"`` (int64 [n]) and ``"boxes"`` ([n, 4] normalised
                cxcywh), on the same device as the predictions, and optionally ``"weights"``
                ([n] float, MixUp label weighting): a matched query's classification, L1 and
                GIoU terms are multiplied by its target's weight (matching ignores weights).

        Returns:
            ``loss_class``, ``loss_bbox``, ``loss_giou`` for the final layer and
            ``loss_class_{i}``, ``loss_bbox_{i}``, ``loss_giou_{i}`` for auxiliary layer i, each
            already multiplied by its weight. ``class_error`` (final layer) is logged to the
            current :class:`EventStorage`, if any, and kept in :attr:`last_metrics`.
        """
        device = outputs["pred_logits"].device
        with torch.autocast(device.type, enabled=False):  # costs and losses in fp32 under AMP
            return self._losses(outputs, targets, self._box_normaliser(targets, device))

    def _losses(self, outputs: Dict[str, Any], targets: List[Dict[str, Tensor]], num_boxes: float
                ) -> Dict[str, Tensor]:
        indices = self._match(outputs, targets)  # the final layer's; the refinement stages reuse them
        losses = self.losses_for_indices(outputs, targets, indices, num_boxes, suffix="", log_metrics=True)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._layer_losses(aux_outputs, targets, num_boxes, suffix=f"_{i}"))
        if "enc_outputs" in outputs:  # two-stage proposals, one per image token
            losses.update(self._layer_losses(outputs["enc_outputs"], targets, num_boxes, suffix="_enc"))
        if "dn_outputs" in outputs:  # denoising queries with their fixed assignment
            dn = outputs["dn_outputs"]
            losses.update(self.denoising_losses(dn, targets, dn["indices"], num_boxes))
        if "token_scores" in outputs:  # the sparse encoder's token scorer
            losses.update(self.token_foreground_loss(outputs["token_scores"], targets))
        if "refine_outputs" in outputs:  # cascade refinement stages (dinodet2.modeling.refinement)
            losses.update(self.refinement_losses(outputs["refine_outputs"], targets, indices, num_boxes))
        return losses

    def refinement_losses(self, stages: List[Dict[str, Any]], targets: List[Dict[str, Tensor]],
                          indices: List[Tuple[Tensor, Tensor]], num_boxes: float) -> Dict[str, Tensor]:
        """Losses of the cascade refinement stages, suffixed ``_refine_{k}`` (Cascade R-CNN).

        Stage ``k`` (a dict with ``pred_logits``, ``pred_boxes``, ``incoming_boxes``,
        ``iou_threshold`` and ``rescored``) trains on the final layer's matches ``indices`` whose
        incoming box has IoU >= its threshold with the target; the other queries are "no object"
        for its class loss, which is returned only when the stage ``rescored``. A stage nobody
        passes still returns zero-valued losses connected to its predictions.
        """
        losses = {}
        for k, stage in enumerate(stages):
            incoming = stage["incoming_boxes"].float()
            kept = []
            for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
                src, tgt = src.to(incoming.device), tgt.to(incoming.device)
                iou = _paired_iou(box_convert(incoming[b, src], "cxcywh", "xyxy"),
                                  box_convert(target["boxes"][tgt].float(), "cxcywh", "xyxy"))
                keep = iou >= stage["iou_threshold"]
                kept.append((src[keep], tgt[keep]))
            stage_losses = self.losses_for_indices(stage, targets, kept, num_boxes, suffix=f"_refine_{k}")
            if not stage["rescored"]:
                del stage_losses[f"loss_class_refine_{k}"]
            losses.update(stage_losses)
        return losses

    @contextmanager
    def effective_batch(self, num_boxes: int, num_micro_batches: int) -> Iterator[None]:
        """Within the block, the forwards are the ``num_micro_batches`` micro-batches of one batch
        holding ``num_boxes`` target boxes on this rank (gradient accumulation,
        :mod:`dinodet2.engine.train_step`).

        The losses normalised by the box count (class for sigmoid heads, L1, GIoU, of every layer,
        the proposals and the denoising queries) divide by that batch's count (averaged over workers,
        at least 1) / ``num_micro_batches``: the mean of the micro-batches' losses -- what the
        trainer accumulates -- is then the batch's loss. ``class_error`` is logged once, over the
        whole batch, when the block ends normally.
        """
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}.")
        if self._effective_batch is not None:
            raise RuntimeError("SetCriterion.effective_batch blocks cannot be nested.")
        self._effective_batch = batch = _EffectiveBatch(int(num_boxes), int(num_micro_batches))
        try:
            yield
        finally:
            self._effective_batch = None
        if batch.matched:
            self._record_class_error(100.0 - 100.0 * batch.correct / batch.matched)

    def _box_normaliser(self, targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """This batch's box count (:meth:`_num_boxes`), or in an :meth:`effective_batch` the whole
        batch's count / its number of micro-batches (computed at its first micro-batch)."""
        batch = self._effective_batch
        if batch is None:
            return self._num_boxes(targets, device)
        if batch.normaliser is None:
            batch.normaliser = self._average_over_workers(batch.num_boxes, device) / batch.num_micro_batches
        return batch.normaliser

    @staticmethod
    def _num_boxes(targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """Average number of target boxes per worker (sum over all workers / world size), >= 1."""
        return SetCriterion._average_over_workers(sum(len(t["labels"]) for t in targets), device)

    @staticmethod
    def _average_over_workers(count: float, device: torch.device) -> float:
        """``count`` summed over all workers / world size, at least 1 (a loss normaliser)."""
        total = torch.tensor(float(count), dtype=torch.float32, device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(total)
        return torch.clamp(total / world_size, min=1).item()

    def token_foreground_loss(self, token_scores: Dict[str, Tensor],
                              targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """``loss_token_fg``: sigmoid focal loss of every valid token's foreground logit towards "its
        centre lies in one of the image's target boxes" (:func:`token_foreground_targets`), summed and
        normalised by the number of foreground tokens (averaged over workers, at least 1); padding
        tokens are ignored.

        ``token_scores``: ``logits`` ``[B, N]``, token ``centres`` and ``cells`` ``[B, N, 2]`` and
        ``valid`` ``[B, N]`` (:meth:`~.transformer.sparse_encoder.SparseTokenSelector.loss_inputs`).
        """
        logits, valid = token_scores["logits"].float(), token_scores["valid"]
        foreground = token_foreground_targets(token_scores["centres"], token_scores["cells"], valid,
                                              [t["boxes"] for t in targets])
        alpha, gamma = self.token_focal
        loss = sigmoid_focal_loss(logits, foreground.to(logits.dtype), alpha, gamma, reduction="none")
        norm = self._average_over_workers(foreground.sum().item(), logits.device)
        return {"loss_token_fg": self.token_fg_weight * loss.masked_fill(~valid, 0.0).sum() / norm}

    def _layer_losses(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        num_boxes: float,
        suffix: str,
        log_metrics: bool = False,
    ) -> Dict[str, Tensor]:
        """Match one decoder layer's predictions and compute its weighted losses."""
        return self.losses_for_indices(outputs, targets, self._match(outputs, targets), num_boxes, suffix,
                                       log_metrics)

    def _match(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """The Hungarian assignment of one layer's predictions to the targets."""
        self.classification.check_logits(outputs["pred_logits"])
        return self.matcher(outputs["pred_logits"].float(), outputs["pred_boxes"].float(), targets)

    def losses_for_indices(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]],
                           indices: List[Tuple[Tensor, Tensor]], num_boxes: float, suffix: str,
                           log_metrics: bool = False) -> Dict[str, Tensor]:
        """Weighted losses of one layer for a given query -> target assignment.

        Queries not in ``indices`` are trained as "no object". Used with the Hungarian
        assignment and with the fixed assignment of denoising queries.
        """
        logits = outputs["pred_logits"].float()
        boxes = outputs["pred_boxes"].float()
        self.classification.check_logits(logits)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        batch_idx, src_idx = batch_idx.to(logits.device), src_idx.to(logits.device)
        matched_labels = torch.cat(
            [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)]
        ).to(logits.device)
        matched_tgt_boxes = torch.cat(
            [t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, indices)]
        ).to(logits.device).float()
        matched_logits = logits[batch_idx, src_idx]
        matched_boxes = boxes[batch_idx, src_idx]
        matched_xyxy = box_convert(matched_boxes, "cxcywh", "xyxy")
        matched_tgt_xyxy = box_convert(matched_tgt_boxes, "cxcywh", "xyxy")

        # Per-target loss weights (MixUp label weighting), 1 for targets without "weights".
        weights = None
        if any("weights" in t for t in targets):
            weights = torch.cat([
                (t["weights"][tgt.to(t["weights"].device)] if "weights" in t else torch.ones(len(tgt)))
                .to(device=logits.device, dtype=torch.float32)
                for t, (_, tgt) in zip(targets, indices)
            ])
        query_weights = None  # [B, Q]: the matched queries' target weights, 1 elsewhere
        if weights is not None:
            query_weights = torch.ones(logits.shape[:2], dtype=torch.float32, device=logits.device)
            query_weights[batch_idx, src_idx] = weights

        matched_iou = _paired_iou(matched_xyxy.detach(), matched_tgt_xyxy)
        loss_class = self.classification.loss(logits, batch_idx, src_idx, matched_labels, matched_iou, num_boxes,
                                              query_weights)

        loss_bbox = F.l1_loss(matched_boxes, matched_tgt_boxes, reduction="none").sum(-1)
        loss_giou = generalized_box_iou_loss(matched_xyxy, matched_tgt_xyxy, reduction="none")
        if weights is not None:
            loss_bbox, loss_giou = loss_bbox * weights, loss_giou * weights
        loss_bbox = loss_bbox.sum() / num_boxes
        loss_giou = loss_giou.sum() / num_boxes

        if log_metrics:
            self._log_class_error(matched_logits, matched_labels)
        return {
            f"loss_class{suffix}": self.class_weight * loss_class,
            f"loss_bbox{suffix}": self.l1_weight * loss_bbox,
            f"loss_giou{suffix}": self.giou_weight * loss_giou,
        }

    def denoising_losses(self, dn_outputs: Dict[str, Any], targets: List[Dict[str, Tensor]],
                         indices: List[Tuple[Tensor, Tensor]], num_boxes: float) -> Dict[str, Tensor]:
        """Losses of the denoising queries (fixed assignment), suffixed ``_dn`` / ``_dn_{i}``.

        Normalised by ``num_boxes * num_groups`` (every object appears once per group).
        """
        norm = num_boxes * dn_outputs["num_groups"]
        losses = self.losses_for_indices(dn_outputs, targets, indices, norm, suffix="_dn")
        for i, aux in enumerate(dn_outputs.get("aux_outputs", [])):
            losses.update(self.losses_for_indices(aux, targets, indices, norm, suffix=f"_dn_{i}"))
        return losses

    @torch.no_grad()
    def _log_class_error(self, matched_logits: Tensor, matched_labels: Tensor) -> None:
        """Record ``class_error`` = 100 - top-1 accuracy (%) of the matched queries.

        With ``"ce"`` the argmax includes the no-object logit, as in DETR.

        Nothing is recorded when no query is matched (the metric is undefined then). In an
        :meth:`effective_batch` the counts add up and are recorded once, when it ends.
        """
        correct = int((matched_logits.argmax(-1) == matched_labels).sum())
        if self._effective_batch is not None:
            self._effective_batch.correct += correct
            self._effective_batch.matched += matched_labels.numel()
            return
        if matched_labels.numel() == 0:
            self.last_metrics = {}
            return
        self._record_class_error(100.0 - 100.0 * correct / matched_labels.numel())

    def _record_class_error(self, class_error: float) -> None:
        self.last_metrics = {"class_error": class_error}
        if has_event_storage():
            get_event_storage().put_scalar("class_error", class_error)


def _paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (XYXY), ``[N]``."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=1e-12)

