"""Tests of the model curricula: staged Hungarian matching, the query ramp-up of the DETR
meta-architecture (learned, anchor and two-stage queries), their schedules and the
:class:`~dinodet2.engine.curriculum_schedules.CurriculumHook` that applies them."""
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torchvision.ops import box_convert, generalized_box_iou

from dinodet2.engine.curriculum_schedules import (
    CurriculumHook,
    check_matching_schedule,
    check_query_schedule,
    matching_stage_at,
    num_queries_at,
)
from dinodet2.modeling.classification import build_classification
from dinodet2.modeling.matcher import MATCHING_STAGES, HungarianMatcher
from conftest import make_train_batch as _train_batch


def _match(matcher, logits, boxes, labels, tgt_boxes):
    """Matched ``(query, target)`` pairs of one image."""
    target = {"labels": torch.tensor(labels), "boxes": torch.tensor(tgt_boxes)}
    (pred_idx, tgt_idx), = matcher(torch.tensor([logits]), torch.tensor([boxes]), [target])
    return list(zip(pred_idx.tolist(), tgt_idx.tolist()))


# ------------------------------------------------------------------------------------------------
# Staged matching
# ------------------------------------------------------------------------------------------------
# Query 0 sits on target 0 but is confident in target 1's class; query 1 the other way round.
CLASS_VS_BOX = dict(
    logits=[[-10.0, 10.0, -10.0], [10.0, -10.0, -10.0]],  # CE: 2 classes + no-object
    boxes=[[0.26, 0.25, 0.2, 0.2], [0.75, 0.74, 0.2, 0.2]],
    labels=[0, 1],
    tgt_boxes=[[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]],
)
# One target; query 0 is concentric but smaller (L1 0.12, GIoU 0.49), query 1 has the right size
# but is shifted (L1 0.10, GIoU 1/3): L1 alone prefers query 1, L1 + GIoU query 0.
L1_VS_GIOU = dict(
    logits=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    boxes=[[0.5, 0.5, 0.14, 0.14], [0.6, 0.5, 0.2, 0.2]],
    labels=[0],
    tgt_boxes=[[0.5, 0.5, 0.2, 0.2]],
)


@pytest.mark.parametrize("stage, expected", [("full", [(0, 1), (1, 0)]), ("boxes", [(0, 0), (1, 1)]),
                                             ("l1", [(0, 0), (1, 1)])])
def test_full_matching_follows_classes_and_box_stages_follow_boxes(stage, expected):
    matcher = HungarianMatcher(cost_class=10.0, cost_bbox=1.0, cost_giou=1.0, stage=stage)
    assert _match(matcher, **CLASS_VS_BOX) == expected


def test_l1_and_boxes_stages_differ_where_giou_matters():
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    matcher.stage = "l1"
    assert _match(matcher, **L1_VS_GIOU) == [(1, 0)]
    matcher.stage = "boxes"
    assert _match(matcher, **L1_VS_GIOU) == [(0, 0)]


@pytest.mark.parametrize("stage, cost_giou", [("l1", 2.0), ("boxes", 0.0)])
def test_box_stages_fall_back_to_l1_with_weight_one(stage, cost_giou):
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=cost_giou, stage=stage)
    assert _match(matcher, **L1_VS_GIOU) == [(1, 0)]  # an all-zero cost would keep query 0


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_full_stage_is_the_default_and_bit_identical(class_loss):
    torch.manual_seed(0)
    logits, boxes = torch.randn(14, 4), torch.rand(14, 4) * 0.5 + 0.2
    tgt_ids, tgt_boxes = torch.tensor([0, 2, 1, 1]), torch.rand(4, 4) * 0.5 + 0.2
    default = HungarianMatcher(classification=build_classification(class_loss, 3))
    staged = HungarianMatcher(classification=build_classification(class_loss, 3), stage="l1")
    staged.stage = "full"
    assert default.stage == "full"
    # The cost as computed before staged matching existed.
    reference = (
        default.cost_class * default.classification.matching_cost(logits, tgt_ids)
        + default.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        + default.cost_giou * -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                   box_convert(tgt_boxes, "cxcywh", "xyxy"))
    )
    assert torch.equal(default._cost(logits, boxes, tgt_ids, tgt_boxes), reference)
    assert torch.equal(staged._cost(logits, boxes, tgt_ids, tgt_boxes), reference)


def test_invalid_stage_raises():
    with pytest.raises(ValueError, match="stage must be one of"):
        HungarianMatcher(stage="giou")
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="stage must be one of"):
        matcher.stage = "class"
    assert matcher.stage == "full"


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------
def test_num_queries_ramp():
    assert num_queries_at(0, 25, 100, 1000) == 25
    assert num_queries_at(1, 25, 100, 1000) == 25
    assert num_queries_at(500, 25, 100, 1000) == 63  # 62.5 rounded half up
    assert num_queries_at(999, 25, 100, 1000) == 100  # 99.925
    assert num_queries_at(998, 25, 100, 1000) == 100  # 99.85
    assert num_queries_at(993, 25, 100, 1000) == 99  # 99.475
    assert num_queries_at(1000, 25, 100, 1000) == 100
    assert num_queries_at(10**6, 25, 100, 1000) == 100
    assert num_queries_at(-5, 25, 100, 1000) == 25
    assert num_queries_at(0, 25, 100, 0) == 100
    ramp = [num_queries_at(i, 3, 10, 17) for i in range(20)]
    assert ramp == sorted(ramp) and ramp[0] == 3 and ramp[-1] == 10


def test_matching_stage_boundaries():
    stages, steps = ["l1", "boxes"], [200, 500]
    expected = {0: "l1", 199: "l1", 200: "boxes", 499: "boxes", 500: "full", 10**6: "full"}
    assert {i: matching_stage_at(i, stages, steps) for i in expected} == expected
    assert matching_stage_at(0, [], []) == "full"


@pytest.mark.parametrize("stages, steps, message", [
    (["l1"], [200, 500], "same length"),
    (["l1", "giou"], [200, 500], "STAGES must be names"),
    (["l1", "boxes"], [500, 500], "strictly increasing"),
    (["l1", "boxes"], [500, 200], "strictly increasing"),
    (["l1"], [0], "must be > 0"),
])
def test_invalid_matching_schedule_raises(stages, steps, message):
    with pytest.raises(ValueError, match=message) as info:
        check_matching_schedule(stages, steps)
    assert "CURRICULUM.MATCHING." in str(info.value)


def test_invalid_query_schedule_raises():
    check_query_schedule(10, 10, 0)
    for start in (0, 11):
        with pytest.raises(ValueError, match="CURRICULUM.QUERIES.START_QUERIES"):
            check_query_schedule(start, 10, 100)
    with pytest.raises(ValueError, match="CURRICULUM.QUERIES.RAMP_ITERS"):
        check_query_schedule(5, 10, -1)


# ------------------------------------------------------------------------------------------------
# Query ramp-up in the model
# ------------------------------------------------------------------------------------------------
QUERY_TYPES = {
    "learned": ({}, ["transformer.queries.query_pos"]),
    "anchor": ({"MODEL.DETR.ANCHOR_QUERIES": True}, ["transformer.queries.anchor_boxes", "transformer.queries.content"]),
    "two_stage": ({"MODEL.DETR.TWO_STAGE": True, "MODEL.DETR.CLASS_LOSS": "focal"},
                  ["transformer.queries.content"]),
    "anchor_dn": ({"MODEL.DETR.ANCHOR_QUERIES": True, "MODEL.DETR.CLASS_LOSS": "focal",
                   "MODEL.DETR.DN.ENABLED": True}, ["transformer.queries.anchor_boxes", "transformer.queries.content"]),
}


def _build(cfg, opts):
    for key, value in opts.items():
        cfg.merge_from_list([key, value])
    return build_model(cfg)


@pytest.mark.parametrize("query_type", list(QUERY_TYPES))
def test_active_queries_in_training_and_inference(tiny_cfg, query_type):
    opts, query_params = QUERY_TYPES[query_type]
    model = _build(tiny_cfg, opts).train()
    k = 4
    model.set_num_active_queries(k)
    assert model.num_active_queries == k
    seen = []
    model.criterion.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    batch = _train_batch()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    outputs = seen[-1]
    assert outputs["pred_logits"].shape[:2] == (2, k) and outputs["pred_boxes"].shape[:2] == (2, k)
    assert all(aux["pred_logits"].shape[1] == k for aux in outputs["aux_outputs"])
    if model.denoising is not None:  # denoising queries are not counted among the active ones
        targets = model.prepare_targets(batch, model.preprocess_image(batch)[0])
        assert outputs["dn_outputs"]["pred_logits"].shape[1] == model.denoising(targets).num_queries
    sum(losses.values()).backward()
    named = dict(model.named_parameters())
    missing = [n for n, p in named.items() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient (would break DDP): {missing}"
    for name in query_params:
        grad = named[name].grad
        assert grad[:k].abs().sum() > 0, name
        assert not grad[k:].any(), name  # inactive queries are sliced off

    model.eval()
    captured = []
    inference = model.inference
    model.inference = lambda logits, boxes, sizes, padding=None: captured.append(logits) or inference(logits, boxes, sizes,
                                                                                              padding)
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 56, 70) * 255}])
    assert captured[-1].shape[:2] == (1, k)
    assert 0 < len(out[0]["instances"]) <= k * tiny_cfg.MODEL.DETR.NUM_CLASSES


def test_all_active_queries_equal_the_default(tiny_cfg):
    model = _build(tiny_cfg, QUERY_TYPES["anchor"][0]).eval()
    images, mask = model.preprocess_image([{"image": torch.rand(3, 56, 70) * 255}])
    with torch.no_grad():
        default = model.forward_transformer(images, mask)
        model.set_num_active_queries(model.num_queries)
        full = model.forward_transformer(images, mask)
        model.set_num_active_queries(None)
        again = model.forward_transformer(images, mask)
    assert default["pred_logits"].shape[1] == model.num_queries == model.num_active_queries
    for out in (full, again):
        assert torch.equal(out["pred_logits"], default["pred_logits"])
        assert torch.equal(out["pred_boxes"], default["pred_boxes"])


def test_invalid_active_queries_raise(tiny_cfg):
    model = build_model(tiny_cfg)
    for k in (0, tiny_cfg.MODEL.DETR.NUM_QUERIES + 1):
        with pytest.raises(ValueError, match="MODEL.DETR.NUM_QUERIES"):
            model.set_num_active_queries(k)
    assert model.num_active_queries == tiny_cfg.MODEL.DETR.NUM_QUERIES


# ------------------------------------------------------------------------------------------------
# CurriculumHook
# ------------------------------------------------------------------------------------------------
def test_hook_sets_schedules_per_iteration_and_restores_after_training(tiny_cfg):
    tiny_cfg.CURRICULUM.QUERIES.ENABLED = True
    tiny_cfg.CURRICULUM.QUERIES.START_QUERIES = 2
    tiny_cfg.CURRICULUM.QUERIES.RAMP_ITERS = 4
    tiny_cfg.CURRICULUM.MATCHING.ENABLED = True
    tiny_cfg.CURRICULUM.MATCHING.STEPS = [2, 5]
    model = build_model(tiny_cfg)
    hook = CurriculumHook.from_config(tiny_cfg, SimpleNamespace(module=model))  # DDP-like wrapper
    assert hook.model is model
    expected = {0: (2, "l1"), 1: (4, "l1"), 2: (6, "boxes"), 3: (8, "boxes"), 4: (10, "boxes"),
                5: (10, "full"), 6: (10, "full")}
    with EventStorage() as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        for iteration in (3, 4, 5, 6, 0, 1, 2):  # any order: a function of the iteration (resume)
            hook.trainer.iter = storage.iter = iteration
            hook.before_step()
            num_queries, stage = expected[iteration]
            assert model.num_active_queries == num_queries
            assert model.criterion.matcher.stage == stage
            scalars = storage.latest()
            assert scalars["curriculum/num_queries"] == (num_queries, iteration)
            assert scalars["curriculum/matching_stage"] == (MATCHING_STAGES.index(stage), iteration)
        assert not storage.smoothing_hints()["curriculum/num_queries"]
        assert not storage.smoothing_hints()["curriculum/matching_stage"]
        hook.after_train()
    assert model.num_active_queries == tiny_cfg.MODEL.DETR.NUM_QUERIES
    assert model.criterion.matcher.stage == "full"


def test_hook_with_only_matching_leaves_queries_alone(tiny_cfg):
    tiny_cfg.CURRICULUM.MATCHING.ENABLED = True
    model = build_model(tiny_cfg)
    hook = CurriculumHook.from_config(tiny_cfg, model)
    with EventStorage() as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        hook.before_step()
        assert "curriculum/num_queries" not in storage.latest()
    assert model.num_active_queries == tiny_cfg.MODEL.DETR.NUM_QUERIES
    assert model.criterion.matcher.stage == "l1"


def test_hook_from_config_disabled_and_invalid(tiny_cfg):
    model = build_model(tiny_cfg)
    assert CurriculumHook.from_config(tiny_cfg, model) is None
    with pytest.raises(ValueError, match="query schedule"):
        CurriculumHook(model)
    tiny_cfg.CURRICULUM.QUERIES.ENABLED = True
    tiny_cfg.CURRICULUM.QUERIES.START_QUERIES = tiny_cfg.MODEL.DETR.NUM_QUERIES + 1
    with pytest.raises(ValueError, match="CURRICULUM.QUERIES.START_QUERIES"):
        CurriculumHook.from_config(tiny_cfg, model)
    tiny_cfg.CURRICULUM.QUERIES.ENABLED = False
    tiny_cfg.CURRICULUM.MATCHING.ENABLED = True
    tiny_cfg.CURRICULUM.MATCHING.STEPS = [500, 200]
    with pytest.raises(ValueError, match="CURRICULUM.MATCHING.STEPS"):
        CurriculumHook.from_config(tiny_cfg, model)
