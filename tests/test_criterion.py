"""Tests for dinodet2.modeling.criterion.SetCriterion against hand-computed losses."""

import math

import pytest
import torch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from dinodet2.modeling.classification import build_classification
from dinodet2.modeling.criterion import SetCriterion
from dinodet2.modeling.matcher import HungarianMatcher

# One image, Q=3 queries, K=2 classes, 2 targets.
#   target 0: label 0, cxcywh (0.25, 0.25, 0.2, 0.2) -> xyxy (0.15, 0.15, 0.35, 0.35)
#   target 1: label 1, cxcywh (0.50, 0.50, 0.4, 0.4) -> xyxy (0.30, 0.30, 0.70, 0.70)
#   query 0: far away (0.9, 0.9, 0.1, 0.1), unmatched
#   query 1: (0.5, 0.5, 0.4, 0.2) -> xyxy (0.3, 0.4, 0.7, 0.6), matched to target 1
#   query 2: (0.3, 0.3, 0.2, 0.2) -> xyxy (0.2, 0.2, 0.4, 0.4), matched to target 0
# so the matching is pred [1, 2] <-> tgt [1, 0] (a non-identity permutation on both sides).
TARGET_BOXES = [[0.25, 0.25, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]]
PRED_BOXES = [[0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.4, 0.2], [0.3, 0.3, 0.2, 0.2]]
# Query 1 predicts its class (1) correctly, query 2 predicts the wrong one -> class_error = 50%.
CE_LOGITS = [[0.0, 0.5, 3.0], [0.5, 2.0, 0.0], [1.0, 0.0, 1.5]]  # last column: no-object
FOCAL_LOGITS = [[-3.0, -2.0], [-1.0, 2.0], [-0.5, 0.5]]
WEIGHTS = {"class_weight": 2.0, "l1_weight": 5.0, "giou_weight": 3.0}
ALPHA, GAMMA = 0.25, 2.0

# L1 (sum over matched pairs): q1-t1 |0.2 - 0.4| = 0.2; q2-t0 |0.3-0.25| + |0.3-0.25| = 0.1.
# GIoU q1-t1: q1 lies inside t1 -> IoU = 0.08 / 0.16 = 0.5, hull = t1 = union -> GIoU = 0.5.
# GIoU q2-t0: inter = 0.15 * 0.15 = 0.0225, union = 0.04 + 0.04 - 0.0225 = 0.0575,
#             hull = 0.25 * 0.25 = 0.0625 -> GIoU = 0.0225 / 0.0575 - (0.0625 - 0.0575) / 0.0625.
NUM_BOXES = 2
EXPECTED_BBOX = 5.0 * (0.2 + 0.1) / NUM_BOXES
GIOU_Q1 = 0.5
GIOU_Q2 = 0.0225 / 0.0575 - (0.0625 - 0.0575) / 0.0625
EXPECTED_GIOU = 3.0 * ((1 - GIOU_Q1) + (1 - GIOU_Q2)) / NUM_BOXES


def _neg_log_softmax(logits, index):
    return math.log(sum(math.exp(x) for x in logits)) - logits[index]


def _focal(logit, positive):
    p = 1 / (1 + math.exp(-logit))
    if positive:
        return ALPHA * (1 - p) ** GAMMA * -math.log(p)
    return (1 - ALPHA) * p**GAMMA * -math.log(1 - p)


# CE targets per query: [no-object (2), 1, 0]; class weights [1, 1, 0.1]; weighted mean.
EXPECTED_CE = (
    2.0
    * (
        0.1 * _neg_log_softmax(CE_LOGITS[0], 2)
        + 1.0 * _neg_log_softmax(CE_LOGITS[1], 1)
        + 1.0 * _neg_log_softmax(CE_LOGITS[2], 0)
    )
    / (0.1 + 1.0 + 1.0)
)
# Focal one-hot targets: q0 [0, 0], q1 [0, 1], q2 [1, 0]; summed and divided by num_boxes.
EXPECTED_FOCAL = (
    2.0
    * (
        _focal(-3.0, False)
        + _focal(-2.0, False)
        + _focal(-1.0, False)
        + _focal(2.0, True)
        + _focal(-0.5, True)
        + _focal(0.5, False)
    )
    / NUM_BOXES
)


def _reading(class_loss):
    return build_classification(class_loss, 2, no_object_weight=0.1, focal_alpha=ALPHA, focal_gamma=GAMMA,
                                varifocal_alpha=VFL_ALPHA)


def _criterion(class_loss):
    classification = _reading(class_loss)
    return SetCriterion(classification, HungarianMatcher(classification=classification), **WEIGHTS)


def _outputs(class_loss, dtype=torch.float32):
    logits = CE_LOGITS if class_loss == "ce" else FOCAL_LOGITS
    return {
        "pred_logits": torch.tensor([logits], dtype=dtype, requires_grad=True),
        "pred_boxes": torch.tensor([PRED_BOXES], dtype=dtype, requires_grad=True),
    }


def _targets():
    return [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor(TARGET_BOXES)}]


def _expected(class_loss):
    return {
        "loss_class": EXPECTED_CE if class_loss == "ce" else EXPECTED_FOCAL,
        "loss_bbox": EXPECTED_BBOX,
        "loss_giou": EXPECTED_GIOU,
    }


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_losses_match_hand_computation(class_loss):
    losses = _criterion(class_loss)(_outputs(class_loss), _targets())

    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    for name, expected in _expected(class_loss).items():
        assert losses[name].item() == pytest.approx(expected, rel=1e-5), name


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_aux_outputs_are_matched_per_layer(class_loss):
    outputs = _outputs(class_loss)
    # Layer 0 repeats the final predictions; layer 1 has its queries in reverse order, which only
    # gives the same losses if that layer is matched on its own.
    reversed_layer = {k: v.flip(1) for k, v in outputs.items()}
    outputs["aux_outputs"] = [dict(outputs), reversed_layer]

    losses = _criterion(class_loss)(outputs, _targets())

    assert set(losses) == {
        f"{name}{suffix}" for name in _expected(class_loss) for suffix in ("", "_0", "_1")
    }
    for name, expected in _expected(class_loss).items():
        for suffix in ("", "_0", "_1"):
            assert losses[name + suffix].item() == pytest.approx(expected, rel=1e-5), name + suffix


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_class_error_is_logged_not_returned(class_loss):
    criterion = _criterion(class_loss)
    outputs = _outputs(class_loss)
    outputs["aux_outputs"] = [_outputs(class_loss)]

    with EventStorage() as storage:
        losses = criterion(outputs, _targets())

    assert not any("class_error" in name for name in losses)
    assert storage.latest()["class_error"][0] == pytest.approx(50.0)
    assert criterion.last_metrics == {"class_error": pytest.approx(50.0)}
    # Without an active EventStorage the criterion still works and keeps the metric. Making
    # query 2 predict its label (0) too brings the error to 0%.
    outputs = _outputs(class_loss)
    with torch.no_grad():
        outputs["pred_logits"][0, 2, 0] = 3.0
    criterion(outputs, _targets())
    assert criterion.last_metrics == {"class_error": pytest.approx(0.0)}


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_no_targets_clamps_num_boxes(class_loss):
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    outputs = _outputs(class_loss)

    losses = _criterion(class_loss)(outputs, empty)

    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    if class_loss == "ce":  # every query is no-object; equal weights -> plain mean
        expected = sum(_neg_log_softmax(q, 2) for q in CE_LOGITS) / 3
    else:  # every one-hot target is 0; divided by the clamped num_boxes = 1
        expected = sum(_focal(x, False) for q in FOCAL_LOGITS for x in q) / 1
    assert losses["loss_class"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_gradients_flow(class_loss):
    outputs = _outputs(class_loss)
    outputs["aux_outputs"] = [_outputs(class_loss)]

    sum(_criterion(class_loss)(outputs, _targets()).values()).backward()

    for layer in (outputs, outputs["aux_outputs"][0]):
        for key in ("pred_logits", "pred_boxes"):
            grad = layer[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key
    # The unmatched query gets no box gradient.
    assert outputs["pred_boxes"].grad[0, 0].abs().sum() == 0


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_half_precision_inputs_give_float32_losses(class_loss):
    losses = _criterion(class_loss)(_outputs(class_loss, torch.float16), _targets())

    for name, expected in _expected(class_loss).items():
        assert losses[name].dtype == torch.float32
        assert losses[name].item() == pytest.approx(expected, rel=2e-3), name


def test_num_boxes_is_averaged_over_workers(monkeypatch):
    # Simulate 2 workers where the other one holds 6 boxes: num_boxes = (2 + 6) / 2 = 4.
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: tensor.add_(6))

    losses = _criterion("focal")(_outputs("focal"), _targets())

    assert losses["loss_bbox"].item() == pytest.approx(EXPECTED_BBOX * NUM_BOXES / 4, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(EXPECTED_GIOU * NUM_BOXES / 4, rel=1e-5)
    assert losses["loss_class"].item() == pytest.approx(EXPECTED_FOCAL * NUM_BOXES / 4, rel=1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="CLASS_LOSS"):
        build_classification("bce", 2)
    with pytest.raises(ValueError, match="must agree"):
        SetCriterion(_reading("focal"), HungarianMatcher(classification=_reading("ce")))
    with pytest.raises(ValueError, match="expects 3"):
        SetCriterion(_reading("ce"), HungarianMatcher())(_outputs("focal"), _targets())


# ------------------------------------------------------------------------------------------------
# IoU-aware (varifocal) classification and denoising losses
# ------------------------------------------------------------------------------------------------
VFL_ALPHA = 0.75
# Matched pairs as above: q1 -> t1 (class 1) with IoU 0.5; q2 -> t0 (class 0) with IoU 0.0225/0.0575.
IOU_Q1, IOU_Q2 = 0.5, 0.0225 / 0.0575


def _bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def _vfl(logit, target):
    p = 1 / (1 + math.exp(-logit))
    weight = target if target > 0 else VFL_ALPHA * p**GAMMA
    return weight * _bce(logit, target)


def test_varifocal_loss_matches_hand_computation():
    criterion = _criterion("varifocal")
    losses = criterion(_outputs("focal"), _targets())
    targets = [[0, 0], [0, IOU_Q1], [IOU_Q2, 0]]  # IoU of the matched box on the matched class
    expected = 2.0 * sum(_vfl(l, t) for row_l, row_t in zip(FOCAL_LOGITS, targets)
                         for l, t in zip(row_l, row_t)) / NUM_BOXES
    assert losses["loss_class"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(EXPECTED_BBOX, rel=1e-5)
    # The same matching as the focal loss (the cost reads the logits the same way).
    assert losses["loss_giou"].item() == pytest.approx(EXPECTED_GIOU, rel=1e-5)


def test_varifocal_is_minimised_at_the_iou():
    """IoU-aware: for a positive, the best score is the IoU of its box, not 1."""
    from dinodet2.modeling.classification import varifocal_loss

    logits = torch.linspace(-4, 4, 801)
    target = torch.full_like(logits, 0.6)
    per_logit = torch.stack([varifocal_loss(x.view(1), t.view(1)) for x, t in zip(logits, target)])
    best = logits[per_logit.argmin()].sigmoid().item()
    assert best == pytest.approx(0.6, abs=0.01)


def test_denoising_losses_use_the_fixed_assignment():
    criterion = _criterion("focal")
    targets = _targets()
    # Two groups of (positive, negative) x 2 objects = 8 queries. Positives predict their box exactly.
    boxes = torch.full((1, 8, 4), 0.5)
    boxes[0, [0, 4]] = torch.tensor(TARGET_BOXES[0])
    boxes[0, [1, 5]] = torch.tensor(TARGET_BOXES[1])
    logits = torch.full((1, 8, 2), -5.0)
    dn_outputs = {"pred_logits": logits, "pred_boxes": boxes, "num_groups": 2,
                  "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes.flip(1)}]}
    indices = [(torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1, 0, 1]))]
    losses = criterion.denoising_losses(dn_outputs, targets, indices, num_boxes=2)
    assert set(losses) == {f"loss_{k}_dn" for k in ("class", "bbox", "giou")} | {
        f"loss_{k}_dn_0" for k in ("class", "bbox", "giou")}
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou_dn"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_bbox_dn_0"].item() > 0.1  # the aux layer's boxes are in the wrong slots
    # Class loss: 4 positives with logit -5 on their class, every other logit a negative; / (2 boxes x 2 groups).
    expected = 2.0 * (4 * _focal(-5.0, True) + 12 * _focal(-5.0, False)) / 4
    assert losses["loss_class_dn"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("class_loss", ["ce", "focal", "varifocal"])
def test_target_weights_scale_the_matched_terms(class_loss):
    """MixUp label weighting: weights 1 change nothing; target 0 (matched to query 2) at weight w
    scales its L1 / GIoU terms by w and its classification terms by w."""
    criterion = _criterion(class_loss)
    plain = criterion(_outputs(class_loss), _targets())
    ones = criterion(_outputs(class_loss), [{**_targets()[0], "weights": torch.ones(2)}])
    for name in plain:
        assert ones[name].item() == pytest.approx(plain[name].item(), rel=1e-6), name
    weighted = criterion(_outputs(class_loss), [{**_targets()[0], "weights": torch.tensor([0.25, 1.0])}])
    assert weighted["loss_bbox"].item() == pytest.approx(5.0 * (0.2 + 0.25 * 0.1) / NUM_BOXES, rel=1e-5)
    assert weighted["loss_giou"].item() == pytest.approx(
        3.0 * ((1 - GIOU_Q1) + 0.25 * (1 - GIOU_Q2)) / NUM_BOXES, rel=1e-5)
    if class_loss == "ce":
        expected = 2.0 * (0.1 * _neg_log_softmax(CE_LOGITS[0], 2) + _neg_log_softmax(CE_LOGITS[1], 1)
                          + 0.25 * _neg_log_softmax(CE_LOGITS[2], 0)) / (0.1 + 1.0 + 1.0)
    elif class_loss == "focal":
        expected = 2.0 * (_focal(-3.0, False) + _focal(-2.0, False) + _focal(-1.0, False) + _focal(2.0, True)
                          + 0.25 * (_focal(-0.5, True) + _focal(0.5, False))) / NUM_BOXES
    else:
        expected = None
        assert weighted["loss_class"].item() < plain["loss_class"].item()
    if expected is not None:
        assert weighted["loss_class"].item() == pytest.approx(expected, rel=1e-5)
