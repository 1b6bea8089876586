"""Scale-aware prediction heads (MODEL.DETR.SCALE_AWARE): per-level proposal heads route every level's
tokens to that level's head; size-conditioned decoder heads start as the identity (a shared-head model
predicts unchanged) and, once trained, make the prediction depend on the reference box size; the
shared default leaves the state dict as it was; gradients; clear errors."""
import pytest
import torch
from detectron2.modeling import build_model

from dinodet2.modeling.transformer.scale_aware import LevelHeads, SizeConditioning

from conftest import make_improved_tiny_cfg, make_train_batch

PER_LEVEL = {"MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS": "per_level"}
SIZE = {"MODEL.DETR.SCALE_AWARE.DECODER_HEADS": "size_conditioned"}


def test_level_heads_route_every_level_to_its_own_head():
    heads = LevelHeads([torch.nn.Linear(4, 1) for _ in range(3)])
    with torch.no_grad():
        for i, head in enumerate(heads.heads):
            head.weight.zero_()
            head.bias.fill_(float(i))
    out = heads(torch.randn(2, 6 * 4 + 3 * 2 + 1, 4), [(6, 4), (3, 2), (1, 1)])
    assert torch.equal(out[:, :24, 0], torch.zeros(2, 24))
    assert torch.equal(out[:, 24:30, 0], torch.ones(2, 6))
    assert torch.equal(out[:, 30:, 0], torch.full((2, 1), 2.0))
    with pytest.raises(ValueError, match="levels"):
        heads(torch.randn(2, 5, 4), [(5, 1)])


def test_per_level_proposal_heads_score_each_level_with_its_own_head():
    model = build_model(make_improved_tiny_cfg(PER_LEVEL)).eval()
    queries = model.transformer.queries
    assert isinstance(queries.class_head, LevelHeads) and len(queries.class_head.heads) == 3
    with torch.no_grad():
        for i, head in enumerate(queries.class_head.heads):
            head.weight.zero_()
            head.bias.fill_(float(i))
        images, mask = model.preprocess_image([{"image": x["image"]} for x in make_train_batch()])
        tokens = model.tokens(images, mask)
        proposals = queries.propose(tokens, model.transformer.encoder(tokens))
    logits, (_, valid) = proposals["pred_logits"], tokens.anchors
    start = 0
    for level, (h, w) in enumerate(tokens.spatial_shapes.level_sizes):
        part, ok = logits[:, start:start + h * w], valid[:, start:start + h * w]
        assert torch.equal(part[ok], torch.full_like(part[ok], float(level)))
        start += h * w


def test_shared_heads_keep_the_state_dict_and_size_conditioning_starts_as_the_identity():
    torch.manual_seed(0)
    shared = build_model(make_improved_tiny_cfg()).eval()
    conditioned = build_model(make_improved_tiny_cfg(SIZE)).eval()
    new_keys = set(conditioned.state_dict()) - set(shared.state_dict())
    assert new_keys and all(k.startswith("transformer.decoder.size_conditioning.") for k in new_keys)
    assert set(shared.state_dict()) <= set(conditioned.state_dict())
    conditioned.load_state_dict(shared.state_dict(), strict=False)  # a shared-head checkpoint
    batch = [{"image": x["image"]} for x in make_train_batch()]
    with torch.no_grad():
        a, b = shared(batch), conditioned(batch)
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_a_trained_size_conditioning_depends_on_the_reference_box_size():
    film = SizeConditioning(8)
    torch.nn.init.normal_(film.net[-1].weight)
    state = torch.randn(1, 2, 8).expand(2, 2, 8)
    small = torch.tensor([[0.5, 0.5, 0.02, 0.03]] * 2)
    large = torch.tensor([[0.5, 0.5, 0.6, 0.4]] * 2)
    out = film(state, torch.stack([small, large]))
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(film(state, torch.rand(2, 2, 2)), state)  # points have no size


def test_gradients_reach_the_per_level_and_the_conditioning_parameters():
    model = build_model(make_improved_tiny_cfg({**PER_LEVEL, **SIZE})).train()
    with torch.no_grad():  # a non-zero FiLM output layer, so its input layers get gradients too
        torch.nn.init.normal_(model.transformer.decoder.size_conditioning.net[-1].weight, std=0.01)
    losses = model(make_train_batch())
    sum(losses.values()).backward()
    queries, film = model.transformer.queries, model.transformer.decoder.size_conditioning
    for name, p in [*queries.class_head.named_parameters(), *queries.box_head.named_parameters(),
                    *film.named_parameters()]:
        assert p.grad is not None, name
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("opts,match", [
    ({"MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS": "per_scale"}, "PROPOSAL_HEADS"),
    ({"MODEL.DETR.SCALE_AWARE.DECODER_HEADS": "film"}, "DECODER_HEADS"),
    ({**PER_LEVEL, "MODEL.DETR.TWO_STAGE": False, "MODEL.DETR.ANCHOR_QUERIES": True}, "TWO_STAGE"),
    ({**SIZE, "MODEL.DETR.TWO_STAGE": False, "MODEL.DETR.ANCHOR_QUERIES": False,
      "MODEL.DETR.CLASS_LOSS": "ce"}, "reference box"),
])
def test_bad_settings_are_refused_with_the_key_named(opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(make_improved_tiny_cfg(opts))
