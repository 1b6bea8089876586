"""Structure guarantees: checkpoints with the parameter names of before the transformer was built
from its parts still load, and every parameter lands in the optimizer group its module declares
(decided by what the parameter is, never by its name)."""
import pytest
import torch
from detectron2.modeling import build_model

from conftest import REPO_ROOT

from dinodet2.engine import Dinodet2Checkpointer
from dinodet2.engine.optimizer import build_optimizer

# The parameter names of checkpoints written before (dinodet2 <= the reliability release), and the
# names they have now. Listed here on purpose (not imported): these are the names on disk.
OLD_TO_NEW = [
    ("query_embed", "transformer.queries.query_pos"),
    ("bbox_embed.layers.", "transformer.decoder.box_head.layers."),
    ("transformer.encoder_layers.", "transformer.encoder.layers."),
    ("transformer.encoder_norm.", "transformer.encoder.norm."),
    ("transformer.decoder_layers.", "transformer.decoder.layers."),
    ("transformer.decoder_norm.", "transformer.decoder.norm."),
    ("transformer.reference_points.", "transformer.queries.reference_points."),
    ("transformer.ref_point_head.", "transformer.queries.ref_point_head."),
    ("transformer.content_queries", "transformer.queries.content"),
    ("transformer.anchor_boxes", "transformer.queries.anchor_boxes"),
    ("transformer.enc_output.", "transformer.queries.token_proj."),
    ("transformer.enc_class_embed.", "transformer.queries.class_head."),
    ("transformer.enc_bbox_embed.", "transformer.queries.box_head."),
]

IMPROVED = {"MODEL.BACKBONE.NAME": "build_dinov2_sfp_backbone", "MODEL.SFP.SCALE_FACTORS": [2.0, 1.0, 0.5],
            "MODEL.DETR.ENC_LAYERS": 1, "MODEL.DETR.DEFORMABLE.ENCODER": True, "MODEL.DETR.DEFORMABLE.DECODER": True,
            "MODEL.DETR.TWO_STAGE": True, "MODEL.DETR.CLASS_LOSS": "varifocal", "MODEL.DETR.LOOK_FORWARD_TWICE": True,
            "MODEL.DETR.DN.ENABLED": True, "MODEL.DETR.PRE_NORM": True}
VARIANTS = {
    "seed": {},
    "learned_deformable": {"MODEL.DETR.DEFORMABLE.DECODER": True},
    "anchor": {"MODEL.DETR.ANCHOR_QUERIES": True},
    "improved": IMPROVED,
}


def _model(cfg, opts):
    for key, value in opts.items():
        cfg.merge_from_list([key, value])
    return build_model(cfg)


def _old_names(state):
    old = {}
    for key, value in state.items():
        for before, now in OLD_TO_NEW:
            if key.startswith(now):
                key = before + key[len(now):]
                break
        old[key] = value
    return old


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_checkpoint_with_the_old_parameter_names_loads(tiny_cfg, tmp_path, variant):
    trained = _model(tiny_cfg.clone(), VARIANTS[variant])
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in trained.state_dict().items()}  # != any init
    old = _old_names(state)
    assert any(k.startswith(("query_embed", "bbox_embed", "transformer.decoder_layers")) for k in old)
    path = tmp_path / "old.pth"
    torch.save({"model": old, "iteration": 7}, path)

    fresh = _model(tiny_cfg.clone(), VARIANTS[variant])
    Dinodet2Checkpointer(fresh).load(str(path))
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _group_of(model, optimizer):
    by_param = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_param[p] = group
    return by_param


def test_every_parameter_lands_in_the_group_its_module_declares(tiny_cfg):
    """The expected group of every parameter is derived from *what* it is (its module, its role in
    the model), and compared with what the optimizer built."""
    from peft.tuners.lora import LoraLayer

    from dinodet2.modeling.transformer import MultiScaleDeformableAttention

    cfg = tiny_cfg
    model = _model(cfg, {**IMPROVED, "MODEL.DINOV2.UNFREEZE_LAST_N_BLOCKS": 1, "MODEL.DINOV2.UNFREEZE_NORMS": True})
    s = cfg.SOLVER
    s.BASE_LR, s.WEIGHT_DECAY, s.WEIGHT_DECAY_EMBED, s.WEIGHT_DECAY_NORM = 1.0, 0.05, 0.0, 0.0
    s.BACKBONE_LR_MULTIPLIER, s.LORA_LR_MULTIPLIER, s.DEFORMABLE_LR_MULTIPLIER = 0.1, 2.0, 0.3
    s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS = 1.0, None
    groups = _group_of(model, build_optimizer(cfg, model))

    vit = model.backbone.net.vit
    lora = {id(p) for m in vit.modules() if isinstance(m, LoraLayer)
            for n, p in m.named_parameters() if "lora_" in n and p.requires_grad}
    vit_params = {id(p) for p in vit.parameters() if p.requires_grad}
    deformable = {id(m.sampling_offsets.weight) for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)}
    deformable |= {id(m.sampling_offsets.bias) for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)}
    embeddings = {id(model.level_embed), id(model.transformer.queries.content),
                  id(model.denoising.label_embed.weight)}
    embeddings |= {id(p) for p in (vit.embeddings.cls_token, vit.embeddings.position_embeddings) if p.requires_grad}
    norms = {id(p) for m in model.modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or type(m).__name__ == "LayerNorm"
             for p in m.parameters(recurse=False)}
    assert lora and vit_params - lora and len(deformable) == 2 * (1 + cfg.MODEL.DETR.DEC_LAYERS)

    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p not in groups, name
            continue
        lr = 2.0 if id(p) in lora else 0.1 if id(p) in vit_params else 0.3 if id(p) in deformable else 1.0
        wd = 0.0 if id(p) in embeddings | norms else 0.05
        assert groups[p]["lr"] == pytest.approx(lr), name
        assert groups[p]["weight_decay"] == pytest.approx(wd), name
        checked += 1
    assert checked == sum(1 for p in model.parameters() if p.requires_grad)


def test_renaming_an_attribute_does_not_move_a_parameter(tiny_cfg):
    """The deformable LR follows the sampling-offset module, whatever attribute holds it."""
    from dinodet2.modeling.transformer import MultiScaleDeformableAttention

    model = _model(tiny_cfg, {"MODEL.DETR.DEFORMABLE.DECODER": True})
    tiny_cfg.SOLVER.DEFORMABLE_LR_MULTIPLIER = 0.1
    attn = model.transformer.decoder.layers[0].cross_attn
    assert isinstance(attn, MultiScaleDeformableAttention)
    model.transformer.decoder.layers[0].renamed_cross_attention = attn  # same module under a second name
    del model.transformer.decoder.layers[0].cross_attn
    groups = _group_of(model, build_optimizer(tiny_cfg, model))
    assert groups[attn.sampling_offsets.weight]["lr"] == pytest.approx(tiny_cfg.SOLVER.BASE_LR * 0.1)
    assert groups[attn.value_proj.weight]["lr"] == pytest.approx(tiny_cfg.SOLVER.BASE_LR)


def test_readme_layout_names_every_module():
    readme = (REPO_ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Results")]
    package = REPO_ROOT / "dinodet2"
    missing = [str(p.relative_to(package)) for p in sorted(package.rglob("*.py"))
               if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"README's Layout section does not mention {missing}"
