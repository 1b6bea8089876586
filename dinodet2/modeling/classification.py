"""How class logits are read: one object decides the number of logits, the bias prior, the matching
cost, the loss and the inference top-k (``MODEL.DETR.CLASS_LOSS``).

* :class:`SoftmaxClassification` (``"ce"``, the seed DETR): ``K + 1`` logits, the last one
  "no object"; matching cost ``-p(target class)``; cross-entropy with a down-weighted no-object
  class; inference keeps each query's best object class.
* :class:`SigmoidClassification` (``"focal"`` / ``"varifocal"``, Deformable DETR / DINO): ``K``
  independent sigmoid logits with the RetinaNet prior (p = 0.01) as bias; the Deformable-DETR focal
  matching cost; sigmoid focal loss, or the IoU-aware varifocal loss whose matched target is the
  IoU of the predicted box; inference takes the top-k over queries x classes; the per-token scores
  of two-stage proposal selection are the best class probability.

The matcher, the criterion, the meta-architecture's class heads and the two-stage proposals ask
this object instead of branching on the loss name.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

__all__ = ["CLASS_LOSSES", "Classification", "SigmoidClassification", "SoftmaxClassification",
           "build_classification", "class_dependent_parameter_names", "mark_class_dependent", "varifocal_loss"]

CLASS_LOSSES = ("ce", "focal", "varifocal")

#: attribute set (True) on the modules whose weights have one row per class (class heads, the
#: denoising label embedding): fine-tuning with another MODEL.DETR.NUM_CLASSES re-initialises them.
CLASS_DEPENDENT = "dinodet2_class_dependent"


def mark_class_dependent(module: nn.Module) -> nn.Module:
    """Mark ``module`` as one whose weights depend on the number of classes (returns it)."""
    setattr(module, CLASS_DEPENDENT, True)
    return module


def class_dependent_parameter_names(model: nn.Module) -> List[str]:
    """The ``state_dict()`` names of ``model``'s weights inside modules marked by
    :func:`mark_class_dependent` (every class head made by :meth:`Classification.head`, ...)."""
    prefixes = tuple(f"{name}." for name, module in model.named_modules()
                     if name and getattr(module, CLASS_DEPENDENT, False))
    return [key for key in model.state_dict() if key.startswith(prefixes)] if prefixes else []


class Classification(nn.Module):
    """Base of the two ways to read class logits (no parameters; see the module docstring).

    Attributes:
        name: the ``MODEL.DETR.CLASS_LOSS`` value.
        num_classes: K, the number of object classes.
        num_logits: logits per query.
        sigmoid: whether logits are independent per class (needed by two-stage proposals).
    """

    name: str
    sigmoid: bool

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MODEL.DETR.NUM_CLASSES must be >= 1, got {num_classes}.")
        self.num_classes = int(num_classes)

    @property
    def num_logits(self) -> int:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name!r}, num_classes={self.num_classes}"

    def head(self, dim: int) -> nn.Linear:
        """A class head ``Linear(dim, num_logits)`` with this reading's bias prior, marked class
        dependent (:func:`mark_class_dependent`)."""
        head = nn.Linear(dim, self.num_logits)
        self.init_bias(head.bias)
        return mark_class_dependent(head)

    def init_bias(self, bias: Tensor) -> None:
        """Initialise a class head's bias (default: PyTorch's)."""

    def check_logits(self, logits: Tensor) -> None:
        if logits.shape[-1] != self.num_logits:
            raise ValueError(f"pred_logits has {logits.shape[-1]} logits per query; class_loss={self.name!r} with "
                             f"num_classes={self.num_classes} expects {self.num_logits}")

    def matching_cost(self, logits: Tensor, target_classes: Tensor) -> Tensor:
        """Classification cost ``[N, T]`` for flattened float32 logits ``[N, C]`` and target ids ``[T]``."""
        raise NotImplementedError

    def loss(self, logits: Tensor, batch_idx: Tensor, query_idx: Tensor, labels: Tensor, matched_iou: Tensor,
             num_boxes: float, query_weights: Optional[Tensor] = None) -> Tensor:
        """Classification loss of one layer: ``logits`` ``[B, Q, C]`` (float32); queries
        ``(batch_idx, query_idx)`` are matched to classes ``labels`` with predicted-box IoU
        ``matched_iou``; the others are "no object". ``query_weights`` ``[B, Q]`` scale each query."""
        raise NotImplementedError

    def detections(self, logits: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Top-``k`` detections of one image's ``[Q, C]`` logits: scores, query indices, labels."""
        raise NotImplementedError

    def best_class_scores(self, logits: Tensor) -> Tensor:
        """``[..., Q]``: each query's best object-class probability (its detection score)."""
        raise NotImplementedError


class SoftmaxClassification(Classification):
    """``"ce"``: softmax over K classes + a trailing no-object logit (weight ``no_object_weight``)."""

    name = "ce"
    sigmoid = False

    def __init__(self, num_classes: int, no_object_weight: float = 0.1):
        super().__init__(num_classes)
        if no_object_weight < 0:
            raise ValueError(f"MODEL.DETR.NO_OBJECT_WEIGHT must be >= 0, got {no_object_weight}.")
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1

    def matching_cost(self, logits, target_classes):
        return -logits.softmax(-1)[:, target_classes]

    def loss(self, logits, batch_idx, query_idx, labels, matched_iou, num_boxes, query_weights=None):
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target[batch_idx, query_idx] = labels
        if query_weights is None:
            return F.cross_entropy(logits.transpose(1, 2), target, weight=self.empty_weight)
        # same normalisation as the unweighted mean: the sum of the class weights
        per_query = F.cross_entropy(logits.transpose(1, 2), target, weight=self.empty_weight, reduction="none")
        return (per_query * query_weights).sum() / self.empty_weight[target].sum()

    def best_class_scores(self, logits):
        return logits.float().softmax(-1)[..., :-1].amax(-1)

    def detections(self, logits, k):
        scores, labels = logits.softmax(-1)[:, :-1].max(-1)
        scores, query = scores.topk(min(k, scores.numel()))
        return scores, query, labels[query]


class SigmoidClassification(Classification):
    """``"focal"`` / ``"varifocal"``: K sigmoid logits (see the module docstring)."""

    sigmoid = True
    PRIOR_PROBABILITY = 0.01

    def __init__(self, num_classes: int, loss: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 varifocal_alpha: float = 0.75):
        super().__init__(num_classes)
        if loss not in ("focal", "varifocal"):
            raise ValueError(f"SigmoidClassification loss must be 'focal' or 'varifocal', got {loss!r}.")
        for key, value, low, high in (("FOCAL_ALPHA", focal_alpha, 0.0, 1.0), ("FOCAL_GAMMA", focal_gamma, 0.0, math.inf),
                                      ("VARIFOCAL_ALPHA", varifocal_alpha, 0.0, math.inf)):
            if not low <= value <= high:
                raise ValueError(f"MODEL.DETR.{key} must be in [{low:g}, {high:g}], got {value}.")
        self.name = loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.varifocal_alpha = varifocal_alpha

    @property
    def num_logits(self) -> int:
        return self.num_classes

    def init_bias(self, bias):
        nn.init.constant_(bias, -math.log((1 - self.PRIOR_PROBABILITY) / self.PRIOR_PROBABILITY))

    def matching_cost(self, logits, target_classes):
        # Deformable DETR's focal cost (the varifocal loss changes the target, not how a logit is read)
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
        return pos[:, target_classes] - neg[:, target_classes]

    def loss(self, logits, batch_idx, query_idx, labels, matched_iou, num_boxes, query_weights=None):
        target = torch.zeros_like(logits)
        if self.name == "focal":
            target[batch_idx, query_idx, labels] = 1.0
            loss = sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma,
                                      reduction="sum" if query_weights is None else "none")
            if query_weights is not None:
                loss = (loss * query_weights[..., None]).sum()
            return loss / num_boxes
        target[batch_idx, query_idx, labels] = matched_iou.clamp(min=0).to(logits.dtype)
        return varifocal_loss(logits, target, self.varifocal_alpha, self.focal_gamma, query_weights) / num_boxes

    def detections(self, logits, k):
        prob = logits.sigmoid().flatten()
        scores, flat = prob.topk(min(k, prob.numel()))
        return scores, flat // self.num_classes, flat % self.num_classes

    def best_class_scores(self, logits):
        return logits.float().sigmoid().amax(-1)

    def selection_scores(self, logits: Tensor) -> Tensor:
        """Per-token score of two-stage proposal selection: the best class probability."""
        return self.best_class_scores(logits.detach())


def build_classification(class_loss: str, num_classes: int, *, no_object_weight: float = 0.1,
                         focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                         varifocal_alpha: float = 0.75) -> Classification:
    """The :class:`Classification` that ``MODEL.DETR.CLASS_LOSS`` names."""
    if class_loss == "ce":
        return SoftmaxClassification(num_classes, no_object_weight)
    if class_loss in ("focal", "varifocal"):
        return SigmoidClassification(num_classes, class_loss, focal_alpha, focal_gamma, varifocal_alpha)
    raise ValueError(f"MODEL.DETR.CLASS_LOSS must be one of {CLASS_LOSSES}, got '{class_loss}'.")


def classification_from_config(cfg) -> Classification:
    """:func:`build_classification` from ``MODEL.DETR`` (CLASS_LOSS, NUM_CLASSES and the loss constants)."""
    c = cfg.MODEL.DETR
    return build_classification(c.CLASS_LOSS, c.NUM_CLASSES, no_object_weight=c.NO_OBJECT_WEIGHT,
                                focal_alpha=c.FOCAL_ALPHA, focal_gamma=c.FOCAL_GAMMA,
                                varifocal_alpha=c.VARIFOCAL_ALPHA)


def varifocal_loss(logits: Tensor, target_score: Tensor, alpha: float = 0.75, gamma: float = 2.0,
                   query_weights: Optional[Tensor] = None) -> Tensor:
    """Varifocal loss (Zhang et al., VarifocalNet 2021), summed.

    Binary cross-entropy towards an IoU-valued target ``q``: positives (``q > 0``) are weighted
    by ``q`` (high-quality matches count more), negatives by ``alpha * p**gamma`` (focal
    down-weighting of easy negatives, applied to negatives only). ``query_weights`` ([B, Q])
    scale each query's terms.
    """
    prob = logits.sigmoid().detach()
    positive = (target_score > 0).to(logits.dtype)
    weight = alpha * prob.pow(gamma) * (1 - positive) + target_score * positive
    bce = F.binary_cross_entropy_with_logits(logits, target_score, reduction="none")
    if query_weights is not None:
        weight = weight * query_weights[..., None]
    return (bce * weight).sum()
