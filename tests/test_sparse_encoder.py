"""Tests of the sparse encoder (MODEL.DETR.SPARSE_ENCODER): the selection rule with padded images,
gather / scatter exactness (unselected tokens untouched, every token selected = the dense encoder),
KEEP_RATIO 1 = the dense model's detections, the foreground targets and loss, gradients and a
training step of the improved demo-like config."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from torchvision.ops import sigmoid_focal_loss

from dinodet2.modeling.classification import build_classification
from dinodet2.modeling.criterion import SetCriterion
from dinodet2.modeling.matcher import HungarianMatcher
from dinodet2.modeling.transformer import DetrTransformer, MultiLevelTokens, TokenSelection, valid_ratios
from dinodet2.modeling.transformer.sparse_encoder import (
    keep_counts,
    select_tokens,
    token_cell_sizes,
    token_foreground_targets,
)

from conftest import make_tiny_cfg, make_train_batch

# the improved demo decoder (configs/Demo/detr_shapes_tiny_improved.yaml) on the tiny sizes
IMPROVED = {"MODEL.BACKBONE.NAME": "build_dinov2_sfp_backbone", "MODEL.SFP.SCALE_FACTORS": [2.0, 1.0, 0.5],
            "MODEL.DETR.ENC_LAYERS": 1, "MODEL.DETR.DEFORMABLE.ENCODER": True, "MODEL.DETR.DEFORMABLE.DECODER": True,
            "MODEL.DETR.TWO_STAGE": True, "MODEL.DETR.CLASS_LOSS": "varifocal", "MODEL.DETR.LOOK_FORWARD_TWICE": True,
            "MODEL.DETR.DN.ENABLED": True, "MODEL.DETR.DN.NUM_QUERIES": 12}
SPARSE = {"MODEL.DETR.SPARSE_ENCODER.ENABLED": True, "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO": 0.3}


def _cfg(opts):
    torch.manual_seed(0)
    cfg = make_tiny_cfg()
    for key, value in opts.items():
        cfg.merge_from_list([key, value])
    return cfg


def _transformer(deformable=True, pre_norm=False, **sparse):
    cfg = _cfg({"MODEL.DETR.ENC_LAYERS": 2, "MODEL.DETR.DEFORMABLE.ENCODER": deformable, "MODEL.DETR.DROPOUT": 0.0,
                "MODEL.DETR.PRE_NORM": pre_norm, "MODEL.DETR.CLASS_LOSS": "focal",
                **{f"MODEL.DETR.SPARSE_ENCODER.{k}": v for k, v in sparse.items()}})
    return DetrTransformer.from_config(cfg, build_classification("focal", 3), num_levels=2).eval()


def _tokens(padding=True, sizes=((6, 7), (3, 4)), d=32, seed=0):
    """Three images; with ``padding`` the second and third are smaller than the padded maps."""
    g = torch.Generator().manual_seed(seed)
    level_masks = [torch.zeros(3, h, w, dtype=torch.bool) for h, w in sizes]
    if padding:
        level_masks[0][1, :, 4:] = True  # image 1: 6 x 4 valid tokens on level 0
        level_masks[1][1, :, 2:] = True  # ... 3 x 2 on level 1
        level_masks[0][2, 2:, :] = True  # image 2: 2 x 7 on level 0
        level_masks[1][2, 1:, :] = True  # ... 1 x 4 on level 1
    n = sum(h * w for h, w in sizes)
    src, pos = torch.randn(3, n, d, generator=g), torch.randn(3, n, d, generator=g)
    mask = torch.cat([m.flatten(1) for m in level_masks], 1)
    return MultiLevelTokens(src, pos, level_masks, mask if padding else None, torch.tensor(sizes),
                            valid_ratios(level_masks))


# ------------------------------------------------------------------------------------------------
# selection rule
# ------------------------------------------------------------------------------------------------
def test_keep_counts_is_the_ceiling_of_the_ratio_at_least_one():
    assert keep_counts(torch.tensor([10, 7, 1, 0, 100]), 0.3).tolist() == [3, 3, 1, 0, 30]
    assert keep_counts(torch.tensor([10, 3]), 1.0).tolist() == [10, 3]
    assert keep_counts(torch.tensor([1000]), 0.001).tolist() == [1]


@pytest.mark.parametrize("per_level", [False, True])
def test_selected_count_per_image_with_padded_images(per_level):
    tokens = _tokens()
    valid = tokens.anchors[1]
    scores = torch.randn(valid.shape)
    scores[~valid] = 100.0  # padding scores best: still never chosen
    sizes = [42, 12]
    sel = select_tokens(scores, valid, 0.3, sizes if per_level else None)
    chosen = sel.mask(valid.shape[1])
    assert not (chosen & ~valid).any()
    if per_level:
        for start, size in zip([0, 42], sizes):
            n_valid = valid[:, start:start + size].sum(1)
            expected = [math.ceil(0.3 * n - 1e-9) for n in n_valid.tolist()]
            assert chosen[:, start:start + size].sum(1).tolist() == expected
    else:
        assert sel.counts.tolist() == [math.ceil(0.3 * n - 1e-9) for n in valid.sum(1).tolist()] == [17, 9, 6]
        # they are the best-scoring valid tokens of each image
        for b in range(3):
            kept = scores[b][chosen[b]]
            assert kept.min() >= scores[b][valid[b] & ~chosen[b]].max()
    assert chosen.sum(1).tolist() == sel.counts.tolist()


# ------------------------------------------------------------------------------------------------
# encoder: gather / scatter exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deformable", [True, False], ids=["deformable", "standard"])
@pytest.mark.parametrize("per_level", [False, True])
def test_unselected_tokens_leave_the_encoder_bit_identical(deformable, per_level):
    t = _transformer(deformable, ENABLED=True, KEEP_RATIO=0.3, PER_LEVEL=per_level)
    tokens = _tokens()
    with torch.no_grad():
        out = t.encoder(tokens)
        chosen = t.encoder.sparse.select(t.encoder.sparse.scorer(tokens.src), tokens).mask(tokens.src.shape[1])
    assert out.shape == tokens.src.shape
    assert torch.equal(out[~chosen], tokens.src[~chosen])
    assert (out[chosen] != tokens.src[chosen]).any(-1).all()  # every selected token is updated


@pytest.mark.parametrize("deformable", [True, False], ids=["deformable", "standard"])
@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_norm", "pre_norm"])
def test_sparse_path_with_every_token_selected_equals_the_dense_encoder(deformable, pre_norm):
    t = _transformer(deformable, pre_norm, ENABLED=True, KEEP_RATIO=0.5)
    tokens = _tokens(padding=False)
    n = tokens.src.shape[1]
    order = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(b)) for b in range(3)])
    everything = TokenSelection(order, torch.ones(3, n, dtype=torch.bool))
    with torch.no_grad():
        sparse = t.encoder.encode_selected(tokens, everything)
        t.encoder.sparse.keep_ratio = t.encoder.sparse.test_keep_ratio = 1.0  # the dense path
        dense = t.encoder(tokens)
        if t.encoder.norm is not None:
            sparse = t.encoder.norm(sparse)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_the_encoder_output_depends_on_the_selection():
    t = _transformer(ENABLED=True, KEEP_RATIO=0.3)
    tokens = _tokens()
    with torch.no_grad():
        a = t.encoder(tokens)
        t.encoder.sparse.scorer.layers[-1].bias.fill_(0.0)
        t.encoder.sparse.scorer.layers[0].weight.neg_()  # another ranking
        b = t.encoder(tokens)
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# KEEP_RATIO 1 and ENABLED False: the dense model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [IMPROVED, {"MODEL.DETR.ENC_LAYERS": 1, "MODEL.DETR.PRE_NORM": True}],
                         ids=["improved", "standard_encoder_pre_norm"])
def test_keep_ratio_one_gives_the_dense_models_detections(opts):
    dense = build_model(_cfg(opts)).eval()
    sparse = build_model(_cfg({**opts, **SPARSE, "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO": 1.0})).eval()
    assert not any("sparse" in k for k in dense.state_dict())  # off: today's keys
    result = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("transformer.encoder.sparse.scorer.") for k in result.missing_keys)
    batch = [{"image": torch.rand(3, 67, 95) * 255, "height": 134, "width": 190}, {"image": torch.rand(3, 45, 59) * 255}]
    with torch.no_grad():
        expected, got = dense(batch), sparse(batch)
    for e, g in zip(expected, got):
        e, g = e["instances"], g["instances"]
        assert torch.equal(e.pred_boxes.tensor, g.pred_boxes.tensor)
        assert torch.equal(e.scores, g.scores) and torch.equal(e.pred_classes, g.pred_classes)


# ------------------------------------------------------------------------------------------------
# targets and loss
# ------------------------------------------------------------------------------------------------
def _grid_tokens():
    """Image 0: a 4 x 4 level, no padding; image 1: only its left 2 x 4 columns are valid."""
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[1, :, 2:] = True
    src = torch.zeros(2, 16, 32)
    return MultiLevelTokens(src, src, [mask], mask.flatten(1), torch.tensor([[4, 4]]), valid_ratios([mask]))


def test_token_foreground_targets_on_hand_made_boxes():
    tokens = _grid_tokens()
    anchors, valid = tokens.anchors
    cells = token_cell_sizes(tokens.level_masks)
    assert cells[0, 0].tolist() == [0.25, 0.25] and cells[1, 0].tolist() == [0.5, 0.25]
    boxes = [torch.tensor([[0.5, 0.5, 0.5, 0.5],        # covers the centres 0.375 and 0.625 in x and y
                           [0.1, 0.9, 0.01, 0.01]]),    # smaller than a cell: the cell holding its centre
             torch.tensor([[0.25, 0.5, 0.5, 1.0]])]     # image 1's left valid column (its own frame)
    fg = token_foreground_targets(anchors[..., :2], cells, valid, boxes).view(2, 4, 4)
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[1:3, 1:3] = True
    expected0[3, 0] = True
    assert torch.equal(fg[0], expected0)
    expected1 = torch.zeros(4, 4, dtype=torch.bool)
    expected1[:, 0] = True  # centre x = 0.5 / 2 = 0.25 in the image's own frame; padding never
    assert torch.equal(fg[1], expected1)
    # an image without boxes: every token is background
    assert not token_foreground_targets(anchors[..., :2], cells, valid, [torch.zeros(0, 4)] * 2).any()


def test_token_foreground_loss_is_focal_over_valid_tokens_per_foreground_token():
    tokens = _grid_tokens()
    classification = build_classification("ce", 3)
    criterion = SetCriterion(classification, HungarianMatcher(classification=classification), token_fg_weight=2.0,
                             token_focal=(0.25, 2.0))
    logits = torch.randn(2, 16, requires_grad=True)
    anchors, valid = tokens.anchors
    scores = {"logits": logits, "centres": anchors[..., :2], "cells": token_cell_sizes(tokens.level_masks),
              "valid": valid}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.25, 0.5, 0.5, 1.0]])}]
    loss = criterion.token_foreground_loss(scores, targets)["loss_token_fg"]
    fg = token_foreground_targets(anchors[..., :2], scores["cells"], valid, [t["boxes"] for t in targets])
    assert fg.sum() == 4 + 4
    manual = sigmoid_focal_loss(logits[valid], fg[valid].float(), 0.25, 2.0, reduction="sum") / 8
    torch.testing.assert_close(loss, 2.0 * manual)
    loss.backward()
    assert logits.grad[valid].abs().gt(0).all() and logits.grad[~valid].eq(0).all()


# ------------------------------------------------------------------------------------------------
# training: gradients, loss dict, config errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [
    pytest.param({**IMPROVED, **SPARSE}, id="improved"),
    pytest.param({**IMPROVED, **SPARSE, "MODEL.DETR.SPARSE_ENCODER.PER_LEVEL": True, "MODEL.DETR.PRE_NORM": True},
                 id="improved_per_level_pre_norm"),
    pytest.param({**SPARSE, "MODEL.DETR.ENC_LAYERS": 1}, id="seed_standard_encoder"),
])
def test_a_training_step_trains_the_scorer_and_every_parameter(opts):
    cfg = _cfg(opts)
    model = build_model(cfg).train()
    losses = model(make_train_batch())
    assert "loss_token_fg" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient (would break DDP): {missing}"
    scorer = model.transformer.encoder.sparse.scorer
    assert all(p.grad.abs().sum() > 0 for p in scorer.parameters())
    assert model.transformer.encoder.pop_outputs() == {}  # handed over to the criterion
    before = [p.detach().clone() for p in scorer.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, scorer.parameters()))
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 67, 95) * 255}, {"image": torch.rand(3, 45, 59) * 255}])
    assert all(len(o["instances"]) > 0 for o in out)


def test_sparse_encoder_under_bfloat16_autocast():
    model = build_model(_cfg({**IMPROVED, **SPARSE})).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(make_train_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize("key, value, match", [
    ("MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO", 0.0, "SPARSE_ENCODER.KEEP_RATIO"),
    ("MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO", 1.5, "SPARSE_ENCODER.KEEP_RATIO"),
    ("MODEL.DETR.ENC_LAYERS", 0, "ENC_LAYERS"),
    ("MODEL.DETR.SPARSE_ENCODER.LOSS_WEIGHT", 0.0, "SPARSE_ENCODER.LOSS_WEIGHT"),
])
def test_invalid_sparse_encoder_options_name_the_key(key, value, match):
    cfg = _cfg({**SPARSE, "MODEL.DETR.ENC_LAYERS": 1, key: value})
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_test_keep_ratio_applies_in_eval_mode_only():
    from dinodet2.modeling.transformer.sparse_encoder import SparseTokenSelector

    selector = SparseTokenSelector(32, keep_ratio=1.0, test_keep_ratio=0.25)
    assert selector.train().keeps_every_token and selector.ratio == 1.0
    assert not selector.eval().keeps_every_token and selector.ratio == 0.25
    assert SparseTokenSelector(32, keep_ratio=0.5).eval().ratio == 0.5  # 0: KEEP_RATIO
    with pytest.raises(ValueError, match="TEST_KEEP_RATIO"):
        SparseTokenSelector(32, keep_ratio=0.5, test_keep_ratio=1.5)
