"""Tests of the LoRA toolkit: config -> peft mapping (blocks, families, per-layer ranks/alphas),
DoRA, AdaLoRA (hook + rank allocation), partial unfreezing, parameter report, trainable-only
checkpoints (parity on top of the pretrained backbone) and merging adapters for deployment."""
import json

import pytest
import torch
from detectron2.modeling import build_model

from dinodet2.engine import AdaLoraBudgetHook, Dinodet2Checkpointer, build_optimizer
from dinodet2.modeling.backbone.lora import (
    adalora_orthogonal_regularization,
    adalora_rank_allocation,
    find_adalora_tuner,
    merge_lora_,
)
from dinodet2.param_report import trainable_parameter_report

from conftest import make_train_batch as _train_batch


def _lora_modules(model):
    """{module name inside the ViT: (rank, scaling)} for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.backbone.vit.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = (module.r["default"], module.scaling["default"])
    return out


def _cfg(tiny_cfg, **overrides):
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 4
    for key, value in overrides.items():
        tiny_cfg.merge_from_list([key, value])
    return tiny_cfg


def test_default_targets_query_and_value_of_every_block(tiny_cfg):
    mods = _lora_modules(build_model(_cfg(tiny_cfg)))
    assert sorted(mods) == sorted(f"encoder.layer.{i}.attention.{m}" for i in range(4) for m in ("q_proj", "v_proj"))
    assert all(r == 4 and s == pytest.approx(1.0) for r, s in mods.values())


@pytest.mark.parametrize("key, value, blocks", [
    ("MODEL.LORA.LAYERS", [0, -1], [0, 3]),
    ("MODEL.LORA.LAST_N_LAYERS", 2, [2, 3]),
])
def test_block_selection(tiny_cfg, key, value, blocks):
    mods = _lora_modules(build_model(_cfg(tiny_cfg, **{key: value})))
    assert sorted({int(n.split(".")[2]) for n in mods}) == blocks


def test_families_attention_ffn_both(tiny_cfg):
    mods = _lora_modules(build_model(_cfg(tiny_cfg, **{"MODEL.LORA.TARGET_MODULES": ["attn_out", "fc1", "fc2"]})))
    suffixes = {n.split(".", 3)[3] for n in mods}
    assert suffixes == {"attention.o_proj", "mlp.fc1", "mlp.fc2"}


def test_rank_and_alpha_patterns_reach_peft(tiny_cfg):
    cfg = _cfg(tiny_cfg, **{"MODEL.LORA.TARGET_MODULES": ["query", "value", "fc1"],
                            "MODEL.LORA.RANK_PATTERN": ["0-1=2", "2-3=8", "3/fc1=16"],
                            "MODEL.LORA.ALPHA_PATTERN": ["*/value=32"]})
    mods = _lora_modules(build_model(cfg))
    for name, (rank, scaling) in mods.items():
        layer = int(name.split(".")[2])
        expected_rank = 2 if layer < 2 else (16 if layer == 3 and name.endswith("fc1") else 8)
        expected_alpha = 32.0 if name.endswith("v_proj") else 4.0
        assert rank == expected_rank, name
        assert scaling == pytest.approx(expected_alpha / expected_rank), name
    model = build_model(cfg)
    a = dict(model.named_parameters())["backbone.vit.encoder.layer.3.mlp.fc1.lora_A.default.weight"]
    assert a.shape[0] == 16


@pytest.mark.parametrize("overrides, message", [
    ({"MODEL.LORA.LAYERS": [4]}, "LAYERS contains \\[4\\]"),
    ({"MODEL.LORA.LAST_N_LAYERS": 5}, "LAST_N_LAYERS=5"),
    ({"MODEL.LORA.LAYERS": [0], "MODEL.LORA.LAST_N_LAYERS": 1}, "only one of"),
    ({"MODEL.LORA.TARGET_MODULES": ["query", "mlp"]}, "unknown module families \\['mlp'\\]"),
    ({"MODEL.LORA.RANK_PATTERN": ["0-9=8"]}, "outside 0..3"),
    ({"MODEL.LORA.RANK_PATTERN": ["first=8"]}, "is not '<blocks>"),
    ({"MODEL.LORA.RANK_PATTERN": ["*/qkv=8"]}, "unknown module families \\['qkv'\\]"),
    ({"MODEL.LORA.RANK_PATTERN": ["1=0"]}, "must be positive"),
    ({"MODEL.DINOV2.UNFREEZE_LAST_N_BLOCKS": 9}, "UNFREEZE_LAST_N_BLOCKS=9"),
])
def test_invalid_lora_configs_name_the_key(tiny_cfg, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(_cfg(tiny_cfg, **overrides))


def test_dora_adds_trainable_magnitudes_and_merges(tiny_cfg):
    model = build_model(_cfg(tiny_cfg, **{"MODEL.LORA.USE_DORA": True})).eval()
    names = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(names) == 8
    _assert_merge_parity(model)


def test_partial_unfreezing_and_its_learning_rate(tiny_cfg):
    cfg = _cfg(tiny_cfg, **{"MODEL.DINOV2.FREEZE": True, "MODEL.DINOV2.UNFREEZE_NORMS": True, "MODEL.DINOV2.UNFREEZE_LAST_N_BLOCKS": 1,
                            "SOLVER.BACKBONE_LR_MULTIPLIER": 0.25, "SOLVER.BASE_LR": 1e-3})
    model = build_model(cfg)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert "vit.encoder.layer.3.mlp.fc1.weight" in trainable  # last block: everything
    assert "vit.encoder.layer.2.norm1.weight" in trainable and "vit.layernorm.bias" in trainable  # norms
    assert "vit.encoder.layer.2.mlp.fc1.weight" not in trainable
    assert "vit.embeddings.patch_embeddings.projection.weight" not in trainable
    optimizer = build_optimizer(cfg, model)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr[id(named["backbone.vit.encoder.layer.3.mlp.fc1.weight"])] == pytest.approx(2.5e-4)
    assert lr[id(named["backbone.vit.encoder.layer.0.attention.q_proj.lora_A.default.weight"])] == pytest.approx(1e-3)


def test_full_fine_tuning_trains_the_whole_vit(tiny_cfg):
    model = build_model(_cfg(tiny_cfg, **{"MODEL.DINOV2.FREEZE": False}))
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen == ["vit.embeddings.mask_token"]


def test_parameter_report_per_family(tiny_cfg):
    model = build_model(_cfg(tiny_cfg, **{"MODEL.LORA.TARGET_MODULES": ["query", "value", "fc2"]}))
    report = trainable_parameter_report(model)
    lora = {k: v for k, v in report.items() if k.startswith("lora/")}
    assert set(lora) == {"lora/query", "lora/value", "lora/fc2"}
    # rank 4, hidden 32: q/v: 4 * (32 + 32) per block; fc2: 4 * (128 + 32) per block
    assert lora["lora/query"] == lora["lora/value"] == 4 * 4 * 64
    assert lora["lora/fc2"] == 4 * 4 * (128 + 32)
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["trainable"] == sum(v for k, v in report.items() if k not in ("total", "trainable"))


# ------------------------------------------------------------------------------------------------
# Checkpoints: trainable-only, merged
# ------------------------------------------------------------------------------------------------
def _pretrained_cfg(tiny_cfg, saved_dinov2_dir, **overrides):
    cfg = _cfg(tiny_cfg, **overrides)
    cfg.MODEL.DINOV2.NAME = saved_dinov2_dir
    cfg.MODEL.DINOV2.RANDOM_INIT = False
    cfg.MODEL.DINOV2.NUM_LAYERS = 2
    cfg.MODEL.DINOV2.PRETRAIN_IMAGE_SIZE = 56
    return cfg


def _train_a_bit(model, cfg, steps=2):
    optimizer = build_optimizer(cfg, model)
    model.train()
    for _ in range(steps):
        loss = sum(model(_train_batch()).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def _raw_outputs(model):
    g = torch.Generator().manual_seed(0)
    images, mask = model.preprocess_image([{"image": torch.rand(3, 70, 98, generator=g) * 255}])
    out = model.forward_transformer(images, mask)
    return torch.cat([out["pred_logits"].flatten(), out["pred_boxes"].flatten()])


def test_trainable_only_checkpoint_reproduces_the_full_model(tiny_cfg, saved_dinov2_dir, tmp_path):
    cfg = _pretrained_cfg(tiny_cfg, saved_dinov2_dir)
    torch.manual_seed(0)
    model = _train_a_bit(build_model(cfg), cfg)
    Dinodet2Checkpointer(model, str(tmp_path), trainable_only=True, cfg=cfg).save("small")
    Dinodet2Checkpointer(model, str(tmp_path)).save("full")
    small, full = torch.load(tmp_path / "small.pth", weights_only=False), torch.load(tmp_path / "full.pth",
                                                                                    weights_only=False)
    assert small["dinodet2_format"] == "trainable_only" and "MODEL:" in small["config"]
    frozen = [k for k in full["model"] if k not in small["model"]]
    assert frozen and all(".lora_" not in k for k in frozen)
    def tensor_bytes(state):
        return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))

    # (on this tiny model the file sizes are dominated by the config text the small one carries)
    assert tensor_bytes(small["model"]) < tensor_bytes(full["model"])

    torch.manual_seed(123)  # different random init of everything that is not pretrained
    fresh = build_model(cfg).eval()
    assert not torch.equal(_raw_outputs(fresh), _raw_outputs(model))
    Dinodet2Checkpointer(fresh).load(str(tmp_path / "small.pth"))
    assert (_raw_outputs(fresh) - _raw_outputs(model)).abs().max().item() == 0.0


def test_trainable_only_checkpoint_refuses_a_model_that_trains_more(tiny_cfg, saved_dinov2_dir, tmp_path):
    cfg = _pretrained_cfg(tiny_cfg, saved_dinov2_dir)
    Dinodet2Checkpointer(build_model(cfg), str(tmp_path), trainable_only=True).save("small")
    other = _pretrained_cfg(tiny_cfg.clone(), saved_dinov2_dir, **{"MODEL.LORA.TARGET_MODULES": ["query", "value", "fc1"]})
    with pytest.raises(ValueError, match="lacks .* weights that train"):
        Dinodet2Checkpointer(build_model(other)).load(str(tmp_path / "small.pth"))


def _assert_merge_parity(model, atol=1e-5):
    before = _raw_outputs(model)
    merged = merge_lora_(model)
    assert merged > 0
    assert not any("lora_" in n or "base_layer" in n for n in model.state_dict())
    assert (before - _raw_outputs(model)).abs().max().item() <= atol


def test_merged_checkpoint_loads_with_lora_disabled(tiny_cfg, saved_dinov2_dir, tmp_path):
    cfg = _pretrained_cfg(tiny_cfg, saved_dinov2_dir, **{"MODEL.LORA.TARGET_MODULES": ["query", "value", "fc2"]})
    torch.manual_seed(0)
    model = _train_a_bit(build_model(cfg), cfg)
    with torch.no_grad():  # make the adapters matter (lora_B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    reference = _raw_outputs(model)
    Dinodet2Checkpointer(model, str(tmp_path)).save("adapted")

    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("merge_lora", REPO_ROOT / "tools" / "merge_lora.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(cfg.dump())
    report = tool.main(["--config-file", str(cfg_file), "--weights", str(tmp_path / "adapted.pth"),
                        "--output-dir", str(tmp_path / "merged"), "--image-size", "56", "--iters", "1"])
    assert report["merged_layers"] == 6 and report["max_abs_output_diff"] <= 1e-5
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["merged_layers"] == 6

    from detectron2.config import get_cfg

    from dinodet2 import add_dinodet2_config

    merged_cfg = get_cfg()
    add_dinodet2_config(merged_cfg)
    merged_cfg.merge_from_file(str(tmp_path / "merged" / "config.yaml"))
    assert not merged_cfg.MODEL.LORA.ENABLED
    plain = build_model(merged_cfg).eval()
    Dinodet2Checkpointer(plain).load(merged_cfg.MODEL.WEIGHTS)
    assert (reference - _raw_outputs(plain)).abs().max().item() <= 1e-5

    from detectron2.engine import DefaultPredictor

    merged_cfg.MODEL.DEVICE = "cpu"
    predictor = DefaultPredictor(merged_cfg)  # Detectron2's own checkpointer, plain names
    assert not any("lora_" in n for n, _ in predictor.model.named_parameters())
    assert predictor((torch.rand(60, 80, 3) * 255).to(torch.uint8).numpy())["instances"].image_size == (60, 80)


# ------------------------------------------------------------------------------------------------
# AdaLoRA
# ------------------------------------------------------------------------------------------------
class _FakeStorage:
    def __init__(self):
        self.scalars = {}

    def put_scalar(self, name, value, smoothing_hint=True):
        self.scalars[name] = value


class _FakeTrainer:
    def __init__(self):
        self.iter = 0
        self.storage = _FakeStorage()


def test_adalora_hook_updates_the_rank_allocation_every_step(tiny_cfg, tmp_path, monkeypatch):
    steps = 12
    cfg = _cfg(tiny_cfg, **{"MODEL.LORA.ADALORA.ENABLED": True, "MODEL.LORA.ADALORA.INIT_R": 6,
                            "MODEL.LORA.ADALORA.TARGET_R": 2, "MODEL.LORA.ADALORA.TINIT": 2,
                            "MODEL.LORA.ADALORA.TFINAL": 2, "MODEL.LORA.ADALORA.DELTA_T": 1,
                            "SOLVER.MAX_ITER": steps})
    torch.manual_seed(0)
    model = build_model(cfg)
    tuner = find_adalora_tuner(model)
    assert tuner is not None and not any("adalora_tuner" in k for k in model.state_dict())
    initial = adalora_rank_allocation(model)
    assert len(initial) == 8 and set(initial.values()) == {6}

    hook = AdaLoraBudgetHook(model, str(tmp_path), log_period=1)
    hook.trainer = _FakeTrainer()
    calls = []
    original = tuner.update_and_allocate
    monkeypatch.setattr(tuner, "update_and_allocate", lambda step: (calls.append(step), original(step))[1])
    optimizer = build_optimizer(cfg, model)
    model.train()
    for step in range(steps):
        hook.trainer.iter = step
        losses = model(_train_batch())
        assert "loss_adalora_orth" in losses and losses["loss_adalora_orth"] > 0
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        hook.after_step()
    assert calls == list(range(steps))
    final = adalora_rank_allocation(model)
    assert sum(final.values()) < sum(initial.values())
    assert sum(final.values()) == pytest.approx(2 * 8, abs=2)  # target average rank 2 over 8 modules
    hook.trainer.iter = steps  # as Detectron2 leaves it for after_train
    hook.after_train()
    saved = json.loads((tmp_path / "adalora_rank_allocation.json").read_text())
    assert saved["ranks"] == final and hook.trainer.storage.scalars["adalora/total_rank"] == sum(final.values())


def test_adalora_invalid_schedule(tiny_cfg):
    cfg = _cfg(tiny_cfg, **{"MODEL.LORA.ADALORA.ENABLED": True, "MODEL.LORA.ADALORA.TINIT": 5,
                            "MODEL.LORA.ADALORA.TFINAL": 5, "SOLVER.MAX_ITER": 10})
    with pytest.raises(ValueError, match="TINIT"):
        build_model(cfg)


_ADALORA = {"MODEL.LORA.ADALORA.ENABLED": True, "MODEL.LORA.ADALORA.INIT_R": 4, "MODEL.LORA.ADALORA.TARGET_R": 2,
            "MODEL.LORA.ADALORA.TINIT": 1, "MODEL.LORA.ADALORA.TFINAL": 1, "SOLVER.MAX_ITER": 10}


@pytest.mark.parametrize("backbone", ["build_dinov2_backbone", "build_dinov2_sfp_backbone"])
def test_backbone_extra_losses_hold_the_weighted_adalora_orthogonality_term(tiny_cfg, backbone):
    cfg = _cfg(tiny_cfg, **_ADALORA, **{"MODEL.LORA.ADALORA.ORTH_REG_WEIGHT": 0.25,
                                         "MODEL.BACKBONE.NAME": backbone})
    model = build_model(cfg)
    with torch.no_grad():  # make P P^T != I, so the term is not zero by chance
        for name, param in model.backbone.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_()
    losses = model.backbone.extra_losses()
    assert list(losses) == ["loss_adalora_orth"]
    expected = 0.25 * adalora_orthogonal_regularization(find_adalora_tuner(model))
    assert losses["loss_adalora_orth"].item() == pytest.approx(expected.item()) and expected.item() > 0
    assert losses["loss_adalora_orth"].requires_grad


@pytest.mark.parametrize("backbone", ["build_dinov2_backbone", "build_dinov2_sfp_backbone"])
@pytest.mark.parametrize("overrides", [{}, {"MODEL.LORA.ENABLED": False},
                                       {**_ADALORA, "MODEL.LORA.ADALORA.ORTH_REG_WEIGHT": 0.0}],
                         ids=["lora", "no-adapters", "adalora-weight-0"])
def test_backbone_extra_losses_are_empty_without_adalora_regularization(tiny_cfg, backbone, overrides):
    model = build_model(_cfg(tiny_cfg, **overrides, **{"MODEL.BACKBONE.NAME": backbone}))
    assert model.backbone.extra_losses() == {}


def test_trainer_build_model_logs_the_parameter_summary(tiny_cfg, caplog):
    import logging

    from dinodet2.engine import Trainer

    logger = logging.getLogger("dinodet2.param_report")
    logger.addHandler(caplog.handler)  # whether or not a setup_logger stopped propagation
    caplog.set_level(logging.INFO, logger=logger.name)
    try:
        model = Trainer.build_model(_cfg(tiny_cfg))
    finally:
        logger.removeHandler(caplog.handler)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == logger.name)
    total = sum(p.numel() for p in model.parameters())
    assert f"Parameters of DETR: total {total:,}" in text
    assert f"lora/query {trainable_parameter_report(model)['lora/query']:,}" in text


def test_param_report_tool(tmp_path):
    import importlib.util

    from conftest import REPO_ROOT, TINY_CONFIG

    spec = importlib.util.spec_from_file_location("param_report", REPO_ROOT / "tools" / "param_report.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    report = tool.main(["--config-file", str(TINY_CONFIG), "--json", str(tmp_path / "r.json"), "--checkpoint-sizes",
                        "MODEL.DINOV2.HIDDEN_SIZE", "32", "MODEL.DINOV2.NUM_LAYERS", "2", "MODEL.DINOV2.NUM_HEADS", "2",
                        "MODEL.LORA.RANK_PATTERN", "['1=8']"])
    assert [(r["block"], r["family"], r["rank"]) for r in report["lora_modules"]] == [
        (0, "query", 4), (0, "value", 4), (1, "query", 8), (1, "value", 8)]
    assert json.loads((tmp_path / "r.json").read_text())["parameters"]["total"] == report["parameters"]["total"]
    # the demo trains its random-init ViT, so only the frozen mask token is left out
    assert 0 < report["checkpoint_bytes"]["trainable_only"] <= report["checkpoint_bytes"]["full"]


def test_trainer_registers_the_adalora_hook_and_writes_the_allocation(tmp_path):
    from detectron2.config import get_cfg

    from conftest import TINY_CONFIG
    from dinodet2 import add_dinodet2_config
    from dinodet2.data import register_shapes_dataset
    from dinodet2.engine import Trainer

    register_shapes_dataset("shapes_adalora4", str(tmp_path / "data"), "train", num_images=4, seed=0)
    cfg = get_cfg()
    add_dinodet2_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    cfg.merge_from_list([
        "MODEL.DINOV2.HIDDEN_SIZE", 32, "MODEL.DINOV2.NUM_LAYERS", 2, "MODEL.DINOV2.NUM_HEADS", 2,
        "MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 2, "MODEL.DETR.DEC_LAYERS", 2,
        "MODEL.DETR.DIM_FEEDFORWARD", 64, "MODEL.DETR.NUM_QUERIES", 10,
        "MODEL.LORA.ADALORA.ENABLED", True, "MODEL.LORA.ADALORA.INIT_R", 4, "MODEL.LORA.ADALORA.TARGET_R", 2,
        "MODEL.LORA.ADALORA.DELTA_T", 1, "DATASETS.TRAIN", ("shapes_adalora4",), "DATASETS.TEST", (),
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 100,
        "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    trainer = Trainer(cfg)
    assert sum(isinstance(h, AdaLoraBudgetHook) for h in trainer._hooks) == 1
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = json.loads((tmp_path / "out" / "adalora_rank_allocation.json").read_text())
    assert saved["iteration"] == 6 and len(saved["ranks"]) == 4
    assert sum(saved["ranks"].values()) < 4 * 4  # pruned below INIT_R everywhere in total
    assert "loss_adalora_orth" in trainer.storage.latest()
    # the checkpoint carries peft's AdaLoRA state (statistics, final rank pattern) for a resume
    state = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    hook_state = state["trainer"]["hooks"]["AdaLoraBudgetHook"]
    assert set(hook_state) == {"ipt", "exp_avg_ipt", "exp_avg_unc", "rank_pattern"}
    assert hook_state["rank_pattern"] and len(hook_state["exp_avg_ipt"]) == 4 * 3  # 4 modules x A, E, B
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    hook = next(h for h in resumed._hooks if isinstance(h, AdaLoraBudgetHook))
    assert hook.state_dict()["rank_pattern"] == hook_state["rank_pattern"]


def test_rank_rules_and_injection_on_transformers4_module_names():
    """Block and family parsing also works on transformers 4.x names (attention.attention.query, ...)."""
    from peft.tuners.lora import LoraLayer

    from dinodet2.modeling.backbone.lora import LoraSpec, inject_lora

    from test_backbone import _Transformers4Dinov2

    model = _Transformers4Dinov2(d=8, depth=3)
    spec = LoraSpec(families=["query", "attn_out", "fc2"], rank=2, alpha=2.0, last_n_layers=2,
                    rank_pattern=["2=4", "*/fc2=3"])
    plan = inject_lora(model, spec)
    assert {n: (p["layer"], p["family"], p["rank"]) for n, p in plan.items()} == {
        "encoder.layer.1.attention.attention.query": (1, "query", 2),
        "encoder.layer.1.attention.output.dense": (1, "attn_out", 2),
        "encoder.layer.1.mlp.fc2": (1, "fc2", 3),
        "encoder.layer.2.attention.attention.query": (2, "query", 4),
        "encoder.layer.2.attention.output.dense": (2, "attn_out", 4),
        "encoder.layer.2.mlp.fc2": (2, "fc2", 3),
    }
    ranks = {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert ranks == {n: p["rank"] for n, p in plan.items()}


def test_adalora_state_resumes_with_the_checkpoint(tiny_cfg, tmp_path):
    """peft keeps AdaLoRA's importance averages and final rank pattern outside the state dict: the
    hook's state carries them through a checkpoint (saved and loaded on the CPU, as the trainer's
    checkpointer does). A run resumed before the final phase has the uninterrupted run's statistics
    (a run resumed without them does not) and ends with its weights and ranks; a run resumed in the
    final phase (rank pattern fixed at step 6 of 10) ends the same too."""
    cfg = _cfg(tiny_cfg, **{"MODEL.LORA.ADALORA.ENABLED": True, "MODEL.LORA.ADALORA.INIT_R": 6,
                            "MODEL.LORA.ADALORA.TARGET_R": 2, "MODEL.LORA.ADALORA.TINIT": 2,
                            "MODEL.LORA.ADALORA.TFINAL": 4, "MODEL.LORA.ADALORA.DELTA_T": 1,
                            "SOLVER.MAX_ITER": 10})

    def start():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        hook = AdaLoraBudgetHook(model, str(tmp_path), log_period=100)
        hook.trainer = _FakeTrainer()
        return model, hook, build_optimizer(cfg, model)

    def train(model, hook, optimizer, steps):
        for step in steps:
            torch.manual_seed(step)
            hook.trainer.iter = step
            losses = model(_train_batch())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            hook.after_step()

    def save(model, hook, optimizer, name):
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": hook.state_dict()},
                   tmp_path / name)

    def resume(name, with_hook_state=True):
        model, hook, optimizer = start()
        checkpoint = torch.load(tmp_path / name, map_location="cpu")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if with_hook_state:
            hook.load_state_dict(checkpoint["hook"])
        return model, hook, optimizer

    def lora_e(model):
        return {k: v.clone() for k, v in model.state_dict().items() if "lora_E" in k}

    model, hook, optimizer = start()
    train(model, hook, optimizer, range(4))
    save(model, hook, optimizer, "step4.pth")
    train(model, hook, optimizer, range(4, 6))
    statistics = hook.state_dict()["exp_avg_ipt"]
    train(model, hook, optimizer, range(6, 8))
    save(model, hook, optimizer, "step8.pth")
    train(model, hook, optimizer, range(8, 10))
    final, final_ranks = lora_e(model), adalora_rank_allocation(model)
    assert len(statistics) > 0 and sum(final_ranks.values()) < 6 * len(final_ranks)

    model2, hook2, optimizer2 = resume("step4.pth")
    train(model2, hook2, optimizer2, range(4, 6))
    resumed = hook2.state_dict()["exp_avg_ipt"]
    assert set(resumed) == set(statistics)
    for name, value in statistics.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=0)  # the values are ~1e-8
    train(model2, hook2, optimizer2, range(6, 10))
    torch.testing.assert_close(lora_e(model2), final)
    assert adalora_rank_allocation(model2) == final_ranks

    model3, hook3, optimizer3 = resume("step4.pth", with_hook_state=False)
    train(model3, hook3, optimizer3, range(4, 6))
    fresh = hook3.state_dict()["exp_avg_ipt"]
    assert all((fresh[n] - statistics[n]).norm() > 0.05 * statistics[n].norm() for n in statistics)

    model4, hook4, optimizer4 = resume("step8.pth")  # the final phase: the pattern comes with the state
    train(model4, hook4, optimizer4, range(8, 10))
    torch.testing.assert_close(lora_e(model4), final)

    bad = {k: v for k, v in hook.state_dict().items() if k != "exp_avg_unc"}
    with pytest.raises(KeyError, match="exp_avg_unc"):
        hook.load_state_dict(bad)
    before = hook.state_dict()  # statistics of another model: refused
    before["ipt"] = {"other.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="MODEL.LORA"):
        hook.load_state_dict(before)
