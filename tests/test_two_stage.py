"""Tests of the two-stage transformer: token anchors, proposal selection, losses and shapes."""
import pytest
import torch
from detectron2.modeling import build_model

from dinodet2.modeling.transformer import TwoStageDetrTransformer, box_sine_embedding, inverse_sigmoid, token_anchors

from test_detr import _train_batch


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


def test_inverse_sigmoid_and_box_sine_embedding():
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-6)
    emb = box_sine_embedding(torch.rand(2, 5, 4), 16)
    assert emb.shape == (2, 5, 64)
    assert emb.abs().max() <= 1.0


def test_padding_tokens_are_never_selected():
    torch.manual_seed(0)
    t = TwoStageDetrTransformer(num_queries=6, num_logits=3, d_model=32, nhead=2, num_decoder_layers=2,
                                dim_feedforward=32, dropout=0.0)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, 2:] = True  # only 8 valid tokens
    memory = torch.randn(1, 16, 32)
    with torch.no_grad():  # make padding tokens the most confident ones
        memory[0, mask.flatten(1)[0]] *= 100
    proposals = t.propose(memory, [mask])
    top = proposals["scores"].topk(6, dim=1).indices[0]
    assert not mask.flatten()[top].any()
    # padding tokens are pure background for the encoder loss
    assert (proposals["pred_logits"][0, mask.flatten(1)[0]] <= -1e3).all()


def test_two_stage_model_trains_and_infers(tiny_cfg):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = "focal"
    tiny_cfg.MODEL.DETR.TWO_STAGE = True
    model = build_model(tiny_cfg)
    model.train()
    losses = model(_train_batch())
    for key in ("loss_class_enc", "loss_bbox_enc", "loss_giou_enc", "loss_class", "loss_class_0"):
        assert key in losses and torch.isfinite(losses[key]), key
    sum(losses.values()).backward()
    used = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not used, f"parameters without gradient (would break DDP): {used}"
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 70, 98) * 255, "height": 140, "width": 196}])
    inst = out[0]["instances"]
    assert len(inst) <= tiny_cfg.TEST.DETECTIONS_PER_IMAGE
    assert inst.image_size == (140, 196)


def test_two_stage_without_refinement_keeps_references(tiny_cfg):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = "focal"
    tiny_cfg.MODEL.DETR.TWO_STAGE = True
    tiny_cfg.MODEL.DETR.ITERATIVE_REFINEMENT = False
    model = build_model(tiny_cfg).eval()
    captured = {}
    original = model.transformer.forward

    def spy(*args):
        result = original(*args)
        captured["references"] = result[1]
        return result

    model.transformer.forward = spy
    with torch.no_grad():
        model([{"image": torch.rand(3, 56, 84) * 255}])
    refs = captured["references"]
    assert torch.equal(refs[0], refs[-1])


def test_two_stage_requires_focal(tiny_cfg):
    tiny_cfg.MODEL.DETR.TWO_STAGE = True
    tiny_cfg.MODEL.DETR.CLASS_LOSS = "ce"
    with pytest.raises(ValueError, match="CLASS_LOSS"):
        build_model(tiny_cfg)
