"""benchmarks/compare_rfdetr.py: the config derived from RF-DETR's description, the settings
matching and the ratio / goal rows. Pure logic: neither rfdetr nor a model is built here."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import compare_rfdetr  # noqa: E402

# what `rfdetr_worker.py --describe` reports for rfdetr 1.11.2's RFDETRNanoConfig(num_classes=80)
NANO = {
    "config_class": "RFDETRNanoConfig", "encoder": "dinov2_windowed_small", "vit_hidden_size": 384,
    "vit_layers": 12, "vit_heads": 6, "vit_mlp_ratio": 4, "vit_register_tokens": 0, "windowed": True,
    "patch_size": 16, "positional_encoding_size": 24, "resolution": 384, "num_windows": 2,
    "window_block_indexes": [0, 1, 2, 4, 5, 7, 8, 10, 11], "out_feature_indexes": [3, 6, 9, 12],
    "projector_scale": ["P4"], "hidden_dim": 256, "dec_layers": 2, "sa_nheads": 8, "ca_nheads": 16,
    "dec_n_points": 2, "dim_feedforward": 2048, "dropout": 0.0, "num_queries": 300, "num_select": 300,
    "group_detr": 13, "two_stage": True, "lite_refpoint_refine": True, "bbox_reparam": True, "ia_bce_loss": True,
    "aux_loss": True, "num_classes": 80, "freeze_encoder": False, "backbone_lora": False,
}

# the settings whose architectures differ by design (see the README's matching table)
DIFFERING = {"ViT features -> decoder levels", "box refinement", "training-only extra queries"}


def _config(description, denoising=True):
    opts = compare_rfdetr.our_overrides(description, description["num_classes"], denoising)
    return compare_rfdetr.load_dinodet2_config(compare_rfdetr.BASE_CONFIG, opts)


def test_our_config_matches_rfdetr_nano():
    cfg = _config(NANO)
    v, d = cfg.MODEL.DINOV2, cfg.MODEL.DETR
    assert (v.RANDOM_INIT, v.HIDDEN_SIZE, v.NUM_LAYERS, v.NUM_HEADS, v.PATCH_SIZE) == (True, 384, 12, 6, 16)
    assert v.PRETRAIN_IMAGE_SIZE == 384  # 24 x 24 position table, no interpolation at 384 px
    assert list(v.WINDOW_BLOCK_INDEXES) == [0, 1, 2, 4, 5, 7, 8, 10, 11] and v.NUM_WINDOWS == 2
    assert v.FREEZE is False and cfg.MODEL.LORA.ENABLED is False  # RF-DETR trains the whole ViT
    assert list(cfg.MODEL.SFP.SCALE_FACTORS) == [1.0]  # P4: one level at the patch stride
    assert (d.ENC_LAYERS, d.DEC_LAYERS, d.HIDDEN_DIM, d.DIM_FEEDFORWARD) == (0, 2, 256, 2048)
    assert (d.NHEADS, d.DEFORMABLE.NHEADS, d.DEFORMABLE.NUM_POINTS, d.DEFORMABLE.DECODER) == (8, 16, 2, True)
    assert (d.NUM_QUERIES, d.TWO_STAGE, cfg.TEST.DETECTIONS_PER_IMAGE, d.NUM_CLASSES) == (300, True, 300, 80)
    # the windows and the pyramid's stride divide the input: no padding on either side
    assert NANO["resolution"] % (v.PATCH_SIZE * v.NUM_WINDOWS) == 0


def test_matching_rows_flag_exactly_the_known_differences():
    rows = compare_rfdetr.matching_rows(NANO, _config(NANO))
    assert {r["setting"] for r in rows if r["match"] == "differs"} == DIFFERING
    assert all(r["rfdetr"] == r["ours"] for r in rows if r["match"] == "same" and r["setting"] != "classes")
    # no training-only queries on either side: that row matches too
    rows = compare_rfdetr.matching_rows(dict(NANO, group_detr=1), _config(NANO, denoising=False))
    assert {r["setting"] for r in rows if r["match"] == "differs"} == DIFFERING - {"training-only extra queries"}


def test_matching_rows_see_a_changed_variant():
    """A variant we do not follow (e.g. another decoder depth than our config) shows up as 'differs'."""
    cfg = _config(NANO)
    rows = compare_rfdetr.matching_rows(dict(NANO, dec_layers=4, num_windows=4), cfg)
    differs = {r["setting"] for r in rows if r["match"] == "differs"}
    assert {"decoder layers / width / FFN", "windowed attention"} <= differs


def test_p3_p5_levels_map_to_our_scale_factors():
    cfg = _config(dict(NANO, projector_scale=["P3", "P5"]))
    assert list(cfg.MODEL.SFP.SCALE_FACTORS) == [2.0, 0.5]


def test_ratio_rows_and_tables():
    rf = {"train": {"median_s_per_iter": 3.0, "other_processes_cpu_cores": 0.0},
          "inference": {"median_s_per_iter": 1.0, "other_processes_cpu_cores": 0.5},
          "train_kept": {"median_s_per_iter": 2.4}, "inference_kept": {"median_s_per_iter": 0.9}}
    ours = {"train": {"median_s_per_iter": 2.0}, "inference": {"median_s_per_iter": 1.25},
            "train_kept": {"median_s_per_iter": 1.6}, "inference_kept": {"median_s_per_iter": 0.75},
            "inference_onnx": {"median_s_per_iter": 0.8}, "inference_onnx_int8": {"median_s_per_iter": 0.4}}
    rows = compare_rfdetr.ratio_rows(rf, ours, batch_size=2)
    # train, train kept, inference, inference kept, as shipped (RF default / ours kept), ONNX, INT8
    assert [r["ratio"] for r in rows] == pytest.approx([1.5, 1.5, 0.8, 1.2, 1.0 / 0.75, 1.25, 2.5])
    assert [r["goal_met"] for r in rows] == [None, None, False, True, True, False, True]
    assert [r["contended"] for r in rows] == [False, False, True, False, True, True, True]
    table = compare_rfdetr.speed_table(rows).splitlines()
    assert table[0] == "| comparison | RF-DETR s | ours s | RF-DETR / ours | goal |"
    assert table[2] == "| training step, batch 2, PyTorch | 3.0000 | 2.0000 | 1.50x | - |"
    assert table[4].endswith("| 0.80x * | >= 1x (not met) |")
    assert table[5].endswith("| 0.9000 | 0.7500 | 1.20x | >= 1x (met) |")
    assert table[6].endswith("| 1.0000 | 0.7500 | 1.33x * | >= 1x (met) |")
    assert table[7].endswith("| 1.25x * | >= 2x (not met) |")
    assert table[8] == ("| inference, batch 1: ours ONNX Runtime INT8 vs RF-DETR PyTorch | 1.0000 | 0.4000 | 2.50x * "
                        "| >= 2x (met) |")
    # a side that did not run (or --no-allocator-rows): no ratio, no verdict
    missing = compare_rfdetr.ratio_rows(rf, {"train": ours["train"]}, batch_size=2)
    assert [r["ratio"] for r in missing][1:] == [None] * 6 and missing[3]["goal_met"] is None


def test_fp32_and_int8_sessions_share_their_options(tmp_path):
    """Both ONNX rows run with --threads intra-op threads, one inter-op thread and every graph
    optimisation (the INT8 MatMul fusions need them)."""
    onnx = pytest.importorskip("onnx", reason="needs 'onnx' (pip install -e .[test])")
    onnxruntime = pytest.importorskip("onnxruntime", reason="needs 'onnxruntime' (pip install -e .[test])")
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "g", [value],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    path = str(tmp_path / "identity.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    options = compare_rfdetr.onnxruntime_session(path, threads=3).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert all("vnni" in f or f.startswith("amx") for f in compare_rfdetr.cpu_int8_flags())
