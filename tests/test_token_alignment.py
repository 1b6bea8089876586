"""Token feature alignment (MODEL.TOKEN_ALIGNMENT): where the frozen DINOv2 target comes from (LoRA
adapters switched off, a frozen copy, another saved DINOv2), that it never trains and never enters a
checkpoint or a merged model, the loss against a hand computation (padding excluded, resampling), and
a training step in which the loss trains the projector and the detector's tokens."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from dinodet2.modeling.training_signals import (
    SignalInputs,
    TokenAlignment,
    adapters_disabled,
    find_dinov2_backbone,
)
from dinodet2.modeling.transformer import MultiLevelTokens

from conftest import make_improved_tiny_cfg, make_train_batch


def _cfg(opts):
    return make_improved_tiny_cfg({"MODEL.TOKEN_ALIGNMENT.ENABLED": True, **opts})


def _perturb_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()


def _images(model, batch):
    return model.preprocess_image(batch)[0].tensor


# ---------------------------------------------------------------------------------------------
# The frozen target
# ---------------------------------------------------------------------------------------------
def test_lora_on_frozen_weights_aligns_to_the_vit_with_adapters_off():
    model = build_model(_cfg({"MODEL.DINOV2.FREEZE": True, "MODEL.LORA.ENABLED": True})).train()
    signal = model.training_signals["token_alignment"]
    assert signal.target.source == "adapters_off"
    vit = find_dinov2_backbone(model.backbone)
    x = _images(model, make_train_batch())
    before = signal.target(x)
    _perturb_lora(model)  # the adapted ViT changes; the target (pretrained path) does not
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert torch.equal(signal.target(x), before)
    with torch.no_grad():
        adapted = vit.features(x, (signal.target.block,))[f"layer{signal.target.block}"]
    assert not torch.allclose(adapted, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # nothing (un)frozen
    assert model.training and vit.training  # the target ran in eval mode, the model's modes are back


def test_adapters_disabled_restores_the_adapters():
    model = build_model(_cfg({"MODEL.DINOV2.FREEZE": True, "MODEL.LORA.ENABLED": True})).eval()
    _perturb_lora(model)
    vit = find_dinov2_backbone(model.backbone)
    x = _images(model, make_train_batch())
    with torch.no_grad():
        adapted = vit(x)
        with adapters_disabled(vit.vit):
            plain = vit(x)
        again = vit(x)
    assert torch.equal(adapted["layer1"], again["layer1"]) and not torch.allclose(adapted["layer1"], plain["layer1"])


def test_a_trainable_vit_aligns_to_a_frozen_copy_taken_at_build_time():
    model = build_model(_cfg({"MODEL.DINOV2.FREEZE": False})).train()
    target = model.training_signals["token_alignment"].target
    assert target.source == "frozen_copy"
    x = _images(model, make_train_batch())
    before = target(x)
    with torch.no_grad():
        for p in find_dinov2_backbone(model.backbone).parameters():
            p.add_(0.5)
    assert torch.equal(target(x), before)
    assert not any(p.requires_grad for p in target.vit.parameters())


def test_another_saved_dinov2_is_the_teacher_and_sets_the_projector_width(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                             patch_size=14)).save_pretrained(str(tmp_path))
    model = build_model(_cfg({"MODEL.TOKEN_ALIGNMENT.TEACHER": str(tmp_path),
                              "MODEL.TOKEN_ALIGNMENT.TEACHER_BLOCK": 1})).train()
    signal = model.training_signals["token_alignment"]
    assert signal.target.source == "teacher" and signal.target.dim == 48 and signal.target.block == 1
    assert signal.projector.weight.shape == (48, 32)
    x = _images(model, make_train_batch())
    assert signal.target(x).shape == (2, 48, x.shape[-2] // 14, x.shape[-1] // 14)


def test_the_frozen_model_is_never_in_the_state_dict_and_the_projector_not_in_merged_weights():
    model = build_model(_cfg({"MODEL.DINOV2.FREEZE": False}))
    plain = build_model(_cfg({"MODEL.DINOV2.FREEZE": False, "MODEL.TOKEN_ALIGNMENT.ENABLED": False}))
    keys, plain_keys = set(model.state_dict()), set(plain.state_dict())
    assert keys - plain_keys == {"training_signals.token_alignment.projector.weight",
                                 "training_signals.token_alignment.projector.bias"}
    assert set(model.inference_state_dict()) == plain_keys
    assert sum(p.numel() for p in model.parameters()) == (sum(p.numel() for p in plain.parameters())
                                                          + 32 * 32 + 32)


def test_level_nearest_to_the_patch_size_is_aligned_by_default():
    assert TokenAlignment.nearest_level([7.0, 14.0, 28.0], 14) == 1
    assert TokenAlignment.nearest_level([8.0, 16.0, 32.0], 14) == 1
    assert TokenAlignment.nearest_level([28.0], 14) == 0
    model = build_model(_cfg({}))
    assert model.training_signals["token_alignment"].level == 1


@pytest.mark.parametrize("key,value,match", [
    ("MODEL.TOKEN_ALIGNMENT.SOURCE", "decoder", "SOURCE"),
    ("MODEL.TOKEN_ALIGNMENT.LOSS", "l1", "LOSS"),
    ("MODEL.TOKEN_ALIGNMENT.LEVEL", 5, "LEVEL"),
    ("MODEL.TOKEN_ALIGNMENT.TEACHER_BLOCK", 7, "TEACHER_BLOCK"),
])
def test_bad_settings_are_refused_with_the_key_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(_cfg({key: value}))


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
class _ConstantTarget:
    """A stand-in frozen model: returns a fixed map (the loss test needs no ViT)."""

    def __init__(self, target):
        self.value, self.dim, self.patch_size = target, target.shape[1], 14

    def __call__(self, images):
        return self.value


def _two_level_inputs(student_dim, masks):
    torch.manual_seed(0)
    srcs = [torch.randn(2, student_dim, *m.shape[-2:]) for m in masks]
    tokens = MultiLevelTokens.from_levels(srcs, [torch.zeros_like(s) for s in srcs], masks)
    memory = torch.randn_like(tokens.src)
    images = ImageList(torch.zeros(2, 3, 56, 84), [(56, 84), (42, 56)])
    return SignalInputs(images, tokens, memory, {}, [], []), srcs


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_loss_matches_a_hand_computation_without_padding_tokens(loss):
    masks = [torch.zeros(2, 8, 12, dtype=torch.bool), torch.zeros(2, 4, 6, dtype=torch.bool)]
    masks[1][1, 3:, :] = True  # image 1 is padded in its last row and last two columns
    masks[1][1, :, 4:] = True
    masks[0][1, 6:, :] = True
    masks[0][1, :, 8:] = True
    inputs, srcs = _two_level_inputs(8, masks)
    target = torch.randn(2, 5, 4, 6)
    signal = TokenAlignment(_ConstantTarget(target), student_dim=8, level=1, source="encoder", loss=loss, weight=2.0)
    out = signal(inputs)["loss_token_align"]

    level = inputs.memory[:, 8 * 12:]  # the second level of the encoder output, [2, 24, 8]
    projected = signal.projector(level)  # [2, 24, 5]
    t = target.flatten(2).transpose(1, 2)
    per = 1 - F.cosine_similarity(projected, t, dim=-1) if loss == "cosine" else (projected - t).pow(2).mean(-1)
    valid = ~masks[1].flatten(1)
    assert valid.sum() == 24 + 12
    assert torch.allclose(out, 2.0 * per[valid].mean(), atol=1e-6)


def test_a_student_grid_other_than_the_target_grid_is_resampled_bilinearly():
    masks = [torch.zeros(2, 8, 12, dtype=torch.bool), torch.zeros(2, 4, 6, dtype=torch.bool)]
    inputs, srcs = _two_level_inputs(8, masks)
    target = torch.randn(2, 5, 4, 6)
    signal = TokenAlignment(_ConstantTarget(target), student_dim=8, level=0, source="neck")
    resized = F.interpolate(srcs[0], size=(4, 6), mode="bilinear", align_corners=False)
    projected = signal.projector(resized.flatten(2).transpose(1, 2))
    expected = (1 - F.cosine_similarity(projected, target.flatten(2).transpose(1, 2), dim=-1)).mean()
    assert torch.allclose(signal(inputs)["loss_token_align"], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# In training
# ---------------------------------------------------------------------------------------------
def test_the_alignment_loss_trains_the_projector_and_the_tokens_and_decreases():
    model = build_model(_cfg({"MODEL.DINOV2.FREEZE": True, "MODEL.LORA.ENABLED": True})).train()
    batch = make_train_batch()
    losses = model(batch)
    assert "loss_token_align" in losses and torch.isfinite(losses["loss_token_align"])
    losses["loss_token_align"].backward()
    projector = model.training_signals["token_alignment"].projector
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    encoder_grads = [p.grad for p in model.transformer.encoder.parameters() if p.grad is not None]
    assert encoder_grads and any(g.abs().sum() > 0 for g in encoder_grads)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in lora_grads)

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = model(batch)["loss_token_align"]
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_eval_mode_runs_no_signal_and_the_dense_model_is_unchanged():
    torch.manual_seed(0)
    plain = build_model(_cfg({"MODEL.TOKEN_ALIGNMENT.ENABLED": False})).eval()
    torch.manual_seed(0)
    aligned = build_model(_cfg({})).eval()
    aligned.load_state_dict(plain.state_dict(), strict=False)
    batch = [{"image": x["image"]} for x in make_train_batch()]
    calls = []
    aligned.training_signals["token_alignment"].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a, b = plain(batch), aligned(batch)
    assert not calls
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)

