"""Tests of windowed attention in the DINOv2 backbone (MODEL.DINOV2.WINDOW_BLOCK_INDEXES / NUM_WINDOWS):
exactness with one window, equivalence to running every window separately through the plain HF
block, padding constraints of the backbone and the pyramid, validation, LoRA / checkpoints /
merging, and a training step through the DETR meta-architecture."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from conftest import make_train_batch

from dinodet2.modeling.backbone import build_dinov2_backbone, merge_lora_
from dinodet2.modeling.backbone.windowed_attention import (average_window_prefix, join_windows, merge_windows,
                                                          partition_windows, split_windows, to_window_order,
                                                          window_order_to_maps)
from dinodet2.modeling.neck.simple_feature_pyramid import build_dinov2_sfp_backbone


def _cfg(cfg, path, windows=(0,), num_windows=2):
    cfg.MODEL.DINOV2.NAME = path
    cfg.MODEL.DINOV2.RANDOM_INIT = False
    cfg.MODEL.DINOV2.OUT_INDICES = [0, -1]
    cfg.MODEL.DINOV2.WINDOW_BLOCK_INDEXES = list(windows)
    cfg.MODEL.DINOV2.NUM_WINDOWS = num_windows
    return cfg


def _randomize_lora(backbone):
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return backbone


def _manual_forward(vit, x, windowed, n, prefix=1):
    """Reference: every windowed block runs once per window (prefix tokens + the window's patch tokens
    in row-major order, sliced out of the grid); patch outputs are written back to their grid cells and
    prefix outputs averaged over the windows. Returns the final-LayerNorm maps after every block."""
    b, _, height, width = x.shape
    p = vit.config.patch_size
    h, w = height // p, width // p
    hidden = vit.embeddings(x)
    maps = []
    for i, block in enumerate(vit.encoder.layer):
        if i in windowed:
            grid = hidden[:, prefix:].reshape(b, h, w, -1)
            new_grid = torch.empty_like(grid)
            prefix_outs = []
            hs, ws = h // n, w // n
            for r in range(n):
                for c in range(n):
                    cell = grid[:, r * hs:(r + 1) * hs, c * ws:(c + 1) * ws].reshape(b, hs * ws, -1)
                    out = block(torch.cat([hidden[:, :prefix], cell], dim=1))
                    prefix_outs.append(out[:, :prefix])
                    new_grid[:, r * hs:(r + 1) * hs, c * ws:(c + 1) * ws] = out[:, prefix:].reshape(b, hs, ws, -1)
            hidden = torch.cat([torch.stack(prefix_outs).mean(0), new_grid.reshape(b, h * w, -1)], dim=1)
        else:
            hidden = block(hidden)
        normed = vit.layernorm(hidden)[:, prefix:]
        maps.append(normed.transpose(1, 2).reshape(b, -1, h, w))
    return maps


# ---------------------------------------------------------------------------------------------
# Re-arrangement
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,n,prefix", [((4, 6), 2, 1), ((6, 9), 3, 5), ((4, 4), 1, 1), ((8, 4), 4, 2)])
def test_partition_then_merge_gives_back_the_sequence(grid, n, prefix):
    h, w = grid
    hidden = torch.randn(3, prefix + h * w, 8)
    windows = partition_windows(hidden, prefix, grid, n)
    assert windows.shape == (3 * n * n, prefix + (h // n) * (w // n), 8)
    back = merge_windows(windows, prefix, grid, n)
    assert torch.equal(back[:, prefix:], hidden[:, prefix:])
    assert torch.allclose(back[:, :prefix], hidden[:, :prefix], atol=1e-6)


def test_partition_puts_each_window_in_row_major_order():
    h, w, n = 4, 6, 2
    hidden = torch.cat([torch.full((1, 1, 1), -1.0), torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)], 1)
    windows = partition_windows(hidden, 1, (h, w), n)[..., 0]
    assert windows[:, 0].tolist() == [-1.0] * 4
    # Window (0, 1) of image 0: rows 0-1, columns 3-5 of the 4x6 grid.
    assert windows[1, 1:].tolist() == [3.0, 4.0, 5.0, 9.0, 10.0, 11.0]
    assert windows[2, 1:].tolist() == [12.0, 13.0, 14.0, 18.0, 19.0, 20.0]


@pytest.mark.parametrize("grid,n,prefix", [((4, 6), 2, 1), ((6, 9), 3, 5), ((4, 4), 1, 1), ((8, 4), 4, 2)])
def test_window_order_steps_equal_partitioning_and_merging(grid, n, prefix):
    """The backbone's window-order path (one re-arrangement in, views per windowed block, one out)
    gives exactly what partitioning / merging around every windowed block gives."""
    h, w = grid
    hidden = torch.randn(3, prefix + h * w, 8)
    ordered = to_window_order(hidden, prefix, grid, n)
    assert torch.equal(split_windows(ordered, prefix, n), partition_windows(hidden, prefix, grid, n))
    windows = partition_windows(hidden, prefix, grid, n) * 1.5 + 0.25  # a "block" output per window
    merged = merge_windows(windows, prefix, grid, n)
    assert torch.equal(join_windows(windows, prefix, n), to_window_order(merged, prefix, grid, n))
    assert torch.equal(average_window_prefix(windows, prefix, n), partition_windows(merged, prefix, grid, n))
    maps = merged[:, prefix:].transpose(1, 2).reshape(3, 8, h, w)
    assert torch.equal(window_order_to_maps(windows[:, prefix:], 3, grid, n), maps)
    assert torch.equal(window_order_to_maps(join_windows(windows, prefix, n)[:, prefix:], 3, grid, n), maps)


# ---------------------------------------------------------------------------------------------
# Exactness and equivalence to a per-window computation
# ---------------------------------------------------------------------------------------------
def test_one_window_equals_the_global_backbone_exactly(tiny_cfg, saved_dinov2_dir):
    plain = _randomize_lora(build_dinov2_backbone(_cfg(tiny_cfg.clone(), saved_dinov2_dir, windows=())).eval())
    one = build_dinov2_backbone(_cfg(tiny_cfg.clone(), saved_dinov2_dir, windows=(0, 1), num_windows=1)).eval()
    one.load_state_dict(plain.state_dict())
    assert one.window_blocks == {0, 1} and one.size_divisibility == 14
    x = torch.randn(2, 3, 56, 98)
    with torch.no_grad():
        expected, got = plain(x), one(x)
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("windows", [(0,), (1,), (0, -1)])
def test_windowed_blocks_match_running_every_window_through_the_hf_block(tiny_cfg, saved_dinov2_dir, windows):
    from transformers import Dinov2Model

    tiny_cfg.MODEL.LORA.ENABLED = False
    backbone = build_dinov2_backbone(_cfg(tiny_cfg, saved_dinov2_dir, windows=windows, num_windows=2)).eval()
    reference = Dinov2Model.from_pretrained(saved_dinov2_dir).eval()
    x = torch.randn(2, 3, 56, 84)  # a 4x6 patch grid: 2x3-patch windows
    with torch.no_grad():
        out = backbone(x)
        maps = _manual_forward(reference, x, {i % 2 for i in windows}, 2)
        global_out = Dinov2Model.from_pretrained(saved_dinov2_dir).eval()(x).last_hidden_state
    for layer in (0, 1):
        assert out[f"layer{layer}"].shape == (2, 32, 4, 6)
        assert (out[f"layer{layer}"] - maps[layer]).abs().max() < 1e-5, layer
    global_map = global_out[:, 1:].transpose(1, 2).reshape(2, 32, 4, 6)
    assert (out["layer1"] - global_map).abs().max() > 1e-3, "windows must change the features"


def test_windowed_with_registers_matches_per_window_reference(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.NUM_REGISTER_TOKENS = 4
    tiny_cfg.MODEL.DINOV2.PRETRAIN_IMAGE_SIZE = 56
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [0, 1]
    tiny_cfg.MODEL.DINOV2.WINDOW_BLOCK_INDEXES = [0]
    tiny_cfg.MODEL.DINOV2.NUM_WINDOWS = 3
    tiny_cfg.MODEL.LORA.ENABLED = False
    backbone = build_dinov2_backbone(tiny_cfg).eval()
    x = torch.randn(1, 3, 84, 126)  # 6x9 grid, 3x3 windows of 2x3 patches
    with torch.no_grad():
        out = backbone(x)
        maps = _manual_forward(backbone.vit, x, {0}, 3, prefix=5)
    for layer in (0, 1):
        assert (out[f"layer{layer}"] - maps[layer]).abs().max() < 1e-5, layer


def test_runs_of_windowed_and_global_blocks_match_the_per_window_reference(tiny_cfg):
    """Windowed -> windowed -> global -> windowed -> global, a feature map after every block."""
    tiny_cfg.MODEL.DINOV2.NUM_LAYERS = 5
    tiny_cfg.MODEL.DINOV2.NUM_REGISTER_TOKENS = 2
    tiny_cfg.MODEL.DINOV2.PRETRAIN_IMAGE_SIZE = 56
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [0, 1, 2, 3, 4]
    tiny_cfg.MODEL.DINOV2.WINDOW_BLOCK_INDEXES = [0, 1, 3]
    tiny_cfg.MODEL.DINOV2.NUM_WINDOWS = 2
    tiny_cfg.MODEL.LORA.ENABLED = False
    backbone = build_dinov2_backbone(tiny_cfg).eval()
    x = torch.randn(2, 3, 56, 84)  # 4x6 grid, 2x2 windows of 2x3 patches
    with torch.no_grad():
        out = backbone(x)
        maps = _manual_forward(backbone.vit, x, {0, 1, 3}, 2, prefix=3)
    for layer in range(5):
        assert out[f"layer{layer}"].shape == (2, 32, 4, 6)
        assert out[f"layer{layer}"].is_contiguous()
        assert (out[f"layer{layer}"] - maps[layer]).abs().max() < 1e-5, layer


# ---------------------------------------------------------------------------------------------
# Shapes, padding constraints, validation
# ---------------------------------------------------------------------------------------------
def test_output_shapes_strides_and_size_divisibility(tiny_cfg, saved_dinov2_dir):
    plain = build_dinov2_backbone(_cfg(tiny_cfg.clone(), saved_dinov2_dir, windows=())).eval()
    backbone = build_dinov2_backbone(_cfg(tiny_cfg.clone(), saved_dinov2_dir, windows=(0,), num_windows=2)).eval()
    assert backbone.output_shape() == plain.output_shape()
    assert plain.size_divisibility == 14
    assert backbone.size_divisibility == 28 and backbone.padding_constraints == {"size_divisibility": 28}
    images = ImageList.from_tensors([torch.randn(3, 100, 131)], backbone.size_divisibility,
                                    padding_constraints=backbone.padding_constraints)
    assert tuple(images.tensor.shape[-2:]) == (112, 140)
    with torch.no_grad():
        out = backbone(images.tensor)
    assert out["layer0"].shape == out["layer1"].shape == (1, 32, 8, 10)


def test_input_not_divisible_by_the_windows_raises(tiny_cfg, saved_dinov2_dir):
    backbone = build_dinov2_backbone(_cfg(tiny_cfg, saved_dinov2_dir, windows=(0,), num_windows=2)).eval()
    with pytest.raises(ValueError, match=r"42x56 .*3x4 patch grid.*NUM_WINDOWS=2.*multiples of 28"):
        backbone(torch.randn(1, 3, 42, 56))


@pytest.mark.parametrize("num_windows,scales,expected", [
    (2, (2.0, 1.0, 0.5), 28), (4, (2.0, 1.0, 0.5), 56), (3, (2.0, 1.0, 0.5), 84), (2, (1.0, 0.25), 56),
    (2, (2.0, 1.0), 28),
])
def test_pyramid_pads_to_the_windows_and_its_coarsest_stride(tiny_cfg, num_windows, scales, expected):
    tiny_cfg.MODEL.DINOV2.WINDOW_BLOCK_INDEXES = [-1]
    tiny_cfg.MODEL.DINOV2.NUM_WINDOWS = num_windows
    tiny_cfg.MODEL.SFP.SCALE_FACTORS = list(scales)
    neck = build_dinov2_sfp_backbone(tiny_cfg).eval()
    assert neck.size_divisibility == expected
    assert neck.padding_constraints == {"size_divisibility": expected}
    images = ImageList.from_tensors([torch.randn(3, 100, 131)], neck.size_divisibility)
    with torch.no_grad():
        out = neck(images.tensor)
    grid = (images.tensor.shape[-2] // 14, images.tensor.shape[-1] // 14)
    assert out["p14"].shape[-2:] == grid


def test_windows_only_in_dropped_blocks_are_off(tiny_cfg):
    tiny_cfg.MODEL.DINOV2.OUT_INDICES = [0]
    tiny_cfg.MODEL.DINOV2.WINDOW_BLOCK_INDEXES = [1]
    backbone = build_dinov2_backbone(tiny_cfg)
    assert backbone.window_blocks == set() and backbone.size_divisibility == 14


@pytest.mark.parametrize("key,value,match", [
    ("WINDOW_BLOCK_INDEXES", [2], r"WINDOW_BLOCK_INDEXES contains 2, but the model has 2 blocks"),
    ("WINDOW_BLOCK_INDEXES", [-3], r"WINDOW_BLOCK_INDEXES contains -3"),
    ("WINDOW_BLOCK_INDEXES", [0.5], r"WINDOW_BLOCK_INDEXES contains 0.5"),
    ("NUM_WINDOWS", 0, r"NUM_WINDOWS must be an integer >= 1"),
    ("NUM_WINDOWS", 1.5, r"NUM_WINDOWS must be an integer >= 1"),
])
def test_invalid_window_config_raises_naming_the_key(tiny_cfg, key, value, match):
    tiny_cfg.MODEL.DINOV2.WINDOW_BLOCK_INDEXES = [0]
    setattr(tiny_cfg.MODEL.DINOV2, key, value)
    with pytest.raises(ValueError, match=match):
        build_dinov2_backbone(tiny_cfg)


def test_default_config_has_windows_off(tiny_cfg):
    assert tiny_cfg.MODEL.DINOV2.WINDOW_BLOCK_INDEXES == []
    assert build_dinov2_backbone(tiny_cfg).window_blocks == set()


# ---------------------------------------------------------------------------------------------
# LoRA, checkpoints, merging, training
# ---------------------------------------------------------------------------------------------
def test_lora_injection_state_dict_round_trip_and_merge(tiny_cfg, saved_dinov2_dir):
    tiny_cfg.MODEL.LORA.TARGET_MODULES = ["query", "key", "value", "attn_out"]
    plain = build_dinov2_backbone(_cfg(tiny_cfg.clone(), saved_dinov2_dir, windows=()))
    windowed = _randomize_lora(build_dinov2_backbone(_cfg(tiny_cfg.clone(), saved_dinov2_dir, windows=(0, 1))).eval())
    # Same parameter names as without windows; adapters in the attention of every (windowed) block.
    assert windowed.state_dict().keys() == plain.state_dict().keys()
    adapted = {n.split(".lora_A")[0] for n, _ in windowed.named_parameters() if "lora_A" in n}
    assert adapted == {f"vit.encoder.layer.{i}.attention.{m}" for i in (0, 1)
                       for m in ("q_proj", "k_proj", "v_proj", "o_proj")}

    fresh = build_dinov2_backbone(_cfg(tiny_cfg.clone(), saved_dinov2_dir, windows=(0, 1))).eval()
    fresh.load_state_dict(windowed.state_dict())
    x = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        expected = windowed(x)
        assert torch.equal(fresh(x)["layer1"], expected["layer1"])
        assert merge_lora_(fresh.vit) == 8
        merged = fresh(x)
    assert not any("lora_" in n for n in fresh.state_dict())
    assert (merged["layer1"] - expected["layer1"]).abs().max() < 1e-4


def test_lora_gradients_flow_through_windowed_blocks(tiny_cfg, saved_dinov2_dir):
    backbone = build_dinov2_backbone(_cfg(tiny_cfg, saved_dinov2_dir, windows=(0, 1))).train()
    backbone(torch.randn(2, 3, 56, 84))["layer1"].square().mean().backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if "lora_B" in n}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("backbone_name", ["build_dinov2_backbone", "build_dinov2_sfp_backbone"])
def test_detr_trains_one_step_with_windowed_blocks(tiny_cfg, saved_dinov2_dir, backbone_name):
    from dinodet2.engine.optimizer import build_optimizer

    cfg = _cfg(tiny_cfg, saved_dinov2_dir, windows=(0,), num_windows=2)
    cfg.MODEL.BACKBONE.NAME = backbone_name
    model = build_model(cfg).train()
    vit = model.backbone.net if backbone_name == "build_dinov2_sfp_backbone" else model.backbone
    assert vit.window_blocks == {0}
    optimizer = build_optimizer(cfg, model)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    losses = model(make_train_batch())  # 70x98 and 56x56 images, padded to multiples of 28
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    named = dict(model.named_parameters())
    assert all(named[n].grad is not None for n in lora if "lora_B" in n)
    optimizer.step()
    assert any(not torch.equal(named[n], before) for n, before in lora.items())


# ---------------------------------------------------------------------------------------------
# Benchmark function (benchmarks/windowed_vit.py)
# ---------------------------------------------------------------------------------------------
def test_measure_windowed_vit_on_a_tiny_vit():
    from dinodet2.benchmarking import format_windowed_vit, measure_windowed_vit

    with pytest.raises(ValueError, match="multiple of 28"):
        measure_windowed_vit(image_size=70, num_windows=2)
    result = measure_windowed_vit(image_size=56, hidden=32, layers=2, heads=2, windowed_blocks=(-2,), num_windows=2,
                                  iters=1, warmup=0, threads=1)
    assert result["config"]["windowed_blocks"] == [0] and result["config"]["tokens_per_window"] == 4
    for name in ("global", "windowed"):
        assert result[name]["median_s"] > 0 and result[name]["peak_forward_mib"] >= 0
    assert result["speedup"] > 0
    assert "speedup (global / windowed)" in format_windowed_vit(result)
    assert "tensor peak windowed / global" in format_windowed_vit(result)


def test_windowed_blocks_lower_the_training_tensor_peak_of_materialised_attention():
    """With eager attention each global block keeps its token x token attention matrix for backward;
    windowed blocks keep only the per-window matrices, so the training step's tensor peak drops,
    while an inference forward (the last block is global in both) does not."""
    from dinodet2.benchmarking import measure_windowed_vit

    result = measure_windowed_vit(image_size=224, hidden=32, layers=4, heads=2, windowed_blocks=(0, 1, 2),
                                  num_windows=4, iters=1, warmup=0, threads=1, attn_implementation="eager")
    g, w = result["global"]["tensor_peak"], result["windowed"]["tensor_peak"]
    if g["training_mib"] is None:
        pytest.skip("torch.distributed._tools.mem_tracker is not available in this torch build")
    # 16x16 patches: a global matrix is 2 x 257^2 floats per block; windows: 16 x 2 x 17^2
    assert w["training_mib"] < 0.8 * g["training_mib"]
    assert result["tensor_memory_ratio"]["training_mib"] == pytest.approx(w["training_mib"] / g["training_mib"])
    assert w["inference_mib"] == pytest.approx(g["inference_mib"], rel=0.25)
