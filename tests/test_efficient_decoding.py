"""Inference-time efficiency of the decoder: adaptive query count, progressive query pruning and
early termination, any-depth decoding, and the per-layer memory projection cache.

Every mechanism at its trivial setting must give the full model's detections exactly; with real
thresholds the tests check the exact bookkeeping (a query that leaves keeps the prediction of the
layer it left after, padded queries never become detections, each layer projects the memory once).
"""
import pytest
import torch
import torch.nn as nn
from detectron2.modeling import build_model

from dinodet2.modeling.transformer import AdaptiveQueryCount, QueryPruning
from dinodet2.modeling.transformer.layers import TransformerDecoderLayer
from dinodet2.modeling.transformer.query_pruning import ActiveQueries

from conftest import make_train_batch


def _improved(cfg, **overrides):
    """The tiny config with the improved (DINO-style) decoder: SFP levels, deformable encoder and
    decoder, two-stage varifocal queries, refinement with look-forward-twice, denoising."""
    cfg.MODEL.BACKBONE.NAME = "build_dinov2_sfp_backbone"
    d = cfg.MODEL.DETR
    d.ENC_LAYERS, d.DEC_LAYERS, d.NUM_QUERIES = 1, 3, 12
    d.DEFORMABLE.ENCODER = d.DEFORMABLE.DECODER = True
    d.TWO_STAGE, d.CLASS_LOSS, d.LOOK_FORWARD_TWICE = True, "varifocal", True
    d.DN.ENABLED, d.DN.NUM_QUERIES = True, 8
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def _images(sizes=((70, 98), (70, 98))):
    torch.manual_seed(3)
    return [{"image": torch.rand(3, h, w) * 255} for h, w in sizes]


def _run(model, images):
    with torch.no_grad():
        return [r["instances"] for r in model(images)]


def _same_detections(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores)
        assert torch.equal(x.pred_classes, y.pred_classes)


def _model(cfg, **overrides):
    torch.manual_seed(0)
    model = build_model(_improved(cfg, **overrides)).eval()
    with torch.no_grad():  # spread the class scores so thresholds split them; make boxes move per layer
        model.class_embed.bias.normal_(0, 2)
        model.transformer.queries.class_head.bias.normal_(0, 2)
        model.transformer.decoder.box_head.layers[-1].weight.normal_(0, 0.1)
    return model


def _twin(model, cfg, **overrides):
    """A model built from ``cfg`` + overrides with ``model``'s weights."""
    other = build_model(_improved(cfg, **overrides)).eval()
    other.load_state_dict(model.state_dict())
    return other


# ---------------------------------------------------------------------------------------------
# trivial settings reproduce the full model exactly
@pytest.mark.parametrize("overrides", [
    {"MODEL.DETR.ADAPTIVE_QUERIES.ENABLED": True, "MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD": 0.0},
    {"MODEL.DETR.QUERY_PRUNING.ENABLED": True, "MODEL.DETR.QUERY_PRUNING.DROP_SCORE": 0.0,
     "MODEL.DETR.QUERY_PRUNING.FREEZE_SCORE": 1.01},
    {"MODEL.DETR.TEST_DEC_LAYERS": 3},
])
def test_trivial_settings_give_the_full_models_detections_exactly(tiny_cfg, saved_dinov2_dir, overrides):
    base = tiny_cfg.clone()
    full = _model(base)
    fast = _twin(full, tiny_cfg, **overrides)
    images = _images(((70, 98), (56, 84)))
    _same_detections(_run(full, images), _run(fast, images))
    assert fast.last_decoding_stats.layers_run == 3


def test_trivial_pruning_is_exact_for_learned_queries_too(tiny_cfg):
    full = build_model(tiny_cfg).eval()
    fast = build_model(tiny_cfg.clone()).eval()
    fast.load_state_dict(full.state_dict())
    fast.pruning = QueryPruning(drop_score=0.0, freeze_score=1.01)
    images = _images()
    _same_detections(_run(full, images), _run(fast, images))


# ---------------------------------------------------------------------------------------------
# adaptive query count
def test_adaptive_count_selects_by_threshold_with_clamps():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.05, 0.0, float("-inf")],
                           [0.2, 0.1, 0.1, 0.1, 0.1, 0.1],
                           [0.9, 0.9, 0.9, 0.9, 0.9, 0.9]])
    top, padding = AdaptiveQueryCount(0.5, min_queries=2, max_queries=4).select(scores, k=5)
    # counts: 2 (two pass), 2 (none pass, min 2), 4 (all pass, max 4) -> batch of 4 queries
    assert top.shape == (3, 4)
    assert padding.tolist() == [[False, False, True, True], [False, False, True, True], [False] * 4]
    assert top[0, :2].tolist() == [0, 1]
    top, padding = AdaptiveQueryCount(0.0).select(scores, k=5)
    assert top.shape == (3, 5) and padding is None  # threshold 0: the fixed top-k


def test_adaptive_count_rejects_bad_settings(tiny_cfg):
    with pytest.raises(ValueError, match="SCORE_THRESHOLD"):
        AdaptiveQueryCount(1.5)
    with pytest.raises(ValueError, match="MAX_QUERIES"):
        AdaptiveQueryCount(0.1, min_queries=5, max_queries=2)
    tiny_cfg.MODEL.DETR.ADAPTIVE_QUERIES.ENABLED = True  # tiny_cfg has learned queries
    with pytest.raises(ValueError, match="TWO_STAGE"):
        build_model(tiny_cfg)


def test_adaptive_count_pads_per_image_and_padded_queries_never_become_detections(tiny_cfg):
    full = _model(tiny_cfg.clone())
    images = _images()
    with torch.no_grad():
        images[1]["image"] = images[1]["image"].flip(-1) * 0.3
        scores = []
        for x in images:  # each image's proposal scores, to pick a threshold between them
            imgs, mask = full.preprocess_image([x])
            tokens = full.tokens(imgs, mask)
            memory = full.transformer.encoder(tokens)
            scores.append(full.transformer.queries.propose(tokens, memory)["scores"][0].topk(12).values)
    threshold = float(scores[0][5] + scores[0][6]) / 2  # image 0 keeps 6 queries
    count1 = int((scores[1] >= threshold).sum().clamp(1, 12))
    assert count1 != 6, "the two images should keep different numbers of queries"
    fast = _twin(full, tiny_cfg, **{"MODEL.DETR.ADAPTIVE_QUERIES.ENABLED": True,
                                    "MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD": threshold,
                                    "MODEL.DETR.TEST_DEC_LAYERS": 0})
    imgs, mask = fast.preprocess_image(images)
    with torch.no_grad():
        out = fast.forward_transformer(imgs, mask)
    kept = max(6, count1)
    assert out["pred_logits"].shape[1] == kept
    assert (~out["query_padding"]).sum(1).tolist() == [6, count1]
    batched = _run(fast, images)
    for i, x in enumerate(images):  # the same detections as the image decoded alone (no padding)
        alone = _run(fast, [x])[0]
        assert len(batched[i]) == min(20, [6, count1][i] * 3)  # queries x classes, DETECTIONS_PER_IMAGE 20
        torch.testing.assert_close(batched[i].pred_boxes.tensor, alone.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(batched[i].scores, alone.scores, rtol=1e-4, atol=1e-5)
    assert fast.last_decoding_stats.initial_queries == pytest.approx(count1)  # the last call: image 1 alone


def test_training_keeps_the_fixed_top_k(tiny_cfg):
    model = _model(tiny_cfg, **{"MODEL.DETR.ADAPTIVE_QUERIES.ENABLED": True,
                                "MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD": 0.99}).train()
    imgs, mask = model.preprocess_image(make_train_batch())
    out = model.forward_transformer(imgs, mask)
    assert out["pred_logits"].shape[1] == 12 and "query_padding" not in out


# ---------------------------------------------------------------------------------------------
# progressive pruning, early termination, any depth
def _dense_layers(model, images):
    """Per-layer logits and boxes of the full decoder ``[L, B, Q, *]``."""
    imgs, mask = model.preprocess_image(images)
    with torch.no_grad():
        out = model.forward_transformer(imgs, mask)
    logits = torch.stack([a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]])
    boxes = torch.stack([a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]])
    return logits, boxes


def _pruned(model, pruning, images):
    model.pruning = pruning
    imgs, mask = model.preprocess_image(images)
    with torch.no_grad():
        out = model.forward_transformer(imgs, mask)
    model.pruning = None
    return out


def test_dropped_queries_keep_the_prediction_of_the_layer_they_left_after(tiny_cfg):
    model = _model(tiny_cfg)
    images = _images()
    logits, boxes = _dense_layers(model, images)
    scores1 = logits[0].sigmoid().amax(-1)  # [B, Q] after layer 1
    threshold = float(scores1.flatten().median())
    out = _pruned(model, QueryPruning(drop_score=threshold, freeze_score=1.01), images)
    dropped = scores1 < threshold
    assert 0 < int(dropped.sum()) < dropped.numel()
    # layer 1 ran on every query: the dropped ones' outputs are exactly the dense layer 1's
    torch.testing.assert_close(out["pred_boxes"][dropped], boxes[0][dropped], rtol=0, atol=0)
    torch.testing.assert_close(out["pred_logits"][dropped], logits[0][dropped], rtol=0, atol=1e-6)
    # the kept ones ran further layers
    assert not torch.equal(out["pred_boxes"][~dropped], boxes[0][~dropped])
    stats = model.last_decoding_stats
    assert stats.layers_run >= 2
    assert stats.queries_per_layer[0] == 12 and stats.queries_per_layer[1] <= 12 - int(dropped.sum(1).min())


def test_queries_that_left_stay_keys_of_the_self_attention(tiny_cfg):
    """With 2 layers and queries dropped after the first, the kept ones run layer 2 with every query's
    layer-1 content as self-attention keys, exactly as in the full decoder: their outputs equal the
    full decoder's (a decoder that forgot the left queries would differ)."""
    model = _model(tiny_cfg, **{"MODEL.DETR.DEC_LAYERS": 2})
    images = _images()
    logits, boxes = _dense_layers(model, images)
    scores1 = logits[0].sigmoid().amax(-1)
    threshold = float(scores1.flatten().median())
    out = _pruned(model, QueryPruning(drop_score=threshold, freeze_score=1.01), images)
    kept = scores1 >= threshold
    assert 0 < int(kept.sum()) < kept.numel() and model.last_decoding_stats.layers_run == 2
    torch.testing.assert_close(out["pred_boxes"][kept], boxes[1][kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pred_logits"][kept], logits[1][kept], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["pred_boxes"][~kept], boxes[0][~kept])


@pytest.mark.parametrize("pruning", [QueryPruning(drop_score=1.0),  # every query dropped after layer 1
                                     QueryPruning(drop_score=0.0, freeze_score=0.0, freeze_box_delta=10.0)])
def test_decoder_stops_when_no_query_is_left_and_equals_the_shallower_model(tiny_cfg, pruning):
    model = _model(tiny_cfg)
    images = _images()
    out = _pruned(model, pruning, images)
    assert model.last_decoding_stats.layers_run == 1
    model.test_decoder_layers = 1
    imgs, mask = model.preprocess_image(images)
    with torch.no_grad():
        depth1 = model.forward_transformer(imgs, mask)
    assert torch.equal(out["pred_boxes"], depth1["pred_boxes"])
    assert torch.equal(out["pred_logits"], depth1["pred_logits"])


def test_freezing_needs_a_settled_box(tiny_cfg):
    model = _model(tiny_cfg)
    images = _images()
    # confident enough for all, but no box stays within 0 movement: nothing freezes
    out = _pruned(model, QueryPruning(drop_score=0.0, freeze_score=0.0, freeze_box_delta=0.0), images)
    assert model.last_decoding_stats.layers_run == 3
    assert model.last_decoding_stats.queries_per_layer == [12, 12, 12]
    logits, boxes = _dense_layers(model, images)
    assert torch.equal(out["pred_boxes"], boxes[-1])


def test_pruning_starts_after_the_configured_layer(tiny_cfg):
    model = _model(tiny_cfg)
    _pruned(model, QueryPruning(drop_score=1.0, start_layer=2), _images())
    assert model.last_decoding_stats.layers_run == 2


def test_any_depth_decoding_equals_the_supervised_intermediate_layer(tiny_cfg):
    model = _model(tiny_cfg)
    images = _images()
    logits, boxes = _dense_layers(model, images)
    for depth in (1, 2):
        model.test_decoder_layers = depth
        imgs, mask = model.preprocess_image(images)
        with torch.no_grad():
            out = model.forward_transformer(imgs, mask)
        assert torch.equal(out["pred_boxes"], boxes[depth - 1])
        assert torch.equal(out["pred_logits"], logits[depth - 1])
        assert model.last_decoding_stats.layers_run == depth
    model.train()  # training always runs (and supervises) every layer
    imgs, mask = model.preprocess_image(make_train_batch())
    assert len(model.forward_transformer(imgs, mask)["aux_outputs"]) == 2


def test_bad_depth_and_pruning_settings_name_their_keys(tiny_cfg):
    tiny_cfg.MODEL.DETR.TEST_DEC_LAYERS = 5
    with pytest.raises(ValueError, match="TEST_DEC_LAYERS"):
        build_model(tiny_cfg)
    with pytest.raises(ValueError, match="DROP_SCORE"):
        QueryPruning(drop_score=-0.1)
    with pytest.raises(ValueError, match="START_LAYER"):
        QueryPruning(start_layer=0)


def test_active_queries_pack_the_remaining_slots_to_the_front():
    content = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1).expand(-1, -1, 3).contiguous()
    active = ActiveQueries(content, torch.tensor([[False, False, False, True], [False] * 4]))
    active.record(content, torch.zeros(2, 4, 4))
    left, (packed,) = active.keep(torch.tensor([[True, False, True, True], [False, False, False, True]]), content)
    assert left
    assert active.index.tolist() == [[0, 2], [3, 0]]
    assert active.valid.tolist() == [[True, True], [True, False]]
    assert packed[..., 0].tolist() == [[0.0, 2.0], [7.0, 4.0]]
    active.record(packed + 100, torch.ones(2, 2, 4))  # only real slots are written
    assert active.final_state[..., 0].tolist() == [[100.0, 1.0, 102.0, 0.0], [4.0, 5.0, 6.0, 107.0]]
    left, _ = active.keep(torch.zeros(2, 2, dtype=torch.bool))
    assert not left


# ---------------------------------------------------------------------------------------------
# the memory side is projected once per layer
def _count_projections(model):
    calls = []
    for layer in model.transformer.decoder.layers:
        original = layer.project_memory

        def counted(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)
        layer.project_memory = counted
    return calls


def test_memory_is_projected_once_per_layer_for_all_query_groups(tiny_cfg):
    model = _model(tiny_cfg).train()
    calls = _count_projections(model)
    model(make_train_batch())  # matching + denoising queries
    assert len(calls) == 3
    model.eval()
    calls.clear()
    _pruned(model, QueryPruning(drop_score=0.5), _images())  # queries leave between layers
    assert len(calls) == model.last_decoding_stats.layers_run


def test_standard_cross_attention_with_projected_memory_equals_multihead_attention():
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(32, 4, 64, dropout=0.0).eval()
    x, memory, pos, query_pos = torch.randn(2, 5, 32), torch.randn(2, 9, 32), torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    with torch.no_grad():
        ours = layer.cross_attention(x, layer.project_memory(memory, pos, mask), query_pos, None, None)
        reference = layer.cross_attn(x + query_pos, memory + pos, memory, key_padding_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.cross_attn, nn.MultiheadAttention)  # parameters (and checkpoints) unchanged
