"""Tests of the DETR meta-architecture: losses, inference output, post-processing to the original
image frame (also inside padded batches), target normalisation, CE vs focal label mapping and
the pixel-statistics check."""
import math

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import Boxes

from dinodet2.modeling.meta_arch import DETR

from conftest import make_instances as _instances, make_train_batch as _train_batch


def test_registered():
    assert META_ARCH_REGISTRY.get("DETR") is DETR


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_training_returns_only_finite_losses_and_backward_works(tiny_cfg, class_loss):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = class_loss
    model = build_model(tiny_cfg)
    assert isinstance(model, DETR)
    model.train()
    losses = model(_train_batch())
    assert isinstance(losses, dict) and losses
    assert all(k.startswith("loss_") for k in losses), list(losses)
    assert "class_error" not in losses
    # Deep supervision: final layer + (DEC_LAYERS - 1) auxiliary layers, 3 losses each.
    assert len(losses) == 3 * tiny_cfg.MODEL.DETR.DEC_LAYERS
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    total = sum(losses.values())
    assert torch.isclose(total, torch.stack(list(losses.values())).sum())
    total.backward()
    named = dict(model.named_parameters())
    assert named["class_embed.weight"].grad is not None
    assert named["transformer.queries.query_pos"].grad is not None
    lora_b = [p for n, p in named.items() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_training_with_an_image_without_objects(tiny_cfg, class_loss):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = class_loss
    model = build_model(tiny_cfg).train()
    batch = _train_batch()
    batch[1]["instances"] = _instances(56, 56, torch.zeros(0, 4).tolist(), [])
    batch[1]["instances"].gt_boxes = Boxes(torch.zeros(0, 4))
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_training_without_deep_supervision(tiny_cfg):
    tiny_cfg.MODEL.DETR.DEEP_SUPERVISION = False
    model = build_model(tiny_cfg).train()
    losses = model(_train_batch())
    assert len(losses) == 3 and all(k.startswith("loss_") for k in losses)


def test_training_without_instances_raises(tiny_cfg):
    model = build_model(tiny_cfg).train()
    with pytest.raises(ValueError, match="instances"):
        model([{"image": torch.rand(3, 56, 56) * 255}])


def test_training_with_sfp_backbone(tiny_cfg):
    tiny_cfg.MODEL.BACKBONE.NAME = "build_dinov2_sfp_backbone"
    model = build_model(tiny_cfg).train()
    assert model.in_features == ["p7", "p14", "p28"]
    assert model.level_embed is not None and tuple(model.level_embed.shape) == (3, 32)
    losses = model(_train_batch())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.level_embed.grad is not None


def test_inference_output_format(tiny_cfg):
    tiny_cfg.TEST.DETECTIONS_PER_IMAGE = 5
    model = build_model(tiny_cfg).eval()
    batch = [{"image": torch.rand(3, 70, 98) * 255, "height": 140, "width": 196},
             {"image": torch.rand(3, 56, 42) * 255}]
    with torch.no_grad():
        out = model(batch)
    assert isinstance(out, list) and len(out) == 2
    for result, size in zip(out, [(140, 196), (56, 42)]):
        assert set(result) == {"instances"}
        inst = result["instances"]
        assert inst.image_size == size
        assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
        assert 0 < len(inst) <= 5
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < tiny_cfg.MODEL.DETR.NUM_CLASSES)).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= size[1]).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= size[0]).all()


# ---------------------------------------------------------------------------------------------
# Post-processing exactness with hand-made transformer outputs
# ---------------------------------------------------------------------------------------------
def _hand_made_outputs(batch, num_logits):
    """Two queries per image: query 0 scores higher than query 1."""
    logits = torch.full((batch, 2, num_logits), -10.0)
    logits[:, 0, 1] = 10.0  # query 0 -> class 1 (confident)
    logits[:, 1, 2] = 5.0  # query 1 -> class 2
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.125, 0.25]]).expand(batch, 2, 4).clone()
    return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_postprocess_to_original_size(tiny_cfg, monkeypatch, class_loss):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = class_loss
    model = build_model(tiny_cfg).eval()
    num_logits = 3 + (class_loss == "ce")
    monkeypatch.setattr(model, "forward_transformer", lambda images, mask: _hand_made_outputs(1, num_logits))
    # Image resized from 300x200 (H x W) to 150x100.
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 150, 100) * 255, "height": 300, "width": 200}])
    inst = out[0]["instances"]
    assert inst.image_size == (300, 200)
    assert inst.pred_classes[:2].tolist() == [1, 2]
    expected = torch.tensor([[50.0, 75.0, 150.0, 225.0], [37.5, 187.5, 62.5, 262.5]])
    assert torch.equal(inst.pred_boxes.tensor[:2], expected)


def test_postprocess_padded_batch_uses_each_images_own_size(tiny_cfg, monkeypatch):
    model = build_model(tiny_cfg).eval()
    seen = {}

    def fake(images, mask):
        seen["sizes"] = list(images.image_sizes)
        seen["padded"] = tuple(images.tensor.shape[-2:])
        seen["mask"] = mask
        return _hand_made_outputs(2, 4)

    monkeypatch.setattr(model, "forward_transformer", fake)
    batch = [
        {"image": torch.rand(3, 150, 100) * 255, "height": 300, "width": 200},  # x2
        {"image": torch.rand(3, 84, 126) * 255, "height": 42, "width": 63},  # x0.5
    ]
    with torch.no_grad():
        out = model(batch)
    assert seen["sizes"] == [(150, 100), (84, 126)]
    assert seen["padded"] == (154, 126)
    # Padding mask: True exactly outside each image.
    mask = seen["mask"]
    assert not mask[0, :150, :100].any() and mask[0, 150:].all() and mask[0, :, 100:].all()
    assert not mask[1, :84, :126].any() and mask[1, 84:].all()

    first, second = out[0]["instances"], out[1]["instances"]
    assert first.image_size == (300, 200) and second.image_size == (42, 63)
    assert torch.equal(first.pred_boxes.tensor[0], torch.tensor([50.0, 75.0, 150.0, 225.0]))
    # Second image: (0.5, 0.5, 0.5, 0.5) of 84x126 -> (31.5, 21, 94.5, 63), then x0.5.
    assert torch.equal(second.pred_boxes.tensor[0], torch.tensor([15.75, 10.5, 47.25, 31.5]))
    assert torch.equal(second.pred_boxes.tensor[1], torch.tensor([0.25 * 126 - 0.0625 * 126, 0.75 * 84 - 0.125 * 84,
                                                                  0.25 * 126 + 0.0625 * 126, 0.75 * 84 + 0.125 * 84]) * 0.5)


def test_inference_without_original_size_stays_in_input_frame(tiny_cfg, monkeypatch):
    model = build_model(tiny_cfg).eval()
    monkeypatch.setattr(model, "forward_transformer", lambda images, mask: _hand_made_outputs(1, 4))
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 150, 100) * 255}])
    inst = out[0]["instances"]
    assert inst.image_size == (150, 100)
    assert torch.equal(inst.pred_boxes.tensor[0], torch.tensor([25.0, 37.5, 75.0, 112.5]))


# ---------------------------------------------------------------------------------------------
# Target normalisation
# ---------------------------------------------------------------------------------------------
def test_prepare_targets_normalise_by_own_unpadded_size(tiny_cfg):
    model = build_model(tiny_cfg)
    batch = [
        {"image": torch.rand(3, 140, 112) * 255, "instances": _instances(140, 112, [[0, 0, 56, 70]], [0])},
        {"image": torch.rand(3, 70, 56) * 255, "instances": _instances(70, 56, [[14, 7, 42, 35]], [2])},
    ]
    images, mask = model.preprocess_image(batch)
    assert tuple(images.tensor.shape[-2:]) == (140, 112)
    assert mask[1, 70:].all() and mask[1, :, 56:].all() and not mask[1, :70, :56].any()
    targets = model.prepare_targets(batch, images)
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    # cx = 28/56, cy = 21/70, w = 28/56, h = 28/70 -- NOT divided by the padded 112 x 140.
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[0.5, 0.3, 0.5, 0.4]]))
    assert targets[1]["labels"].tolist() == [2]


def test_pixel_normalisation(tiny_cfg):
    model = build_model(tiny_cfg)
    mean = torch.tensor(tiny_cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    image = mean.expand(3, 28, 28).clone()
    images, _ = model.preprocess_image([{"image": image}])
    assert images.tensor.abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# CE vs focal label mapping in `inference`
# ---------------------------------------------------------------------------------------------
def test_focal_inference_topk_over_queries_and_classes(tiny_cfg):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = "focal"
    tiny_cfg.TEST.DETECTIONS_PER_IMAGE = 3
    model = build_model(tiny_cfg).eval()
    num_classes = tiny_cfg.MODEL.DETR.NUM_CLASSES
    assert model.class_embed.out_features == num_classes
    logits = torch.full((1, 10, num_classes), -10.0)
    logits[0, 7, 2] = 5.0
    logits[0, 3, 0] = 4.0
    logits[0, 7, 0] = 3.0
    boxes = torch.stack([torch.tensor([0.05 * (q + 1), 0.5, 0.1, 0.2]) for q in range(10)])[None]
    (result,) = model.inference(logits, boxes, [(100, 200)])
    assert len(result) == 3
    assert result.pred_classes.tolist() == [2, 0, 0]
    assert torch.allclose(result.scores, torch.sigmoid(torch.tensor([5.0, 4.0, 3.0])))
    cx = result.pred_boxes.get_centers()[:, 0] / 200
    assert torch.allclose(cx, torch.tensor([0.05 * 8, 0.05 * 4, 0.05 * 8]))


def test_ce_inference_excludes_no_object(tiny_cfg):
    tiny_cfg.TEST.DETECTIONS_PER_IMAGE = 4
    model = build_model(tiny_cfg).eval()
    num_classes = tiny_cfg.MODEL.DETR.NUM_CLASSES
    assert model.class_embed.out_features == num_classes + 1
    logits = torch.zeros(1, 10, num_classes + 1)
    logits[0, :, num_classes] = 8.0  # every query is mostly "no object"
    logits[0, 4, 1] = 12.0  # ... except query 4 -> class 1
    logits[0, 6, 2] = 6.0  # query 6: no-object wins, class 2 best real class
    boxes = torch.stack([torch.tensor([0.05 * (q + 1), 0.5, 0.1, 0.2]) for q in range(10)])[None]
    (result,) = model.inference(logits, boxes, [(100, 200)])
    assert len(result) == 4
    assert (result.pred_classes < num_classes).all()
    assert result.pred_classes[:2].tolist() == [1, 2]
    expected_top = torch.softmax(logits[0, 4], -1)[1]
    assert torch.isclose(result.scores[0], expected_top)
    cx = result.pred_boxes.get_centers()[:2, 0] / 200
    assert torch.allclose(cx, torch.tensor([0.05 * 5, 0.05 * 7]))
    assert (result.scores[:-1] >= result.scores[1:]).all()


def test_detections_per_image_larger_than_candidates(tiny_cfg):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = "focal"
    tiny_cfg.TEST.DETECTIONS_PER_IMAGE = 1000
    model = build_model(tiny_cfg).eval()
    (result,) = model.inference(torch.randn(1, 10, 3), torch.rand(1, 10, 4), [(50, 60)])
    assert len(result) == 30


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------
def test_reversed_pixel_mean_raises(tiny_cfg):
    tiny_cfg.MODEL.PIXEL_MEAN = list(reversed(tiny_cfg.MODEL.PIXEL_MEAN))
    with pytest.raises(ValueError, match="PIXEL_MEAN"):
        build_model(tiny_cfg)


def test_bgr_format_with_rgb_mean_raises(tiny_cfg):
    tiny_cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        build_model(tiny_cfg)


def test_bgr_format_with_bgr_mean_builds(tiny_cfg):
    tiny_cfg.INPUT.FORMAT = "BGR"
    tiny_cfg.MODEL.PIXEL_MEAN = list(reversed(tiny_cfg.MODEL.PIXEL_MEAN))
    tiny_cfg.MODEL.PIXEL_STD = list(reversed(tiny_cfg.MODEL.PIXEL_STD))
    build_model(tiny_cfg)


def test_bad_class_loss_raises(tiny_cfg):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = "bce"
    with pytest.raises(ValueError):
        build_model(tiny_cfg)


def test_bad_in_features_raises(tiny_cfg):
    tiny_cfg.MODEL.DETR.IN_FEATURES = ["p14"]
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_model(tiny_cfg)


def test_focal_class_bias_prior(tiny_cfg):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = "focal"
    model = build_model(tiny_cfg)
    assert torch.allclose(model.class_embed.bias, torch.full((3,), -math.log(99.0)))
