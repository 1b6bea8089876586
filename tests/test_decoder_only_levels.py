"""Decoder-only levels (MODEL.DETR.DECODER_ONLY_LEVELS): a fine stride-3.5 level that the encoder never
updates (its tokens stay keys / values, bit for bit) and that no two-stage proposal comes from, while the
decoder's cross-attention samples it; the encoder's arithmetic then stays that of the other levels; with
the sparse encoder the selection skips it; clear errors."""
import pytest
import torch
from detectron2.modeling import build_model
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_improved_tiny_cfg, make_train_batch

FOUR_LEVELS = {"MODEL.SFP.SCALE_FACTORS": [4.0, 2.0, 1.0, 0.5]}
HIGH_RES_FOR_DECODER = {**FOUR_LEVELS, "MODEL.DETR.DECODER_ONLY_LEVELS": [0]}


def _tokens(model):
    images, mask = model.preprocess_image([{"image": x["image"]} for x in make_train_batch()])
    return model.tokens(images, mask)


def test_the_encoder_leaves_a_decoder_only_level_untouched_and_updates_the_others():
    model = build_model(make_improved_tiny_cfg(HIGH_RES_FOR_DECODER)).eval()
    with torch.no_grad():
        tokens = _tokens(model)
        memory = model.transformer.encoder(tokens)
    first = tokens.spatial_shapes.level_sizes[0]
    n0 = first[0] * first[1]
    assert tokens.spatial_shapes.level_sizes[1][0] * 2 == first[0]  # stride 3.5 next to stride 7
    assert torch.equal(memory[:, :n0], tokens.src[:, :n0])
    assert not torch.allclose(memory[:, n0:], tokens.src[:, n0:])


def test_no_proposal_comes_from_a_decoder_only_level_and_the_decoder_samples_it():
    model = build_model(make_improved_tiny_cfg(HIGH_RES_FOR_DECODER)).eval()
    with torch.no_grad():
        tokens = _tokens(model)
        memory = model.transformer.encoder(tokens)
        proposals = model.transformer.queries.propose(tokens, memory)
    h, w = tokens.spatial_shapes.level_sizes[0]
    assert torch.isinf(proposals["scores"][:, :h * w]).all()
    assert (proposals["pred_logits"][:, :h * w] <= -1e4 + 1).all()  # background for the proposal loss
    top = proposals["scores"].topk(5, dim=1).indices
    assert (top >= h * w).all()
    # the decoder reads level 0: changing its tokens changes the decoder's predictions, not the proposals
    images, mask = model.preprocess_image([{"image": x["image"]} for x in make_train_batch()])
    with torch.no_grad():
        before = model.forward_transformer(images, mask)
        model.input_proj[0][0].weight.add_(torch.randn_like(model.input_proj[0][0].weight))  # level 0's tokens only
        after = model.forward_transformer(images, mask)
    assert torch.equal(before["enc_outputs"]["pred_boxes"][:, h * w:], after["enc_outputs"]["pred_boxes"][:, h * w:])
    assert not torch.allclose(before["pred_logits"], after["pred_logits"])


def _encoder_gflops(opts):
    model = build_model(make_improved_tiny_cfg(opts)).eval()
    with torch.no_grad():
        tokens = _tokens(model)
        counter = FlopCounterMode(display=False)
        with counter:
            model.transformer.encoder(tokens)
    return counter.get_total_flops()


def test_a_decoder_only_fine_level_keeps_the_encoder_cost_of_the_other_levels():
    three = _encoder_gflops({})
    four = _encoder_gflops(FOUR_LEVELS)
    decoder_only = _encoder_gflops(HIGH_RES_FOR_DECODER)
    assert four > 3 * three  # the stride-3.5 level holds 4x the tokens of stride 7
    # its queries are gone; only the value projection of its tokens (keys / values) remains
    assert decoder_only < 0.5 * four


def test_the_sparse_encoder_selects_only_among_encoded_levels():
    model = build_model(make_improved_tiny_cfg({**HIGH_RES_FOR_DECODER, "MODEL.DETR.SPARSE_ENCODER.ENABLED": True,
                                                "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO": 0.5})).train()
    tokens = _tokens(model)
    encoder = model.transformer.encoder
    logits = encoder.sparse.scorer(tokens.src)
    selection = encoder.sparse.select(logits, tokens, eligible=encoder.encoded_tokens(tokens))
    h, w = tokens.spatial_shapes.level_sizes[0]
    assert (selection.index[selection.keep] >= h * w).all()
    losses = model(make_train_batch())
    assert "loss_token_fg" in losses and all(torch.isfinite(v) for v in losses.values())


def test_default_is_every_level_encoded():
    model = build_model(make_improved_tiny_cfg(FOUR_LEVELS))
    assert model.transformer.encoder.decoder_only_levels == ()
    assert model.transformer.queries.excluded_levels == ()


@pytest.mark.parametrize("levels,match", [([4], "levels \\[4\\]"), ([0, 1, 2, 3], "no level")])
def test_bad_levels_are_refused_with_the_key_named(levels, match):
    with pytest.raises(ValueError, match=match):
        build_model(make_improved_tiny_cfg({**FOUR_LEVELS, "MODEL.DETR.DECODER_ONLY_LEVELS": levels}))
