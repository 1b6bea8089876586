"""Knowledge distillation (MODEL.DISTILL): a frozen teacher built from its own config and weights, never
in the student's state dict and never trained; feature-level distillation against a hand computation
(foreground weighting, padding, levels); prediction-level Hungarian matching on the teacher's outputs
(optimal pairs, losses that vanish when the student predicts what the teacher does); the warm-up ramp;
clear errors; and a training loop in which the distillation losses fall."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from dinodet2.modeling.classification import build_classification
from dinodet2.modeling.training_signals import (
    FeatureDistillation,
    PredictionDistillation,
    SignalInputs,
    TeacherOutputs,
)
from dinodet2.modeling.transformer import MultiLevelTokens

from conftest import make_improved_tiny_cfg, make_tiny_cfg, make_train_batch


def _cfg(opts):
    return make_improved_tiny_cfg({**opts})


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A larger teacher (64-d transformer, 3 decoder layers, 3-block ViT): config file and weights."""
    folder = tmp_path_factory.mktemp("teacher")
    cfg = _cfg({"MODEL.DETR.HIDDEN_DIM": 64, "MODEL.DETR.DEC_LAYERS": 3, "MODEL.DINOV2.NUM_LAYERS": 3,
                "MODEL.SFP.OUT_CHANNELS": 64})
    (folder / "teacher.yaml").write_text(cfg.dump())
    torch.manual_seed(5)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, folder / "teacher.pth")
    return str(folder / "teacher.yaml"), str(folder / "teacher.pth"), model.state_dict()


def _student(teacher_files, **opts):
    config, weights, _ = teacher_files
    return build_model(_cfg({"MODEL.DISTILL.ENABLED": True, "MODEL.DISTILL.TEACHER_CONFIG": config,
                             "MODEL.DISTILL.TEACHER_WEIGHTS": weights, **opts})).train()


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------
def test_the_teacher_is_loaded_frozen_and_never_in_the_students_state_dict(teacher_files):
    student = _student(teacher_files)
    plain = build_model(_cfg({}))
    extra = set(student.state_dict()) - set(plain.state_dict())
    assert extra == {f"training_signals.distillation.feature.projectors.{i}.{p}" for i in range(3)
                     for p in ("weight", "bias")}
    assert set(student.inference_state_dict()) == set(plain.state_dict())
    losses = student(make_train_batch())
    assert {"loss_distill_feature", "loss_distill_class", "loss_distill_bbox", "loss_distill_giou"} <= set(losses)
    teacher = student.training_signals["distillation"].teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    saved = teacher_files[2]
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())  # the trained weights

    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    projectors = student.training_signals["distillation"].feature.projectors
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in projectors)


def test_the_teacher_is_built_at_the_first_step_so_evaluation_does_not_need_its_weights(teacher_files, tmp_path):
    config, _, _ = teacher_files
    student = build_model(_cfg({"MODEL.DISTILL.ENABLED": True, "MODEL.DISTILL.TEACHER_CONFIG": config,
                                "MODEL.DISTILL.TEACHER_WEIGHTS": str(tmp_path / "missing.pth")}))
    student.eval()
    with torch.no_grad():
        student([{"image": x["image"]} for x in make_train_batch()])  # inference: no teacher
    student.train()
    with pytest.raises(Exception, match="missing.pth"):
        student(make_train_batch())


@pytest.mark.parametrize("opts,match", [
    ({"MODEL.DISTILL.TEACHER_CONFIG": ""}, "TEACHER_CONFIG"),
    ({"MODEL.DISTILL.TEACHER_CONFIG": "/nonexistent/teacher.yaml"}, "TEACHER_CONFIG"),
    ({"MODEL.DETR.NUM_CLASSES": 7}, "classes"),
    ({"MODEL.DISTILL.FEATURE_WEIGHT": 0.0, "MODEL.DISTILL.PREDICTION.ENABLED": False}, "neither"),
    ({"MODEL.DISTILL.FEATURE_LOSS": "l1"}, "FEATURE_LOSS"),
    ({"MODEL.DISTILL.PREDICTION.TEMPERATURE": 0.0}, "TEMPERATURE"),
])
def test_bad_settings_are_refused_with_the_key_named(teacher_files, opts, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _student(teacher_files, **opts)


def test_a_teacher_with_other_level_strides_is_refused_at_the_first_step(teacher_files):
    student = _student(teacher_files, **{"MODEL.SFP.SCALE_FACTORS": [1.0, 0.5]})
    with pytest.raises(ValueError, match="strides"):
        student(make_train_batch())
    # prediction distillation alone does not pair levels
    student = _student(teacher_files, **{"MODEL.SFP.SCALE_FACTORS": [1.0, 0.5], "MODEL.DISTILL.FEATURE_WEIGHT": 0.0})
    assert "loss_distill_class" in student(make_train_batch())


def test_every_distillation_loss_is_zero_when_the_student_is_the_teacher(tmp_path):
    """The seed's softmax head (KL is 0 for equal distributions), dropout 0, the teacher's weights in the
    student and identity projectors: the student's training forward predicts what the teacher does."""
    cfg = make_tiny_cfg()
    cfg.MODEL.DETR.DROPOUT = 0.0
    (tmp_path / "teacher.yaml").write_text(cfg.dump())
    torch.manual_seed(7)
    teacher = build_model(cfg)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg.merge_from_list(["MODEL.DISTILL.ENABLED", True, "MODEL.DISTILL.TEACHER_CONFIG", str(tmp_path / "teacher.yaml"),
                         "MODEL.DISTILL.TEACHER_WEIGHTS", str(tmp_path / "teacher.pth"),
                         "MODEL.DISTILL.PREDICTION.TEMPERATURE", 2.0])
    student = build_model(cfg).train()
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():
        for projector in student.training_signals["distillation"].feature.projectors:
            projector.weight.copy_(torch.eye(projector.weight.shape[0]))
            projector.bias.zero_()
    losses = student(make_train_batch())
    distill = {k: v.item() for k, v in losses.items() if "distill" in k}
    assert set(distill) == {"loss_distill_feature", "loss_distill_class", "loss_distill_bbox", "loss_distill_giou"}
    assert all(abs(v) < 1e-5 for v in distill.values()), distill
    assert losses["loss_class"] > 0  # the student's own loss is not zero: the test is not vacuous


# ---------------------------------------------------------------------------------------------
# Feature level
# ---------------------------------------------------------------------------------------------
def _tokens(dim, sizes, batch=1, padded_rows=0):
    masks = []
    for h, w in sizes:
        m = torch.zeros(batch, h, w, dtype=torch.bool)
        if padded_rows:
            m[:, h - padded_rows:] = True
        masks.append(m)
    srcs = [torch.randn(batch, dim, h, w) for h, w in sizes]
    return MultiLevelTokens.from_levels(srcs, [torch.zeros_like(s) for s in srcs], masks)


def test_feature_loss_matches_a_hand_computation_with_foreground_weights_and_padding():
    torch.manual_seed(0)
    student = _tokens(4, [(4, 4)], padded_rows=1)  # the last row is padding
    teacher = _tokens(6, [(4, 4)])
    memory_s, memory_t = torch.randn(1, 16, 4), torch.randn(1, 16, 6)
    box = torch.tensor([[2.0 / 4, 2.0 / 3, 2.0 / 4, 2.0 / 3]])  # in the 4 x 3 valid grid: token cells (1..2, 1..2)
    inputs = SignalInputs(ImageList(torch.zeros(1, 3, 56, 56), [(42, 56)]), student, memory_s, {},
                          [{"labels": torch.tensor([0]), "boxes": box}], [])
    distill = FeatureDistillation(4, 6, 1, source="encoder", loss="mse", foreground_weight=3.0)
    out = distill(inputs, TeacherOutputs({}, teacher, memory_t))["loss_distill_feature"]

    per_token = (distill.projectors[0](memory_s) - memory_t).pow(2).mean(-1)[0].view(4, 4)
    weights = torch.ones(4, 4)
    weights[3] = 0  # padding
    weights[1:3, 1:3] = 3.0  # token centres inside the box
    assert torch.allclose(out, (per_token * weights).sum() / weights.sum(), atol=1e-6)


def test_feature_levels_compare_on_the_common_grid_when_padding_differs():
    torch.manual_seed(0)
    student, teacher = _tokens(4, [(4, 6), (2, 3)]), _tokens(4, [(4, 4), (2, 2)])
    ms, mt = torch.randn(1, 30, 4), torch.randn(1, 20, 4)
    inputs = SignalInputs(ImageList(torch.zeros(1, 3, 56, 84), [(56, 84)]), student, ms, {},
                          [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}], [])
    distill = FeatureDistillation(4, 4, 2, loss="cosine")
    out = distill(inputs, TeacherOutputs({}, teacher, mt))["loss_distill_feature"]
    s0 = distill.projectors[0](ms[0, :24].view(4, 6, 4)[:, :4].reshape(16, 4))
    s1 = distill.projectors[1](ms[0, 24:].view(2, 3, 4)[:, :2].reshape(4, 4))
    t0, t1 = mt[0, :16], mt[0, 16:]
    cos = torch.nn.functional.cosine_similarity
    expected = torch.cat([1 - cos(s0, t0, dim=-1), 1 - cos(s1, t1, dim=-1)]).mean()
    assert torch.allclose(out, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Prediction level
# ---------------------------------------------------------------------------------------------
def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    return torch.cat([centre, torch.rand(n, 2, generator=g) * 0.2 + 0.1], -1)


def test_matching_finds_the_teachers_permutation():
    distill = PredictionDistillation(build_classification("varifocal", 3))
    t_boxes, t_logits = _boxes(5, 0), torch.randn(5, 3) * 3
    perm = torch.tensor([3, 0, 4, 1, 2])  # student query q predicts the teacher's perm[q]
    s_boxes = torch.cat([t_boxes[perm] + 0.01, _boxes(2, 1)])  # + 2 student queries with nothing to learn
    s_logits = torch.cat([t_logits[perm], torch.randn(2, 3)])
    rows, cols = distill.match(s_logits, s_boxes, t_logits, t_boxes)
    pairs = dict(zip(rows.tolist(), cols.tolist()))
    assert pairs == {q: int(perm[q]) for q in range(5)}


def _outputs(logits, boxes):
    return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.mark.parametrize("loss", ["ce", "varifocal"])
def test_prediction_losses_vanish_when_the_student_predicts_what_the_teacher_does(loss):
    cls = build_classification(loss, 3)
    distill = PredictionDistillation(cls, temperature=2.0)
    t_logits = torch.randn(2, 6, cls.num_logits) * 3
    t_boxes = torch.stack([_boxes(6, 0), _boxes(6, 1)])
    perm = torch.randperm(6)
    s_logits, s_boxes = t_logits[:, perm].clone(), t_boxes[:, perm].clone()
    inputs = SignalInputs(None, None, None, _outputs(s_logits, s_boxes), [], [])
    out = distill(inputs, TeacherOutputs(_outputs(t_logits, t_boxes), None, None))
    assert out["loss_distill_bbox"].abs() < 1e-6 and out["loss_distill_giou"].abs() < 1e-5
    if loss == "ce":
        assert out["loss_distill_class"].abs() < 1e-5  # KL(p || p) = 0
    else:  # BCE to soft targets is minimal (its gradient vanishes) at the teacher's logits
        s = s_logits.clone().requires_grad_(True)
        distill(SignalInputs(None, None, None, _outputs(s, s_boxes), [], []),
                TeacherOutputs(_outputs(t_logits, t_boxes), None, None))["loss_distill_class"].backward()
        assert s.grad.abs().max() < 1e-6


def test_prediction_pairs_weigh_the_teachers_score_and_top_k_keeps_the_best():
    cls = build_classification("focal", 2)
    t_logits = torch.tensor([[[4.0, -9.0], [-9.0, -9.0], [-1.0, 0.5]]])  # scores ~0.98, ~0, ~0.62
    t_boxes = _boxes(3, 2)[None]
    s_logits, s_boxes = torch.zeros(1, 4, 2), _boxes(4, 3)[None]
    inputs = SignalInputs(None, None, None, _outputs(s_logits, s_boxes), [], [])
    teacher = TeacherOutputs(_outputs(t_logits, t_boxes), None, None)
    full = PredictionDistillation(cls, class_weight=1.0, box_weight=0.0, giou_weight=0.0)(inputs, teacher)
    scores = t_logits[0].sigmoid().max(-1).values
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(3, 2), t_logits[0].sigmoid(),
                                                                reduction="none").sum(-1)
    assert torch.allclose(full["loss_distill_class"], (bce * scores).sum() / scores.sum().clamp(min=1.0), atol=1e-6)
    top = PredictionDistillation(cls, class_weight=1.0, box_weight=0.0, giou_weight=0.0, top_k=2)(inputs, teacher)
    keep = torch.tensor([0, 2])
    assert torch.allclose(top["loss_distill_class"],
                          (bce[keep] * scores[keep]).sum() / scores[keep].sum().clamp(min=1.0), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Schedule and training
# ---------------------------------------------------------------------------------------------
def test_warmup_ramps_the_losses_linearly(teacher_files):
    student = _student(teacher_files, **{"MODEL.DISTILL.WARMUP_ITERS": 4})
    signal = student.training_signals["distillation"]
    batch = make_train_batch()
    torch.manual_seed(0)
    full = {k: v for k, v in student(batch).items() if "distill" in k}  # no trainer: full weight
    for iteration, factor in ((0, 0.25), (2, 0.75), (10, 1.0)):
        with EventStorage(iteration):
            assert signal.ramp() == factor
            torch.manual_seed(0)
            losses = student(batch)
        for k, v in full.items():
            assert torch.allclose(losses[k], factor * v, rtol=1e-5, atol=1e-7)


def test_distillation_losses_fall_when_trained(teacher_files):
    student = _student(teacher_files)
    batch = make_train_batch()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(30):
        opt.zero_grad()
        losses = student(batch)
        # the class term's floor is the entropy of the teacher's probabilities: leave it out
        total = sum(v for k, v in losses.items() if k in ("loss_distill_feature", "loss_distill_bbox",
                                                             "loss_distill_giou"))
        first = total.item() if first is None else first
        (total + losses["loss_distill_class"]).backward()
        opt.step()
    assert total.item() < 0.75 * first
