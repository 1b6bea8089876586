"""Tests for dinodet2.modeling.matcher.HungarianMatcher.

The reference costs are computed here with plain Python arithmetic, independently of the
matcher's tensor code, and the optimum is found by brute force over all injective assignments.
"""

import itertools
import math
import random
from typing import List, Sequence, Tuple

import pytest
import torch

from dinodet2.modeling.classification import build_classification
from dinodet2.modeling.matcher import HungarianMatcher


def _matcher(*weights, class_loss="ce", num_classes=3, **kwargs):
    return HungarianMatcher(*weights, classification=build_classification(class_loss, num_classes), **kwargs)

Box = Sequence[float]


def _xyxy(box: Box) -> Tuple[float, float, float, float]:
    cx, cy, w, h = box
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(a: Box, b: Box) -> float:
    ax1, ay1, ax2, ay2 = _xyxy(a)
    bx1, by1, bx2, by2 = _xyxy(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _class_cost(logits: List[float], label: int, class_loss: str, alpha: float, gamma: float):
    if class_loss == "ce":
        return -math.exp(logits[label]) / sum(math.exp(x) for x in logits)
    p = 1.0 / (1.0 + math.exp(-logits[label]))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    return pos - neg


def _reference_cost(logits, boxes, labels, tgt_boxes, weights, class_loss, alpha=0.25, gamma=2.0):
    """Cost matrix [Q][n] for one image from nested Python lists."""
    w_class, w_bbox, w_giou = weights
    return [
        [
            w_class * _class_cost(logits[q], labels[t], class_loss, alpha, gamma)
            + w_bbox * sum(abs(a - b) for a, b in zip(boxes[q], tgt_boxes[t]))
            - w_giou * _giou(boxes[q], tgt_boxes[t])
            for t in range(len(labels))
        ]
        for q in range(len(boxes))
    ]


def _brute_force_min(cost: List[List[float]]) -> float:
    """Minimum total cost over all injective assignments of the smaller side to the larger."""
    num_q, num_t = len(cost), len(cost[0]) if cost else 0
    if num_t == 0:
        return 0.0
    if num_t <= num_q:
        return min(
            sum(cost[q][t] for t, q in enumerate(qs))
            for qs in itertools.permutations(range(num_q), num_t)
        )
    return min(
        sum(cost[q][t] for q, t in enumerate(ts))
        for ts in itertools.permutations(range(num_t), num_q)
    )


def _random_boxes(rng: random.Random, n: int) -> torch.Tensor:
    return torch.tensor(
        [
            [
                rng.uniform(0.2, 0.8),
                rng.uniform(0.2, 0.8),
                rng.uniform(0.05, 0.5),
                rng.uniform(0.05, 0.5),
            ]
            for _ in range(n)
        ]
    )


def _check_valid(pred_idx: torch.Tensor, tgt_idx: torch.Tensor, num_q: int, num_t: int):
    assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
    assert len(pred_idx) == len(tgt_idx) == min(num_q, num_t)
    assert len(set(pred_idx.tolist())) == len(pred_idx), "a query is matched twice"
    assert len(set(tgt_idx.tolist())) == len(tgt_idx), "a target is matched twice"
    assert all(0 <= q < num_q for q in pred_idx.tolist())
    assert all(0 <= t < num_t for t in tgt_idx.tolist())
    assert pred_idx.tolist() == sorted(pred_idx.tolist())


@pytest.mark.parametrize("seed", range(30))
def test_assignment_is_optimal(seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    class_loss = "ce" if seed % 2 == 0 else "focal"
    num_classes = rng.randint(1, 4)
    num_q = rng.randint(2, 6)
    # Several images with different target counts (0..Q, sometimes Q+1) exercise the per-image
    # split of the batched cost matrix.
    sizes = [rng.randint(0, num_q + (seed % 5 == 0)) for _ in range(rng.randint(1, 3))]
    weights = (rng.uniform(0.5, 2.0), rng.uniform(0.0, 5.0), rng.uniform(0.0, 2.0))
    num_logits = num_classes + 1 if class_loss == "ce" else num_classes
    logits = torch.randn(len(sizes), num_q, num_logits) * 2
    boxes = torch.stack([_random_boxes(rng, num_q) for _ in sizes])
    targets = [
        {"labels": torch.randint(num_classes, (n,)), "boxes": _random_boxes(rng, n)} for n in sizes
    ]

    matcher = _matcher(*weights, class_loss=class_loss, num_classes=num_classes)
    indices = matcher(logits, boxes, targets)

    assert len(indices) == len(sizes)
    for b, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets)):
        _check_valid(pred_idx, tgt_idx, num_q, len(target["labels"]))
        cost = _reference_cost(
            logits[b].tolist(),
            boxes[b].tolist(),
            target["labels"].tolist(),
            target["boxes"].tolist(),
            weights,
            class_loss,
        )
        got = sum(cost[q][t] for q, t in zip(pred_idx.tolist(), tgt_idx.tolist()))
        assert got == pytest.approx(_brute_force_min(cost), abs=1e-4)


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_obvious_assignment(class_loss: str):
    # Query 0 is far from everything and predicts no-object / nothing; query 1 sits exactly on
    # target 1 (label 0) and query 2 exactly on target 0 (label 1), with confident logits.
    boxes = torch.tensor([[[0.9, 0.9, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]]])
    if class_loss == "ce":
        logits = torch.tensor([[[-5.0, -5.0, 5.0], [5.0, -5.0, -5.0], [-5.0, 5.0, -5.0]]])
    else:
        logits = torch.tensor([[[-5.0, -5.0], [5.0, -5.0], [-5.0, 5.0]]])
    targets = [
        {
            "labels": torch.tensor([1, 0]),
            "boxes": torch.tensor([[0.6, 0.6, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2]]),
        }
    ]

    [(pred_idx, tgt_idx)] = _matcher(class_loss=class_loss)(logits, boxes, targets)

    assert pred_idx.tolist() == [1, 2]
    assert tgt_idx.tolist() == [1, 0]


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_empty_targets(class_loss: str):
    torch.manual_seed(0)
    num_logits = 4 if class_loss == "ce" else 3
    logits, boxes = torch.randn(2, 5, num_logits), torch.rand(2, 5, 4) * 0.5 + 0.25
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    matcher = _matcher(class_loss=class_loss)

    for pred_idx, tgt_idx in matcher(logits, boxes, [empty, empty]):
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert pred_idx.numel() == tgt_idx.numel() == 0

    one = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    (p0, t0), (p1, t1) = matcher(logits, boxes, [empty, one])
    assert p0.numel() == t0.numel() == 0
    assert len(p1) == len(t1) == 1 and t1.tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_low_precision_inputs_match_float32(dtype: torch.dtype, class_loss: str):
    torch.manual_seed(1)
    num_logits = 4 if class_loss == "ce" else 3
    logits = (torch.randn(2, 6, num_logits) * 3).to(dtype)
    boxes = (torch.rand(2, 6, 4) * 0.5 + 0.25).to(dtype)
    targets = [
        {"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4) * 0.5 + 0.25},
        {"labels": torch.tensor([1, 1, 0, 2]), "boxes": torch.rand(4, 4) * 0.5 + 0.25},
    ]
    matcher = _matcher(class_loss=class_loss)

    low = matcher(logits, boxes, targets)
    full = matcher(logits.float(), boxes.float(), targets)

    for (p_low, t_low), (p_full, t_full) in zip(low, full):
        assert torch.equal(p_low, p_full) and torch.equal(t_low, t_full)


@pytest.mark.parametrize("bad", ["nan_box", "inf_box", "nan_logit"])
def test_non_finite_predictions_are_matched_last(bad: str):
    """A diverged prediction must not crash the matcher (the trainer's non-finite guard reports the
    step); it gets the worst cost, so a finite prediction takes the target."""
    logits, boxes = torch.zeros(1, 3, 3), torch.full((1, 3, 4), 0.3)
    bad_query = {"nan_box": 1, "inf_box": 0, "nan_logit": 2}[bad]
    if bad == "nan_box":
        boxes[0, 1, 2] = float("nan")
    elif bad == "inf_box":
        boxes[0, 0, 3] = float("inf")
    else:
        logits[0, 2, 1] = float("nan")
    boxes[0, bad_query, :2] = 0.5  # the bad query would be the best match if it were finite
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]

    (pred_idx, tgt_idx), = HungarianMatcher()(logits, boxes, targets)
    assert tgt_idx.tolist() == [0] and pred_idx.item() != bad_query


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cost_class": -1.0}, ">= 0"),
        ({"cost_giou": -0.5}, ">= 0"),
        ({"cost_class": 0.0, "cost_bbox": 0.0, "cost_giou": 0.0}, "at least one"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=f"(?i){message}"):
        HungarianMatcher(**kwargs)
