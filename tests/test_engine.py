"""Tests of dinodet2.engine: AdamW parameter groups, full-model gradient clipping, the AMP check
and the LoRA-aware checkpointer."""
import pytest
import torch
import torch.nn as nn
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from detectron2.modeling import build_model

from dinodet2.engine import Dinodet2Checkpointer, build_optimizer, check_amp_available, remap_lora_keys

BASE_LR = 1e-3
WD = 0.05


def _optim_cfg(cfg):
    cfg.MODEL.BACKBONE.NAME = "build_dinov2_sfp_backbone"
    cfg.MODEL.DINOV2.FREEZE = False
    cfg.SOLVER.BASE_LR = BASE_LR
    cfg.SOLVER.WEIGHT_DECAY = WD
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BIAS_LR_FACTOR = 1.0
    cfg.SOLVER.LORA_LR_MULTIPLIER = 3.0
    cfg.SOLVER.BACKBONE_LR_MULTIPLIER = 0.1
    return cfg


def _group_of(model, optimizer):
    """name -> param group (asserting every parameter is in at most one group)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = by_id[id(p)]
            assert name not in out, f"{name} is in two parameter groups"
            out[name] = group
    return out


@pytest.fixture
def optim_setup(tiny_cfg):
    cfg = _optim_cfg(tiny_cfg)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    return cfg, model, optimizer, _group_of(model, optimizer)


def test_optimizer_type(optim_setup):
    _, _, optimizer, _ = optim_setup
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_learning_rates_per_parameter_kind(optim_setup):
    _, model, _, groups = optim_setup
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups) == trainable
    kinds = {"lora": 0, "backbone": 0, "neck": 0, "head": 0}
    for name, group in groups.items():
        if "lora_" in name:
            assert name.startswith("backbone.net.vit.")
            assert group["lr"] == pytest.approx(BASE_LR * 3.0), name
            kinds["lora"] += 1
        elif name.startswith("backbone.stages."):
            assert group["lr"] == pytest.approx(BASE_LR), name
            kinds["neck"] += 1
        elif name.startswith("backbone."):
            assert group["lr"] == pytest.approx(BASE_LR * 0.1), name
            kinds["backbone"] += 1
        else:
            assert group["lr"] == pytest.approx(BASE_LR), name
            kinds["head"] += 1
    assert all(kinds.values()), kinds


def test_frozen_parameters_not_in_any_group(tiny_cfg):
    cfg = _optim_cfg(tiny_cfg)
    cfg.MODEL.DINOV2.FREEZE = True
    model = build_model(cfg)
    groups = _group_of(model, build_optimizer(cfg, model))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.net.vit.embeddings.mask_token" in frozen
    assert "backbone.net.vit.encoder.layer.0.attention.q_proj.base_layer.weight" in frozen
    assert not frozen & set(groups)
    backbone_in_groups = [n for n in groups if n.startswith("backbone.net.")]
    assert backbone_in_groups and all("lora_" in n for n in backbone_in_groups)


def _norm_param_names(model, types):
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, types)
            for pn, _ in m.named_parameters(recurse=False)}


def test_torch_norms_and_biases_have_no_weight_decay(optim_setup):
    _, model, _, groups = optim_setup
    norms = _norm_param_names(model, (nn.LayerNorm, nn.GroupNorm))
    assert any(n.startswith("transformer.") for n in norms)
    assert any(n.startswith("input_proj.") for n in norms)
    assert any(n.startswith("backbone.net.vit.") for n in norms)
    for name in norms & set(groups):
        assert groups[name]["weight_decay"] == 0.0, name
    for name, group in groups.items():
        if name.endswith(".bias"):
            assert group["weight_decay"] == 0.0, name


def test_sfp_layernorm_weights_have_no_weight_decay(optim_setup):
    _, model, _, groups = optim_setup
    norms = _norm_param_names(model, (D2LayerNorm,))
    assert norms
    for name in norms:
        assert groups[name]["weight_decay"] == 0.0, name


def test_level_and_vit_embeddings_have_no_weight_decay(optim_setup):
    _, _, _, groups = optim_setup
    for name in ("level_embed", "backbone.net.vit.embeddings.position_embeddings",
                 "backbone.net.vit.embeddings.cls_token"):
        assert groups[name]["weight_decay"] == 0.0, name


def test_query_embed_has_no_weight_decay(optim_setup):
    _, _, _, groups = optim_setup
    assert groups["transformer.queries.query_pos"]["weight_decay"] == 0.0


def test_two_stage_content_queries_have_no_weight_decay(tiny_cfg):
    cfg = _optim_cfg(tiny_cfg)
    cfg.MODEL.DETR.TWO_STAGE = True
    cfg.MODEL.DETR.CLASS_LOSS = "focal"
    model = build_model(cfg)
    groups = _group_of(model, build_optimizer(cfg, model))
    assert cfg.SOLVER.WEIGHT_DECAY > 0
    assert groups["transformer.queries.content"]["weight_decay"] == 0.0
    assert groups["transformer.queries.class_head.weight"]["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY


def test_regular_weights_have_weight_decay(optim_setup):
    _, _, _, groups = optim_setup
    for name in ("class_embed.weight", "transformer.decoder.box_head.layers.0.weight",
                 "transformer.decoder.layers.0.ffn.linear1.weight",
                 "backbone.net.vit.encoder.layer.0.attention.q_proj.base_layer.weight",
                 "backbone.net.vit.encoder.layer.0.attention.q_proj.lora_A.default.weight",
                 "backbone.stages.1.0.weight"):
        assert groups[name]["weight_decay"] == WD, name


def test_sgd_and_unknown_optimizer(tiny_cfg):
    model = build_model(tiny_cfg)
    tiny_cfg.SOLVER.OPTIMIZER = "SGD"
    tiny_cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert isinstance(build_optimizer(tiny_cfg, model), torch.optim.SGD)
    tiny_cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(tiny_cfg, model)


def test_sgd_with_full_model_clipping_of_shipped_configs(tiny_cfg):
    assert tiny_cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    assert tiny_cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    tiny_cfg.SOLVER.OPTIMIZER = "SGD"
    tiny_cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    model = build_model(tiny_cfg)
    optimizer = build_optimizer(tiny_cfg, model)
    assert isinstance(optimizer, torch.optim.SGD)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert total <= 0.1 + 1e-5


def test_full_model_clipping_clips_global_norm(tiny_cfg):
    cfg = _optim_cfg(tiny_cfg)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    before = [p.detach().clone() for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert total <= 0.1 + 1e-5
    assert total >= 0.1 - 1e-4  # clipped to the max norm, not zeroed
    # Global clipping keeps every gradient entry equal (one common scale factor).
    values = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(values, values[0].expand_as(values))
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_check_amp_available():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.ENABLED = False
    check_amp_available(cfg)
    cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED"):
        check_amp_available(cfg)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cuda"
        with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED"):
            check_amp_available(cfg)


# ---------------------------------------------------------------------------------------------
# LoRA-aware checkpoints
# ---------------------------------------------------------------------------------------------
def _eval_outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = [{"image": torch.rand(3, 56, 70, generator=g) * 255, "height": 112, "width": 140},
             {"image": torch.rand(3, 42, 42, generator=g) * 255}]
    model.eval()
    with torch.no_grad():
        out = model(batch)
    return [(o["instances"].pred_boxes.tensor, o["instances"].scores, o["instances"].pred_classes) for o in out]


def _assert_same_outputs(a, b):
    for (boxes_a, scores_a, cls_a), (boxes_b, scores_b, cls_b) in zip(a, b):
        assert torch.equal(boxes_a, boxes_b)
        assert torch.equal(scores_a, scores_b)
        assert torch.equal(cls_a, cls_b)


def _build(cfg, seed, lora=True):
    cfg = cfg.clone()
    cfg.MODEL.LORA.ENABLED = lora
    torch.manual_seed(seed)
    return build_model(cfg)


def test_remap_plain_keys_into_lora_model(tiny_cfg):
    plain = _build(tiny_cfg, 0, lora=False).state_dict()
    lora_keys = _build(tiny_cfg, 1, lora=True).state_dict().keys()
    key = "backbone.vit.encoder.layer.0.attention.q_proj.weight"
    assert key in plain
    remapped = remap_lora_keys(plain, lora_keys)
    wrapped = "backbone.vit.encoder.layer.0.attention.q_proj.base_layer.weight"
    assert key not in remapped and torch.equal(remapped[wrapped], plain[key])
    # Non-adapted layers keep their names.
    assert "backbone.vit.encoder.layer.0.attention.k_proj.weight" in remapped
    assert set(remapped) <= set(lora_keys)
    # Only the adapter tensors are missing.
    assert all(".lora_" in k for k in set(lora_keys) - set(remapped))


def test_plain_checkpoint_loads_into_lora_model(tiny_cfg, tmp_path):
    plain = _build(tiny_cfg, 0, lora=False)
    Dinodet2Checkpointer(plain, save_dir=str(tmp_path)).save("plain")
    lora = _build(tiny_cfg, 1, lora=True)
    Dinodet2Checkpointer(lora).load(str(tmp_path / "plain.pth"))
    # LoRA B is zero at init, so the LoRA model now computes exactly what the plain one does.
    _assert_same_outputs(_eval_outputs(lora), _eval_outputs(plain))


def test_lora_checkpoint_into_lora_disabled_model_raises(tiny_cfg, tmp_path):
    lora = _build(tiny_cfg, 0, lora=True)
    plain = _build(tiny_cfg, 1, lora=False)
    with pytest.raises(ValueError, match="LORA"):
        remap_lora_keys(lora.state_dict(), plain.state_dict().keys())
    Dinodet2Checkpointer(lora, save_dir=str(tmp_path)).save("lora")
    with pytest.raises(ValueError, match="MODEL.LORA.ENABLED"):
        Dinodet2Checkpointer(plain).load(str(tmp_path / "lora.pth"))


def test_checkpointer_round_trip(tiny_cfg, tmp_path):
    model = _build(tiny_cfg, 0, lora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # make the adapters matter
    Dinodet2Checkpointer(model, save_dir=str(tmp_path)).save("model_final")
    path = tmp_path / "model_final.pth"
    data = torch.load(str(path), weights_only=True)
    assert set(data["model"]) == set(model.state_dict())
    assert any("lora_B" in k for k in data["model"])

    fresh = _build(tiny_cfg, 123, lora=True)
    reference = _eval_outputs(model)
    assert not torch.equal(_eval_outputs(fresh)[0][1], reference[0][1])
    Dinodet2Checkpointer(fresh).load(str(path))
    _assert_same_outputs(_eval_outputs(fresh), reference)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_checkpointer_with_sfp_model_round_trip(tiny_cfg, tmp_path):
    tiny_cfg.MODEL.BACKBONE.NAME = "build_dinov2_sfp_backbone"
    model = _build(tiny_cfg, 0, lora=True)
    Dinodet2Checkpointer(model, save_dir=str(tmp_path)).save("sfp")
    fresh = _build(tiny_cfg, 7, lora=True)
    Dinodet2Checkpointer(fresh).load(str(tmp_path / "sfp.pth"))
    _assert_same_outputs(_eval_outputs(fresh), _eval_outputs(model))


def test_ddp_prefixed_plain_checkpoint_loads_into_lora_model(tiny_cfg, tmp_path):
    plain = _build(tiny_cfg, 0, lora=False)
    path = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in plain.state_dict().items()}}, str(path))
    lora = _build(tiny_cfg, 1, lora=True)
    Dinodet2Checkpointer(lora).load(str(path))
    key = "backbone.vit.encoder.layer.0.attention.q_proj"
    assert torch.equal(lora.state_dict()[key + ".base_layer.weight"], plain.state_dict()[key + ".weight"])
    _assert_same_outputs(_eval_outputs(lora), _eval_outputs(plain))


def test_deformable_sampling_offsets_and_reference_points_get_the_low_lr(tiny_cfg):
    from dinodet2.engine.optimizer import build_optimizer

    cfg = _optim_cfg(tiny_cfg)
    cfg.MODEL.DETR.DEFORMABLE.DECODER = True
    cfg.MODEL.DETR.DEFORMABLE.ENCODER = True
    cfg.MODEL.DETR.ENC_LAYERS = 1
    cfg.SOLVER.DEFORMABLE_LR_MULTIPLIER = 0.1
    model = build_model(cfg)
    groups = _group_of(model, build_optimizer(cfg, model))
    base = cfg.SOLVER.BASE_LR
    low = [n for n in groups if "sampling_offsets.weight" in n or n == "transformer.queries.reference_points.weight"]
    assert "transformer.queries.reference_points.weight" in low and len(low) == 1 + 1 + cfg.MODEL.DETR.DEC_LAYERS
    for name in low:
        assert groups[name]["lr"] == pytest.approx(base * 0.1), name
    assert groups["transformer.decoder.layers.0.cross_attn.value_proj.weight"]["lr"] == pytest.approx(base)
    assert groups["transformer.decoder.layers.0.cross_attn.attention_weights.weight"]["lr"] == pytest.approx(base)


def test_anchor_boxes_and_denoising_label_embeddings_have_no_weight_decay(tiny_cfg):
    from dinodet2.engine.optimizer import build_optimizer

    cfg = _optim_cfg(tiny_cfg)
    cfg.MODEL.DETR.ANCHOR_QUERIES = True
    cfg.MODEL.DETR.DN.ENABLED = True
    model = build_model(cfg)
    groups = _group_of(model, build_optimizer(cfg, model))
    assert cfg.SOLVER.WEIGHT_DECAY > 0
    assert groups["transformer.queries.anchor_boxes"]["weight_decay"] == 0.0
    assert groups["transformer.queries.content"]["weight_decay"] == 0.0
    assert groups["denoising.label_embed.weight"]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["ADAMW", "SGD"])
def test_fused_optimizer_matches_the_per_parameter_loop(tiny_cfg, name):
    """SOLVER.FUSED changes the kernel, not the update (with full-model clipping)."""
    from dinodet2.engine.optimizer import build_optimizer

    results = []
    for fused in (True, False):
        cfg = _optim_cfg(tiny_cfg.clone())
        cfg.SOLVER.OPTIMIZER = name
        cfg.SOLVER.FUSED = fused
        torch.manual_seed(0)
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        assert bool(optimizer.defaults.get("fused")) == fused
        for step in range(2):
            torch.manual_seed(step)
            loss = sum((p * torch.randn_like(p)).sum() for p in model.parameters() if p.requires_grad)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in results[0]:
        assert torch.allclose(results[0][n], results[1][n], atol=1e-6), n
