"""Tests of dinodet2.benchmarking and its command line tools/benchmark.py (what they report and
read, not how fast anything is)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TINY_CONFIG

from dinodet2 import benchmarking as bench


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_run_benchmark_reports_every_measurement(tiny_cfg, mode):
    result = bench.run_benchmark(tiny_cfg, mode, (70, 98), batch_size=2, iters=2, warmup=1)
    assert result["mode"] == mode and result["batch_size"] == 2 and result["image_size"] == [70, 98]
    assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
    assert result["images_per_s"] == pytest.approx(2 / result["median_s_per_iter"])
    assert 0 < result["params_trainable"] <= result["params_total"]
    assert result["gflops_per_image"] > 0 and result["peak_memory_mib"] > 0
    json.dumps(result)  # JSON-able


def test_train_step_updates_the_model(tiny_cfg):
    from detectron2.modeling import build_model

    model = build_model(tiny_cfg)
    before = model.class_embed.weight.detach().clone()
    bench.run_benchmark(tiny_cfg, "train", 56, batch_size=1, iters=1, warmup=0, count_flops=False, model=model)
    assert not torch.equal(before, model.class_embed.weight)


def test_command_line_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "benchmark.py"), "--config-file", str(TINY_CONFIG),
           "--mode", "inference", "--image-size", "56", "--batch-size", "1", "--iters", "1", "--warmup", "0",
           "--output", str(out), "MODEL.DINOV2.HIDDEN_SIZE", "32", "MODEL.DINOV2.NUM_LAYERS", "1",
           "MODEL.DINOV2.NUM_HEADS", "2", "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config_file"].endswith("detr_shapes_tiny.yaml")
    assert "MODEL.DETR.HIDDEN_DIM" in result["overrides"]


def test_fp16_amp_on_cpu_is_refused_and_bf16_runs_with_its_losses_reported(tiny_cfg):
    tiny_cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(bench.BenchmarkSetupError, match="AMP.PRECISION"):
        bench.run_benchmark(tiny_cfg, "train", 56, batch_size=1, iters=1, warmup=0)
    tiny_cfg.SOLVER.AMP.PRECISION = "bfloat16"
    r = bench.run_benchmark(tiny_cfg, "train", 56, batch_size=1, iters=1, warmup=0, count_flops=False)
    assert r["amp"] and r["amp_precision"] == "bfloat16" and r["losses_finite"] is True
    assert {"loss_class", "loss_bbox", "loss_giou"} <= set(r["losses"])
    tiny_cfg.SOLVER.AMP.ENABLED = False
    r = bench.run_benchmark(tiny_cfg, "inference", 56, batch_size=1, iters=1, warmup=0, count_flops=False)
    assert r["amp_precision"] is None and r["losses"] is None and r["losses_finite"] is None


def test_gpu_check_script_runs_its_rows_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.py with --device cpu on a tiny model: every row but fp16 (CUDA-only) runs,
    the table and the JSON are written, and the exit code reports the refused fp16 row."""
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--image-size", "112", "--iters", "1",
           "--warmup", "0", "--output", str(out), "MODEL.DINOV2.HIDDEN_SIZE", "32", "MODEL.DINOV2.NUM_LAYERS", "2",
           "MODEL.DINOV2.NUM_HEADS", "2", "MODEL.DINOV2.PRETRAIN_IMAGE_SIZE", "56", "MODEL.DETR.HIDDEN_DIM", "32",
           "MODEL.DETR.NHEADS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.ENC_LAYERS", "1",
           "MODEL.DETR.DEC_LAYERS", "1", "MODEL.DETR.NUM_QUERIES", "10", "MODEL.DETR.DN.NUM_QUERIES", "10",
           "MODEL.SFP.OUT_CHANNELS", "32", "MODEL.DINOV2.WINDOW_BLOCK_INDEXES", "[0]", "MODEL.DINOV2.NUM_WINDOWS", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]  # the fp16 row cannot run on a CPU
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["train, AMP fp16"]["status"].startswith("failed") and "bfloat16" in rows["train, AMP fp16"]["status"]
    for name, row in rows.items():
        if name != "train, AMP fp16":
            assert row["status"] == "ok", (name, row["status"])
            assert row["mode"] != "train" or row["losses_finite"] is True
    assert "| inference, LoRA merged |" in proc.stdout


def test_parse_image_size():
    assert bench.parse_image_size(448) == (448, 448) == bench.parse_image_size([448])
    assert bench.parse_image_size([224, 320]) == (224, 320)
    with pytest.raises(bench.BenchmarkSetupError, match="image-size"):
        bench.parse_image_size([1, 2, 3])


def test_contention_warning_only_for_a_busy_cpu():
    assert bench.contention_warning({"device": "cpu", "other_processes_cpu_cores": 0.1}) is None
    assert bench.contention_warning({"device": "cuda:0", "other_processes_cpu_cores": 3.0}) is None
    assert "1.50 CPU cores" in bench.contention_warning({"device": "cpu", "other_processes_cpu_cores": 1.5,
                                                         "cpu_count": 2})


def test_checkpoint_sizes_of_a_partly_frozen_model():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    model[0].requires_grad_(False)
    sizes = bench.checkpoint_sizes(model)
    assert 0 < sizes["trainable_only"] < sizes["full"]
    assert sizes["full"] - sizes["trainable_only"] >= 64 * 64 * 4  # the frozen layer's weights


# ------------------------------------------------------------------------------------------------
# tools/train_net.py runs: command lines and metrics.json
# ------------------------------------------------------------------------------------------------
def test_train_net_command():
    assert bench.train_net_command("c.yaml", ["SEED", "1"]) == [
        sys.executable, "tools/train_net.py", "--config-file", "c.yaml", "SEED", "1"]
    assert bench.train_net_command("c.yaml", ["SEED", "1"], resume=True, script="/x/t.py", python="py") == [
        "py", "/x/t.py", "--config-file", "c.yaml", "--resume", "SEED", "1"]


def test_fixed_budget_overrides():
    assert bench.fixed_budget_overrides(300, "out/r") == [
        "SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(255,)", "SOLVER.CHECKPOINT_PERIOD", "3000",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", "out/r"]
    with_lr = bench.fixed_budget_overrides(100, "o", base_lr=5e-4)
    assert with_lr[4:6] == ["SOLVER.BASE_LR", "0.0005"] and with_lr[6] == "SOLVER.CHECKPOINT_PERIOD"


def _write_metrics(tmp_path, records):
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return bench.read_metrics_records(tmp_path)


def test_metrics_of_a_resumed_run_keep_the_last_entry_of_each_iteration(tmp_path):
    records = _write_metrics(tmp_path, [
        {"iteration": 0, "total_loss": 5.0, "time": 0.3},
        {"iteration": 1, "total_loss": 4.0, "time": 0.1},
        {"iteration": 2, "total_loss": 9.0, "time": 0.2},   # killed after this line ...
        {"iteration": 2, "total_loss": 3.0, "time": 0.4},   # ... resumed from the iteration-1 checkpoint
        {"iteration": 3, "total_loss": 2.0, "time": 0.5},
        {"iteration": 3, "bbox/AP": 40.0, "bbox/AP50": 70.0},
    ])
    assert len(records) == 6
    entries = bench.metrics_by_iteration(records)
    assert sorted(entries) == [0, 1, 2, 3]
    assert entries[2]["total_loss"] == 3.0
    assert entries[3] == {"iteration": 3, "total_loss": 2.0, "time": 0.5, "bbox/AP": 40.0, "bbox/AP50": 70.0}
    assert bench.bbox_metrics(records) == {"AP": 40.0, "AP50": 70.0}
    assert bench.median_iteration_seconds(records) == 0.3  # upper median of 0.1 0.2 0.3 0.4 0.5


def test_bbox_metrics_are_the_last_ones_written(tmp_path):
    records = _write_metrics(tmp_path, [{"iteration": 9, "bbox/AP": 10.0, "bbox/APs": 1.0},
                                        {"iteration": 4, "bbox/AP": 20.0}])  # a shorter run appended
    assert bench.bbox_metrics(records) == {"AP": 20.0, "APs": 1.0}
    assert bench.latest_scalars(records, "bbox/") == {"bbox/AP": 20.0, "bbox/APs": 1.0}
    assert math.isnan(bench.median_iteration_seconds(records))
