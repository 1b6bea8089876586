"""Tests of registrations and of every YAML config under configs/ (new files are picked up
automatically): they merge into a fresh config, and the COCO configs build the intended model."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_model

import dinodet2
from dinodet2.config import IMAGENET_PIXEL_MEAN_RGB, IMAGENET_PIXEL_STD_RGB, add_dinodet2_config

from conftest import CONFIGS_DIR

ALL_CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))
COCO_CONFIGS = sorted((CONFIGS_DIR / "COCO-Detection").glob("*.yaml"))


def _ids(paths):
    return [str(p.relative_to(CONFIGS_DIR)) for p in paths]


def _load(path):
    cfg = get_cfg()
    add_dinodet2_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def test_registries():
    assert dinodet2.__version__
    for name in ("build_dinov2_backbone", "build_dinov2_sfp_backbone"):
        assert name in BACKBONE_REGISTRY
    assert "DETR" in META_ARCH_REGISTRY
    registered = DatasetCatalog.list()
    assert "shapes_train" in registered and "shapes_val" in registered


def test_configs_found():
    assert len(ALL_CONFIGS) >= 4
    assert len(COCO_CONFIGS) >= 2


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_ids(ALL_CONFIGS))
def test_every_config_merges(path):
    cfg = _load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "DETR"
    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY
    # Pixel statistics are DINOv2's ImageNet statistics in INPUT.FORMAT's channel order.
    order = 1 if cfg.INPUT.FORMAT == "RGB" else -1
    assert list(cfg.MODEL.PIXEL_MEAN) == pytest.approx(IMAGENET_PIXEL_MEAN_RGB[::order])
    assert list(cfg.MODEL.PIXEL_STD) == pytest.approx(IMAGENET_PIXEL_STD_RGB[::order])
    # Keys that must be set consistently in every shipped config.
    assert cfg.MODEL.DETR.HIDDEN_DIM % cfg.MODEL.DETR.NHEADS == 0
    assert cfg.MODEL.DETR.HIDDEN_DIM % 32 == 0  # GroupNorm(32) in the input projection
    assert cfg.SOLVER.OPTIMIZER.upper() in ("ADAMW", "SGD")
    assert not cfg.SOLVER.AMP.ENABLED or cfg.MODEL.DEVICE.startswith("cuda")


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIGS_DIR / "Base-DINOv2-DETR.yaml"}"\nMODEL:\n  DETR:\n    NUM_QUERYS: 50\n')
    with pytest.raises(KeyError) as info:
        _load(bad)
    assert "MODEL.DETR.NUM_QUERYS" in str(info.value)


def _small_backbone(cfg):
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.DINOV2.RANDOM_INIT = True
    cfg.MODEL.DINOV2.HIDDEN_SIZE = 32
    cfg.MODEL.DINOV2.NUM_LAYERS = 2
    cfg.MODEL.DINOV2.NUM_HEADS = 2
    cfg.MODEL.DINOV2.PRETRAIN_IMAGE_SIZE = 56
    return cfg


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=_ids(COCO_CONFIGS))
def test_coco_config_builds_intended_model(path):
    cfg = _load(path)
    # What the config promises (before shrinking the backbone for the test).
    assert cfg.MODEL.DINOV2.NAME == "facebook/dinov2-base"
    assert not cfg.MODEL.DINOV2.RANDOM_INIT and cfg.MODEL.DINOV2.FREEZE
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",)
    assert tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
    torch.manual_seed(0)
    model = build_model(_small_backbone(cfg))
    assert model.num_classes == 80
    assert model.class_embed.out_features == 81  # CE: 80 classes + no-object
    assert model.num_queries == 100 and model.query_embed.shape[0] == 100
    assert len(model.transformer.decoder_layers) == 6
    assert len(model.transformer.encoder_layers) == 0
    assert model.transformer.d_model == 256
    assert model.transformer.decoder_layers[0].self_attn.num_heads == 8
    assert model.transformer.decoder_layers[0].cross_attn.num_heads == 8
    lora_a = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert lora_a and all(p.shape[0] == 4 for p in lora_a.values())
    assert all((".q_proj." in n) or (".v_proj." in n) for n in lora_a)
    assert any(".q_proj." in n for n in lora_a) and any(".v_proj." in n for n in lora_a)
    # Frozen ViT: only LoRA parameters train in it (the SFP neck's stages do train).
    backbone_trainable = [n for n, p in model.backbone.named_parameters()
                          if p.requires_grad and ".stages." not in f".{n}"]
    assert backbone_trainable and all("lora_" in n for n in backbone_trainable)


def test_sfp_config_strides():
    (path,) = [p for p in COCO_CONFIGS if p.name == "detr_dinov2_base_lora4_sfp.yaml"]
    model = build_model(_small_backbone(_load(path)))
    shapes = model.backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p7": 7, "p14": 14, "p28": 28}
    assert all(v.channels == 256 for v in shapes.values())
    assert model.in_features == ["p7", "p14", "p28"]
    assert model.backbone.size_divisibility == 28


def test_single_scale_config_strides():
    (path,) = [p for p in COCO_CONFIGS if p.name == "detr_dinov2_base_lora4.yaml"]
    model = build_model(_small_backbone(_load(path)))
    shapes = model.backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"layer1": 14}
    assert model.backbone.size_divisibility == 14
    assert model.level_embed is None


def test_demo_config_builds_and_runs_tiny_forward(tiny_cfg):
    model = build_model(tiny_cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 56, 70) * 255}])
    assert len(out[0]["instances"]) <= tiny_cfg.TEST.DETECTIONS_PER_IMAGE
