"""Tests of the simple feature pyramid neck for patch-14 DINOv2 (explicit strides p7/p14/p28)."""
import pytest
import torch
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.structures import ImageList

from dinodet2.modeling.neck import Dinov2SimpleFeaturePyramid, build_dinov2_sfp_backbone


def _sfp_cfg(cfg, scales=(2.0, 1.0, 0.5), in_features=()):
    cfg.MODEL.BACKBONE.NAME = "build_dinov2_sfp_backbone"
    cfg.MODEL.SFP.SCALE_FACTORS = list(scales)
    cfg.MODEL.SFP.IN_FEATURES = list(in_features)
    cfg.MODEL.SFP.OUT_CHANNELS = 16
    return cfg


def test_registered():
    assert BACKBONE_REGISTRY.get("build_dinov2_sfp_backbone") is build_dinov2_sfp_backbone


def test_strides_channels_and_tensor_sizes(tiny_cfg):
    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg)).eval()
    assert isinstance(neck, Dinov2SimpleFeaturePyramid)
    shapes = neck.output_shape()
    assert list(shapes) == ["p7", "p14", "p28"]
    assert {k: v.stride for k, v in shapes.items()} == {"p7": 7, "p14": 14, "p28": 28}
    assert all(v.channels == 16 for v in shapes.values())
    with torch.no_grad():
        out = neck(torch.randn(2, 3, 224, 308))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p7": (2, 16, 32, 44), "p14": (2, 16, 16, 22), "p28": (2, 16, 8, 11),
    }
    for name, t in out.items():
        assert t.shape[-2] * shapes[name].stride == 224
        assert t.shape[-1] * shapes[name].stride == 308
        assert torch.isfinite(t).all()


def test_unsorted_scale_factors_give_stride_order(tiny_cfg):
    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(0.5, 2.0, 1.0))).eval()
    assert list(neck.output_shape()) == ["p7", "p14", "p28"]
    with torch.no_grad():
        out = neck(torch.randn(1, 3, 112, 56))
    assert out["p7"].shape[-2:] == (16, 8)
    assert out["p28"].shape[-2:] == (4, 2)


def test_a_half_stride_level_is_p3_5_and_finer_fractions_are_refused(tiny_cfg):
    # 14 / 4 = 3.5: the stride-3.5 level of a patch-14 ViT, named p3_5, twice the stride-7 grid
    backbone = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(4.0, 2.0, 1.0, 0.5)))
    assert backbone.output_shape()["p3_5"].stride == 3.5
    out = backbone(torch.randn(1, 3, 56, 112))
    assert out["p3_5"].shape[-2:] == (16, 32) and out["p7"].shape[-2:] == (8, 16)
    # odd, non-square patch grid (5 x 7 patches): stride 3.5 exactly, twice the stride-7 grid
    out = backbone(torch.randn(1, 3, 70, 98))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p3_5": (20, 28), "p7": (10, 14), "p14": (5, 7), "p28": (2, 3)}
    # 14 / 8 = 1.75: refused with the stride named
    with pytest.raises(ValueError, match="1.75"):
        build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(8.0, 1.0)))


def test_all_five_scales_with_patch16(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.PATCH_SIZE = 16
    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(4.0, 2.0, 1.0, 0.5, 0.25))).eval()
    assert {k: v.stride for k, v in neck.output_shape().items()} == {
        "p4": 4, "p8": 8, "p16": 16, "p32": 32, "p64": 64}
    assert neck.size_divisibility == 64
    with torch.no_grad():
        out = neck(torch.randn(1, 3, 128, 64))
    for name, t in out.items():
        stride = int(name[1:])
        assert t.shape[-2:] == (128 // stride, 64 // stride)


@pytest.mark.parametrize("scale", [3.0, 0.75, 8.0])
def test_unsupported_scale_raises(tiny_cfg, scale):
    with pytest.raises(ValueError):
        build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(1.0, scale)))


def test_repeated_scale_raises(tiny_cfg):
    with pytest.raises(ValueError, match="repeats"):
        build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(1.0, 1.0)))


def test_bad_downsample_raises(tiny_cfg):
    tiny_cfg.MODEL.SFP.DOWNSAMPLE = "avgpool"
    with pytest.raises(ValueError, match="DOWNSAMPLE"):
        build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg))


@pytest.mark.parametrize("downsample", ["maxpool", "conv"])
@pytest.mark.parametrize("norm", ["LN", "GN", ""])
def test_norm_and_downsample_variants(tiny_cfg, norm, downsample):
    tiny_cfg.MODEL.SFP.NORM = norm
    tiny_cfg.MODEL.SFP.DOWNSAMPLE = downsample
    cfg = _sfp_cfg(tiny_cfg, scales=(2.0, 1.0, 0.5, 0.25))
    cfg.MODEL.SFP.OUT_CHANNELS = 32  # GN uses 32 groups
    neck = build_dinov2_sfp_backbone(cfg).eval()
    assert neck.size_divisibility == 56
    with torch.no_grad():
        out = neck(torch.randn(1, 3, 112, 168))
    assert out["p56"].shape[-2:] == (2, 3)


def test_size_divisibility(tiny_cfg):
    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(2.0, 1.0, 0.5)))
    assert neck.size_divisibility == 28
    assert neck.padding_constraints == {"size_divisibility": 28}
    # Padding with it yields integer-sized levels for an awkward input size.
    images = ImageList.from_tensors([torch.randn(3, 100, 131)], neck.size_divisibility)
    assert tuple(images.tensor.shape[-2:]) == (112, 140)
    with torch.no_grad():
        out = neck.eval()(images.tensor)
    assert out["p28"].shape[-2:] == (4, 5)
    assert out["p7"].shape[-2:] == (16, 20)

    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(2.0, 1.0)))
    assert neck.size_divisibility == 14
    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, scales=(1.0, 0.25)))
    assert neck.size_divisibility == 56


def test_default_in_features_use_last_layer(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 4
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [1, 3]
    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg))
    assert neck.in_features == ["layer3"] * 3


def _perturb_layer_hook(layer_name):
    def hook(module, inputs, outputs):
        outputs = dict(outputs)
        outputs[layer_name] = outputs[layer_name] + 10.0
        return outputs
    return hook


def test_per_level_in_features_read_different_layers(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 4
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [1, 3]
    # Scale factors deliberately not sorted: the per-level feature must follow its factor.
    cfg = _sfp_cfg(tiny_cfg, scales=(0.5, 2.0, 1.0), in_features=("layer1", "layer3", "layer1"))
    neck = build_dinov2_sfp_backbone(cfg).eval()
    assert len(neck.net.vit.encoder.layer) == 4
    # Stride order: p7 (scale 2.0 -> layer3), p14 (1.0 -> layer1), p28 (0.5 -> layer1).
    assert neck.in_features == ["layer3", "layer1", "layer1"]
    x = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        base = neck(x)
        handle = neck.net.register_forward_hook(_perturb_layer_hook("layer1"))
        perturbed_1 = neck(x)
        handle.remove()
        handle = neck.net.register_forward_hook(_perturb_layer_hook("layer3"))
        perturbed_3 = neck(x)
        handle.remove()
    assert torch.equal(base["p7"], perturbed_1["p7"])
    assert not torch.allclose(base["p14"], perturbed_1["p14"])
    assert not torch.allclose(base["p28"], perturbed_1["p28"])
    assert not torch.allclose(base["p7"], perturbed_3["p7"])
    assert torch.equal(base["p14"], perturbed_3["p14"])
    assert torch.equal(base["p28"], perturbed_3["p28"])


def test_per_level_in_features_differ_from_last_layer_pyramid(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 4
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [1, 3]
    torch.manual_seed(0)
    multi = build_dinov2_sfp_backbone(
        _sfp_cfg(tiny_cfg, in_features=("layer1", "layer3", "layer3"))).eval()
    single = Dinov2SimpleFeaturePyramid(multi.net, in_features=["layer3"], scale_factors=[2.0, 1.0, 0.5],
                                        out_channels=16, norm="LN")
    single.stages.load_state_dict(multi.stages.state_dict())
    single.eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a, b = multi(x), single(x)
    assert not torch.allclose(a["p7"], b["p7"])  # layer1 vs layer3
    assert torch.equal(a["p14"], b["p14"]) and torch.equal(a["p28"], b["p28"])


def test_wrong_number_of_in_features_raises(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 4
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [1, 3]
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, in_features=("layer1", "layer3")))


def test_unknown_in_feature_raises(tiny_cfg):
    with pytest.raises(ValueError, match="layer7"):
        build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg, in_features=("layer7",)))


def test_gradients_reach_lora_through_neck(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.FREEZE = True
    neck = build_dinov2_sfp_backbone(_sfp_cfg(tiny_cfg)).train()
    out = neck(torch.randn(1, 3, 56, 56))
    sum(v.square().mean() for v in out.values()).backward()
    lora_b = [p for n, p in neck.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is not None for p in neck.stages.parameters())
