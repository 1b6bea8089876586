"""Smoke tests of tools/benchmark.py (what it reports, not how fast anything is)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TINY_CONFIG


def _module():
    spec = importlib.util.spec_from_file_location("dinodet2_benchmark", REPO_ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_run_benchmark_reports_every_measurement(tiny_cfg, mode):
    bench = _module()
    result = bench.run_benchmark(tiny_cfg, mode, (70, 98), batch_size=2, iters=2, warmup=1)
    assert result["mode"] == mode and result["batch_size"] == 2 and result["image_size"] == [70, 98]
    assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
    assert result["images_per_s"] == pytest.approx(2 / result["median_s_per_iter"])
    assert 0 < result["params_trainable"] <= result["params_total"]
    assert result["gflops_per_image"] > 0 and result["peak_memory_mib"] > 0
    json.dumps(result)  # JSON-able


def test_train_step_updates_the_model(tiny_cfg):
    from detectron2.modeling import build_model

    bench = _module()
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


def test_amp_on_cpu_is_refused(tiny_cfg):
    bench = _module()
    tiny_cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(bench.BenchmarkSetupError, match="AMP"):
        bench.run_benchmark(tiny_cfg, "train", 56, batch_size=1, iters=1, warmup=0)
