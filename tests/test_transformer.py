"""Tests of the DETR transformer: token geometry, query types, reference boxes, refinement,
look-forward-twice, deformable wiring, and a training + inference pass through every combination
of decoder options that a config can select (all trainable parameters must get a gradient, or
DistributedDataParallel would fail)."""
import itertools

import pytest
import torch
import torch.nn as nn
from detectron2.modeling import build_model

from dinodet2.modeling.classification import build_classification
from dinodet2.modeling.transformer import (
    DetrTransformer,
    MultiLevelTokens,
    box_sine_embedding,
    inverse_sigmoid,
    to_level_coordinates,
    token_anchors,
    valid_ratios,
)

from conftest import make_instances as _instances, make_train_batch as _train_batch


def test_token_anchors_normalised_by_each_images_valid_extent():
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 2:] = True  # second image: valid 3 x 2 tokens
    mask[1, 2:, :] = True  # ... and 2 x 2
    anchors, valid = token_anchors([mask, torch.zeros(2, 2, 2, dtype=torch.bool)], base_size=0.05)
    assert anchors.shape == (2, 3 * 4 + 2 * 2, 4) and valid.shape == (2, 16)
    # image 0, token (row 1, col 2): centre ((2 + .5) / 4, (1 + .5) / 3)
    assert anchors[0, 1 * 4 + 2].tolist() == pytest.approx([2.5 / 4, 1.5 / 3, 0.05, 0.05])
    # image 1, token (row 1, col 1): valid extent 2 x 2 -> centre (1.5 / 2, 1.5 / 2)
    assert anchors[1, 1 * 4 + 1].tolist() == pytest.approx([0.75, 0.75, 0.05, 0.05])
    assert valid[1, :12].view(3, 4).tolist() == (~mask[1]).tolist()
    assert anchors[0, 12:, 2].tolist() == pytest.approx([0.1] * 4)  # size doubles per level


def test_valid_ratios_and_level_coordinates():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[0, 3:, :] = True  # valid 3 of 4 rows
    mask[0, :, 6:] = True  # valid 6 of 8 columns
    ratios = valid_ratios([mask, torch.zeros(1, 2, 4, dtype=torch.bool)])
    assert torch.allclose(ratios, torch.tensor([[[0.75, 0.75], [1.0, 1.0]]]))
    # The image's centre is at 3/8 of the padded map on level 0, at 1/2 on level 1.
    points = to_level_coordinates(torch.tensor([[[0.5, 0.5]]]), ratios)
    assert points.shape == (1, 1, 2, 2)
    assert torch.allclose(points[0, 0], torch.tensor([[0.375, 0.375], [0.5, 0.5]]))
    boxes = to_level_coordinates(torch.tensor([[[0.5, 0.5, 0.2, 0.4]]]), ratios)
    assert boxes[0, 0, 0].tolist() == pytest.approx([0.375, 0.375, 0.15, 0.3])


def test_inverse_sigmoid_and_box_sine_embedding():
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-6)
    emb = box_sine_embedding(torch.rand(2, 5, 4), 16)
    assert emb.shape == (2, 5, 64)
    assert emb.abs().max() <= 1.0


# DetrTransformer.from_config keys of the unit tests below (MODEL.DETR.*)
_QUERY_KEYS = {"learned": {}, "anchor": {"ANCHOR_QUERIES": True}, "two_stage": {"TWO_STAGE": True}}


def _transformer(query_type="learned", num_levels=1, **keys):
    """A small DetrTransformer built from MODEL.DETR keys (dotted names with "__", e.g. DEFORMABLE__DECODER)."""
    from conftest import make_tiny_cfg

    torch.manual_seed(0)
    cfg = make_tiny_cfg()
    c = cfg.MODEL.DETR
    c.HIDDEN_DIM, c.NHEADS, c.DEC_LAYERS, c.DIM_FEEDFORWARD, c.DROPOUT, c.NUM_QUERIES = 32, 2, 3, 32, 0.0, 6
    c.CLASS_LOSS, c.NUM_CLASSES = "focal", 3
    for key, value in {**_QUERY_KEYS[query_type], **keys}.items():
        cfg.merge_from_list([f"MODEL.DETR.{key.replace('__', '.')}", value])
    return DetrTransformer.from_config(cfg, build_classification("focal", 3), num_levels)


def _tokens(batch=2, sizes=((4, 5), (2, 3)), d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    level_masks = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in sizes]
    level_masks[0][-1, :, -1] = True  # some padding in the last image
    n = sum(h * w for h, w in sizes)
    src = torch.randn(batch, n, d, generator=g)
    pos = torch.randn(batch, n, d, generator=g)
    mask = torch.cat([m.flatten(1) for m in level_masks], 1)
    shapes = torch.tensor(sizes, dtype=torch.int64)
    return MultiLevelTokens(src, pos, level_masks, mask, shapes, valid_ratios(level_masks))


def test_multilevel_tokens_from_levels_flatten_level_after_level():
    srcs = [torch.randn(2, 8, 4, 5), torch.randn(2, 8, 2, 3)]
    poss = [torch.randn(2, 8, 4, 5), torch.randn(2, 8, 2, 3)]
    masks = [torch.zeros(2, 4, 5, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    tokens = MultiLevelTokens.from_levels(srcs, poss, masks)
    assert tokens.src.shape == (2, 26, 8) and torch.equal(tokens.src[:, 20:], srcs[1].flatten(2).transpose(1, 2))
    assert tokens.mask is None  # no padding: attention may take the fused path
    assert tokens.spatial_shapes.tolist() == [[4, 5], [2, 3]]
    masks[1][0, :, -1] = True
    assert MultiLevelTokens.from_levels(srcs, poss, masks).mask[0, 20:].tolist() == [False, False, True] * 2


def test_padding_tokens_are_never_selected():
    t = _transformer("two_stage")
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, 2:] = True  # only 8 valid tokens
    memory = torch.randn(1, 16, 32)
    with torch.no_grad():  # make padding tokens the most confident ones
        memory[0, mask.flatten(1)[0]] *= 100
    tokens = MultiLevelTokens(memory, memory, [mask], mask.flatten(1), torch.tensor([[4, 4]]), valid_ratios([mask]))
    proposals = t.queries.propose(tokens, memory)
    top = proposals["scores"].topk(6, dim=1).indices[0]
    assert not mask.flatten()[top].any()
    # padding tokens are pure background for the encoder loss
    assert (proposals["pred_logits"][0, mask.flatten(1)[0]] <= -1e3).all()


class ConstantDelta(nn.Module):
    """Box head predicting the same delta for every query (makes refinement arithmetic visible)."""

    def __init__(self, delta):
        super().__init__()
        self.delta = torch.tensor(delta)

    def forward(self, x):
        return self.delta.expand(*x.shape[:-1], 4).to(x.dtype)


@pytest.mark.parametrize("refine", [True, False])
def test_boxes_are_relative_to_the_reference_with_or_without_refinement(refine):
    t = _transformer("anchor", ITERATIVE_REFINEMENT=refine).eval()
    delta = [0.1, -0.2, 0.3, 0.05]
    t.decoder.box_head = ConstantDelta(delta)
    with torch.no_grad():
        boxes = t(_tokens(sizes=((4, 5),))).boxes
        anchors = inverse_sigmoid(t.queries.anchor_boxes.sigmoid())
    for layer in range(3):
        steps = layer + 1 if refine else 1  # refinement accumulates the delta layer after layer
        expected = (anchors + steps * torch.tensor(delta)).sigmoid()
        assert torch.allclose(boxes[layer, 0], expected, atol=1e-4), layer


def test_seed_queries_predict_boxes_without_a_reference():
    t = _transformer("learned").eval()
    with torch.no_grad():
        out = t(_tokens())
        states, boxes, proposals = out.states, out.boxes, out.proposals
        expected = t.decoder.box_head(states).sigmoid()
    assert proposals is None and torch.allclose(boxes, expected)


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_lets_a_layer_loss_train_the_previous_layer(look_forward_twice):
    t = _transformer("two_stage", LOOK_FORWARD_TWICE=look_forward_twice)
    head = nn.Linear(32, 4)
    deltas = []

    class RecordingHead(nn.Module):
        def forward(self, x):
            out = head(x)
            out.retain_grad()
            deltas.append(out)
            return out

    t.decoder.box_head = RecordingHead()
    boxes = t(_tokens()).boxes
    boxes[1].sum().backward()
    # Layer 0's predicted delta reaches layer 1's box only through the undetached previous box.
    has_grad = deltas[0].grad is not None and deltas[0].grad.abs().sum() > 0
    assert has_grad == look_forward_twice


def test_learned_queries_with_deformable_decoder_use_point_references():
    t = _transformer("learned", num_levels=2, DEFORMABLE__DECODER=True, ITERATIVE_REFINEMENT=False).eval()
    t.decoder.box_head = ConstantDelta([0.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        boxes = t(_tokens()).boxes
        points = t.queries.reference_points(t.queries.query_pos).sigmoid()
    # zero delta: centre = reference point, size = sigmoid(0)
    assert torch.allclose(boxes[0, 0, :, :2], points, atol=1e-5)
    assert torch.allclose(boxes[0, 0, :, 2:], torch.full((6, 2), 0.5))


def test_deformable_encoder_output_depends_on_each_level():
    t = _transformer(num_levels=2, ENC_LAYERS=1, DEFORMABLE__ENCODER=True).eval()
    tokens = _tokens()
    with torch.no_grad():
        base = t.encoder(tokens)
        changed = tokens.src.clone()
        changed[:, 20:] += 1.0  # only the second level's tokens
        out = t.encoder(tokens.with_src(changed))
    assert base.shape == tokens.src.shape
    assert not torch.allclose(base[:, :20], out[:, :20])  # level-0 tokens attend to level 1
    refs = to_level_coordinates(token_anchors(tokens.level_masks)[0][..., :2], tokens.ratios)
    assert refs.shape == (2, 26, 2, 2)


def test_invalid_transformer_options():
    with pytest.raises(ValueError, match="LOOK_FORWARD_TWICE"):
        _transformer("anchor", ITERATIVE_REFINEMENT=False, LOOK_FORWARD_TWICE=True)
    with pytest.raises(ValueError, match="DEFORMABLE.NHEADS"):
        _transformer(DEFORMABLE__DECODER=True, DEFORMABLE__NHEADS=5)
    with pytest.raises(ValueError, match="NUM_POINTS"):
        _transformer(DEFORMABLE__DECODER=True, DEFORMABLE__NUM_POINTS=0)
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        _transformer(NUM_QUERIES=0)


# ------------------------------------------------------------------------------------------------
# Every decoder combination a config can select: trains (all parameters get gradients) and infers.
# ------------------------------------------------------------------------------------------------
QUERY_OPTIONS = {
    "learned": {},
    "anchor": {"MODEL.DETR.ANCHOR_QUERIES": True},
    "two_stage": {"MODEL.DETR.TWO_STAGE": True},
    "two_stage_pure": {"MODEL.DETR.TWO_STAGE": True, "MODEL.DETR.MIXED_QUERY_SELECTION": False},
}
ATTENTION_OPTIONS = {
    "standard": {"MODEL.DETR.ENC_LAYERS": 1},
    "deformable": {"MODEL.DETR.ENC_LAYERS": 1, "MODEL.DETR.DEFORMABLE.ENCODER": True,
                   "MODEL.DETR.DEFORMABLE.DECODER": True, "MODEL.DETR.DEFORMABLE.NUM_POINTS": 2},
}
HEAD_OPTIONS = {
    "ce": {"MODEL.DETR.CLASS_LOSS": "ce"},
    "focal_lft": {"MODEL.DETR.CLASS_LOSS": "focal", "MODEL.DETR.LOOK_FORWARD_TWICE": True},
    "varifocal_dn": {"MODEL.DETR.CLASS_LOSS": "varifocal", "MODEL.DETR.DN.ENABLED": True},
    "focal_dn_plain_norefine": {"MODEL.DETR.CLASS_LOSS": "focal", "MODEL.DETR.DN.ENABLED": True,
                                "MODEL.DETR.DN.CONTRASTIVE": False, "MODEL.DETR.ITERATIVE_REFINEMENT": False},
}


def _combinations():
    for (q, qo), (a, ao), (h, ho) in itertools.product(QUERY_OPTIONS.items(), ATTENTION_OPTIONS.items(),
                                                       HEAD_OPTIONS.items()):
        opts = {**qo, **ao, **ho}
        if q.startswith("two_stage") and h == "ce":
            continue  # two-stage needs a sigmoid loss (tested below)
        if q == "learned" and "dn" in h:
            continue  # denoising needs reference boxes (tested below)
        if q == "learned" and a == "standard" and h == "focal_lft":
            opts["MODEL.DETR.LOOK_FORWARD_TWICE"] = False  # no references: nothing to look forward to
        yield pytest.param(opts, id=f"{q}-{a}-{h}")


def _apply(cfg, opts):
    for key, value in opts.items():
        cfg.merge_from_list([key, value])
    return cfg


@pytest.mark.parametrize("opts", list(_combinations()))
def test_every_decoder_combination_trains_and_infers(tiny_cfg, opts):
    cfg = _apply(tiny_cfg, {"MODEL.BACKBONE.NAME": "build_dinov2_sfp_backbone", **opts})
    model = build_model(cfg).train()
    losses = model(_train_batch())
    layers = cfg.MODEL.DETR.DEC_LAYERS
    expected = 3 * layers * (2 if cfg.MODEL.DETR.DN.ENABLED else 1) + (3 if cfg.MODEL.DETR.TWO_STAGE else 0)
    assert len(losses) == expected, sorted(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient (would break DDP): {missing}"

    model.eval()
    with torch.no_grad():  # odd sizes, padded batch
        out = model([{"image": torch.rand(3, 67, 95) * 255, "height": 134, "width": 190},
                     {"image": torch.rand(3, 45, 59) * 255}])
    assert out[0]["instances"].image_size == (134, 190)
    assert out[1]["instances"].image_size == (45, 59)
    for o in out:
        inst = o["instances"]
        assert 0 < len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
        assert torch.isfinite(inst.pred_boxes.tensor).all()


@pytest.mark.parametrize("two_stage", [True, False])
def test_denoising_with_a_batch_without_objects_keeps_every_parameter_used(tiny_cfg, two_stage):
    cfg = _apply(tiny_cfg, {"MODEL.DETR.DN.ENABLED": True, "MODEL.DETR.CLASS_LOSS": "focal",
                            "MODEL.DETR.TWO_STAGE": two_stage, "MODEL.DETR.ANCHOR_QUERIES": True})
    model = build_model(cfg).train()
    batch = [{"image": torch.rand(3, 56, 56) * 255, "instances": _instances(56, 56, [[0, 0, 1, 1]], [0])[:0]}]
    losses = model(batch)
    assert not any("_dn" in k for k in losses)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_config_errors_for_impossible_combinations(tiny_cfg):
    cfg = _apply(tiny_cfg, {"MODEL.DETR.DN.ENABLED": True})
    with pytest.raises(ValueError, match="ANCHOR_QUERIES"):
        build_model(cfg)
    cfg = _apply(tiny_cfg, {"MODEL.DETR.DN.ENABLED": False, "MODEL.DETR.TWO_STAGE": True,
                            "MODEL.DETR.CLASS_LOSS": "ce"})
    with pytest.raises(ValueError, match="CLASS_LOSS"):
        build_model(cfg)


def test_deformable_attention_levels_follow_in_features(tiny_cfg):
    cfg = _apply(tiny_cfg, {"MODEL.BACKBONE.NAME": "build_dinov2_sfp_backbone",
                            "MODEL.SFP.SCALE_FACTORS": [2.0, 1.0, 0.5, 0.25],
                            "MODEL.DETR.DEFORMABLE.DECODER": True, "MODEL.DETR.DEFORMABLE.NUM_POINTS": 3,
                            "MODEL.DETR.DEFORMABLE.NHEADS": 4})
    model = build_model(cfg)
    attn = model.transformer.decoder.layers[0].cross_attn
    assert (attn.num_levels, attn.num_points, attn.num_heads) == (4, 3, 4)


def test_improved_decoder_under_bfloat16_autocast(tiny_cfg):
    """Mixed precision: deformable sampling runs in fp32 inside autocast, losses stay finite."""
    cfg = _apply(tiny_cfg, {"MODEL.BACKBONE.NAME": "build_dinov2_sfp_backbone", "MODEL.DETR.ENC_LAYERS": 1,
                            "MODEL.DETR.DEFORMABLE.ENCODER": True, "MODEL.DETR.DEFORMABLE.DECODER": True,
                            "MODEL.DETR.TWO_STAGE": True, "MODEL.DETR.CLASS_LOSS": "varifocal",
                            "MODEL.DETR.DN.ENABLED": True, "MODEL.DETR.LOOK_FORWARD_TWICE": True})
    model = build_model(cfg).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_train_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([{"image": torch.rand(3, 67, 95) * 255}])
    assert torch.isfinite(out[0]["instances"].pred_boxes.tensor).all()
