"""Tests of the DINOv2 (+ LoRA) backbone: shapes, parity with HF transformers, trainable
parameters, the position-embedding cache, register tokens, loading errors and LoRA targets."""
import pytest
import torch
import torch.nn as nn
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.structures import ImageList

from dinodet2.modeling.backbone import (
    LORA_MODULE_FAMILIES,
    Dinov2Backbone,
    build_dinov2_backbone,
    is_lora_parameter,
    load_dinov2_model,
    resolve_lora_target_modules,
)

ALL_FAMILIES = ["query", "key", "value", "attn_out", "fc1", "fc2"]


def _build(cfg):
    return build_dinov2_backbone(cfg).eval()


def _reference_features(hf_model, x, layer, prefix=1):
    """HF hidden state after block `layer`, final LayerNorm, prefix tokens removed, as a map."""
    with torch.no_grad():
        out = hf_model(x, output_hidden_states=True)
    hidden = hf_model.layernorm(out.hidden_states[layer + 1])[:, prefix:]
    b, _, height, width = x.shape
    p = hf_model.config.patch_size
    return hidden.transpose(1, 2).reshape(b, hf_model.config.hidden_size, height // p, width // p)


# ---------------------------------------------------------------------------------------------
# Output shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(98, 140), (14, 14), (518, 70), (56, 56), (70, 42)])
def test_output_shapes_odd_and_non_square(tiny_cfg, height, width):
    backbone = _build(tiny_cfg)
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, height, width))
    assert list(out) == ["layer1"]
    assert out["layer1"].shape == (2, 32, height // 14, width // 14)
    assert torch.isfinite(out["layer1"]).all()


def test_size_divisibility_and_output_shape_spec(tiny_cfg):
    backbone = _build(tiny_cfg)
    assert backbone.size_divisibility == 14
    assert backbone.padding_constraints == {"size_divisibility": 14}
    shapes = backbone.output_shape()
    assert list(shapes) == ["layer1"]
    assert shapes["layer1"].stride == 14 and shapes["layer1"].channels == 32


def test_imagelist_padding_gives_ceil_sized_feature_map(tiny_cfg):
    backbone = _build(tiny_cfg)
    images = ImageList.from_tensors([torch.randn(3, 100, 131)], backbone.size_divisibility)
    assert tuple(images.tensor.shape[-2:]) == (112, 140)
    with torch.no_grad():
        out = backbone(images.tensor)
    assert out["layer1"].shape[-2:] == (8, 10)  # ceil(100/14), ceil(131/14)


def test_input_not_multiple_of_patch_size_raises(tiny_cfg):
    backbone = _build(tiny_cfg)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone(torch.randn(1, 3, 100, 131))


# ---------------------------------------------------------------------------------------------
# OUT_INDICES
# ---------------------------------------------------------------------------------------------
def test_out_indices_first_and_last(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 3
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [0, -1]
    backbone = _build(tiny_cfg)
    assert backbone._out_features == ["layer0", "layer2"]
    assert set(backbone.output_shape()) == {"layer0", "layer2"}
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 42, 56))
    assert set(out) == {"layer0", "layer2"}
    assert not torch.equal(out["layer0"], out["layer2"])


def test_out_indices_drop_unused_blocks(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 3
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [1]
    backbone = _build(tiny_cfg)
    assert len(backbone.vit.encoder.layer) == 2
    assert backbone._out_features == ["layer1"]


@pytest.mark.parametrize("bad", [[2], [-3], [0, 5]])
def test_out_indices_out_of_range_raise(tiny_cfg, bad):
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = bad
    with pytest.raises(ValueError, match="OUT_INDICES"):
        build_dinov2_backbone(tiny_cfg)


# ---------------------------------------------------------------------------------------------
# Parity with HF transformers (weights loaded from a local save_pretrained directory)
# ---------------------------------------------------------------------------------------------
def _local_cfg(cfg, path, families=ALL_FAMILIES):
    cfg.MODEL.DINOV2.NAME = path
    cfg.MODEL.DINOV2.RANDOM_INIT = False
    cfg.MODEL.DINOV2.OUT_INDICES = [0, -1]
    cfg.MODEL.LORA.TARGET_MODULES = list(families)
    return cfg


@pytest.mark.parametrize("height,width", [(56, 56), (42, 84), (98, 70)])
def test_lora_at_init_matches_hf_model(tiny_cfg, saved_dinov2_dir, height, width):
    from transformers import Dinov2Model

    backbone = _build(_local_cfg(tiny_cfg, saved_dinov2_dir))
    # LoRA really was injected into every family.
    lora_modules = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1]
                    for n, _ in backbone.named_parameters() if "lora_A" in n}
    assert lora_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    reference = Dinov2Model.from_pretrained(saved_dinov2_dir).eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        out = backbone(x)
    for layer in (0, 1):
        expected = _reference_features(reference, x, layer)
        assert out[f"layer{layer}"].shape == expected.shape
        assert (out[f"layer{layer}"] - expected).abs().max() < 1e-5


def test_random_lora_b_changes_features(tiny_cfg, saved_dinov2_dir):
    from transformers import Dinov2Model

    backbone = _build(_local_cfg(tiny_cfg, saved_dinov2_dir))
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    reference = Dinov2Model.from_pretrained(saved_dinov2_dir).eval()
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        out = backbone(x)
    assert (out["layer1"] - _reference_features(reference, x, 1)).abs().max() > 1e-3


def test_without_final_layernorm(tiny_cfg, saved_dinov2_dir):
    from transformers import Dinov2Model

    cfg = _local_cfg(tiny_cfg, saved_dinov2_dir)
    cfg.MODEL.DINOV2.APPLY_LAYERNORM = False
    backbone = _build(cfg)
    reference = Dinov2Model.from_pretrained(saved_dinov2_dir).eval()
    x = torch.randn(1, 3, 56, 42)
    with torch.no_grad():
        out = backbone(x)
        hidden = reference(x, output_hidden_states=True).hidden_states[1][:, 1:]
    expected = hidden.transpose(1, 2).reshape(1, 32, 4, 3)
    assert (out["layer0"] - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Trainable parameters
# ---------------------------------------------------------------------------------------------
def _trainable(backbone):
    return {n for n, p in backbone.named_parameters() if p.requires_grad}


def test_freeze_true_only_lora_trainable(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.FREEZE = True
    backbone = _build(tiny_cfg)
    trainable = _trainable(backbone)
    assert trainable, "LoRA parameters must train"
    assert all("lora_" in n for n in trainable)
    all_lora = {n for n, _ in backbone.named_parameters() if "lora_" in n}
    assert trainable == all_lora
    assert all(is_lora_parameter(n) for n in trainable)


def test_freeze_false_all_but_mask_token_trainable(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.FREEZE = False
    backbone = _build(tiny_cfg)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"vit.embeddings.mask_token"}


def test_lora_disabled_and_frozen_nothing_trainable(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.FREEZE = True
    tiny_cfg.MODEL.LORA.ENABLED = False
    backbone = _build(tiny_cfg)
    assert _trainable(backbone) == set()
    assert not any("lora_" in n for n, _ in backbone.named_parameters())


def test_lora_gradients_flow(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.FREEZE = True
    backbone = build_dinov2_backbone(tiny_cfg).train()
    out = backbone(torch.randn(1, 3, 42, 42))
    out["layer1"].square().mean().backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


# ---------------------------------------------------------------------------------------------
# Position-embedding cache
# ---------------------------------------------------------------------------------------------
def test_position_embedding_cache(tiny_cfg, monkeypatch):
    tiny_cfg.MODEL.DINOV2.FREEZE = True
    backbone = _build(tiny_cfg)
    emb = backbone.vit.embeddings
    calls = []
    original = emb.interpolate_pos_encoding

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return original(*args, **kwargs)

    monkeypatch.setattr(emb, "interpolate_pos_encoding", counting)
    x = torch.randn(1, 3, 42, 70)
    out1 = backbone(x)["layer1"]
    assert len(backbone._pos_cache) == 1 and len(calls) == 1
    cached = next(iter(backbone._pos_cache.values()))
    out2 = backbone(x)["layer1"]
    assert len(backbone._pos_cache) == 1 and len(calls) == 1, "same size must reuse the cache"
    assert next(iter(backbone._pos_cache.values())) is cached
    assert backbone.position_embeddings(42, 70, torch.float32, torch.device("cpu")) is cached
    assert torch.equal(out1, out2)

    backbone(torch.randn(1, 3, 56, 28))
    assert len(backbone._pos_cache) == 2 and len(calls) == 2

    # Cached values equal an uncached computation.
    for (height, width, *_), pos in backbone._pos_cache.items():
        probe = torch.empty(1, 1 + (height // 14) * (width // 14), 32)
        assert torch.equal(pos, original(probe, height, width))


def test_position_embedding_cache_not_stale_after_in_place_update(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.FREEZE = True
    backbone = _build(tiny_cfg)
    first = backbone.position_embeddings(42, 70, torch.float32, torch.device("cpu")).clone()
    with torch.no_grad():
        backbone.vit.embeddings.position_embeddings.add_(1.0)
    second = backbone.position_embeddings(42, 70, torch.float32, torch.device("cpu"))
    assert torch.allclose(second, first + 1.0, atol=1e-4)


def test_trainable_position_embeddings_not_cached_and_get_gradients(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.FREEZE = False
    backbone = build_dinov2_backbone(tiny_cfg).train()
    out = backbone(torch.randn(1, 3, 42, 70))["layer1"]
    out.sum().backward()
    assert len(backbone._pos_cache) == 0
    grad = backbone.vit.embeddings.position_embeddings.grad
    assert grad is not None and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Register tokens
# ---------------------------------------------------------------------------------------------
def test_with_registers_matches_hf_model(tiny_cfg):
    from transformers import Dinov2WithRegistersModel

    tiny_cfg.MODEL.DINOV2.NUM_REGISTER_TOKENS = 4
    tiny_cfg.MODEL.DINOV2.PRETRAIN_IMAGE_SIZE = 56
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [0, 1]
    tiny_cfg.MODEL.LORA.ENABLED = False
    backbone = _build(tiny_cfg)
    assert isinstance(backbone.vit, Dinov2WithRegistersModel)
    assert backbone.num_register_tokens == 4
    # Independent reference model with the same weights.
    reference = Dinov2WithRegistersModel(backbone.vit.config).eval()
    reference.load_state_dict(backbone.vit.state_dict())
    x = torch.randn(2, 3, 70, 98)
    with torch.no_grad():
        out = backbone(x)
    for layer in (0, 1):
        assert out[f"layer{layer}"].shape == (2, 32, 5, 7)
        expected = _reference_features(reference, x, layer, prefix=1 + 4)
        assert (out[f"layer{layer}"] - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["facebook/dinov2-base", "/nonexistent/path/to/dinov2"])
def test_unresolvable_name_raises_helpful_oserror(tiny_cfg, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_cfg.MODEL.DINOV2.NAME = name
    tiny_cfg.MODEL.DINOV2.RANDOM_INIT = False
    with pytest.raises(OSError) as info:
        build_dinov2_backbone(tiny_cfg)
    msg = str(info.value)
    assert "MODEL.DINOV2.NAME" in msg and name in msg
    assert "RANDOM_INIT" in msg
    assert "local directory" in msg


def test_loads_from_local_directory_without_network(saved_dinov2_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_dinov2_model(saved_dinov2_dir)
    assert model.config.hidden_size == 32 and len(model.encoder.layer) == 2
    # pretrained weights are used as saved (the sine-cosine init is for random models only)
    from transformers import Dinov2Model

    saved = Dinov2Model.from_pretrained(saved_dinov2_dir).embeddings.position_embeddings
    assert torch.equal(model.embeddings.position_embeddings, saved)


def test_random_init_gets_sincos_position_embeddings():
    model = load_dinov2_model("unused", random_init=True, size_kwargs=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14))
    table = model.embeddings.position_embeddings[0]  # 1 + 4*4 tokens
    assert torch.equal(table[0], torch.zeros(32))
    # token (row 1, col 2) of the 4x4 grid: x=2 -> sin(2*omega_0)=sin(2) in channel 0, y=1 -> sin(1)
    token = table[1 + 1 * 4 + 2]
    assert token[0].item() == pytest.approx(torch.sin(torch.tensor(2.0)).item(), abs=1e-6)
    assert token[16].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)
    assert table[1:].std() > 0.5  # comparable to the patch embeddings, unlike HF's std-0.02 init


# ---------------------------------------------------------------------------------------------
# LoRA target resolution
# ---------------------------------------------------------------------------------------------
def test_unknown_lora_family_raises(tiny_cfg):
    tiny_cfg.MODEL.LORA.TARGET_MODULES = ["query", "qkv"]
    with pytest.raises(ValueError) as info:
        build_dinov2_backbone(tiny_cfg)
    msg = str(info.value)
    assert "qkv" in msg
    for family in LORA_MODULE_FAMILIES:
        assert family in msg


def test_empty_lora_families_raise(tiny_cfg):
    tiny_cfg.MODEL.LORA.TARGET_MODULES = []
    with pytest.raises(ValueError, match="TARGET_MODULES"):
        build_dinov2_backbone(tiny_cfg)


def test_non_positive_lora_rank_raises(tiny_cfg):
    tiny_cfg.MODEL.LORA.RANK = 0
    with pytest.raises(ValueError, match="RANK"):
        build_dinov2_backbone(tiny_cfg)


def test_lora_rank_and_default_targets(tiny_cfg):
    backbone = _build(tiny_cfg)  # TARGET_MODULES ["query", "value"], RANK 4
    a_shapes = {n: tuple(p.shape) for n, p in backbone.named_parameters() if "lora_A" in n}
    assert len(a_shapes) == 2 * 2  # two blocks x (q, v)
    assert all(shape[0] == 4 for shape in a_shapes.values())
    assert all((".q_proj." in n) or (".v_proj." in n) for n in a_shapes)


class _Attn4(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention = nn.Module()
        self.attention.query = nn.Linear(d, d)
        self.attention.key = nn.Linear(d, d)
        self.attention.value = nn.Linear(d, d)
        self.output = nn.Module()
        self.output.dense = nn.Linear(d, d)


class _Layer4(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention = _Attn4(d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, 2 * d)
        self.mlp.fc2 = nn.Linear(2 * d, d)


class _Transformers4Dinov2(nn.Module):
    """Module tree named like transformers 4.x's Dinov2Model."""

    def __init__(self, d=8, depth=2):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer4(d) for _ in range(depth))
        self.layernorm = nn.LayerNorm(d)


def test_resolve_targets_transformers4_naming():
    model = _Transformers4Dinov2()
    names = resolve_lora_target_modules(model, ["query", "value"])
    assert sorted(names) == [
        "encoder.layer.0.attention.attention.query", "encoder.layer.0.attention.attention.value",
        "encoder.layer.1.attention.attention.query", "encoder.layer.1.attention.attention.value",
    ]
    names = resolve_lora_target_modules(model, ["key", "attn_out", "fc1", "fc2"])
    assert sorted(names) == sorted(
        f"encoder.layer.{i}.{suffix}" for i in range(2)
        for suffix in ("attention.attention.key", "attention.output.dense", "mlp.fc1", "mlp.fc2")
    )


def test_resolve_targets_transformers5_naming(tiny_cfg):
    tiny_cfg.MODEL.LORA.ENABLED = False
    vit = _build(tiny_cfg).vit
    names = resolve_lora_target_modules(vit, ALL_FAMILIES)
    assert len(names) == 2 * 6
    assert all(isinstance(vit.get_submodule(n), nn.Linear) for n in names)


def test_resolve_targets_no_match_raises():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="No linear layers"):
        resolve_lora_target_modules(model, ["query"])


def test_registered_in_backbone_registry():
    assert BACKBONE_REGISTRY.get("build_dinov2_backbone") is build_dinov2_backbone
    assert isinstance(Dinov2Backbone, type)


def test_empty_out_indices_raise_clear_error(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = []
    with pytest.raises(ValueError, match="OUT_INDICES"):
        build_dinov2_backbone(tiny_cfg)
