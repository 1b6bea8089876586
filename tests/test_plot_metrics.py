"""tools/plot_metrics.py: the loss / AP figure of a run's metrics.json (a synthetic one here)."""
import importlib.util
import json

import pytest

from conftest import REPO_ROOT


def _tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO_ROOT / "tools" / "plot_metrics.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _write_metrics(directory, records):
    with open(directory / "metrics.json", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _losses(iteration, scale):
    return {"iteration": iteration, "total_loss": 20.0 * scale, "loss_class": 1.0 * scale,
            "loss_bbox": 0.5 * scale, "loss_giou": 0.7 * scale, "loss_class_0": 1.1 * scale,
            "loss_class_enc": 1.3 * scale, "loss_bbox_dn": 0.4 * scale, "lr": 1e-4, "time": 0.5}


def test_main_losses_are_the_total_and_the_final_layer_ones():
    tool = _tool()
    entries = {19: _losses(19, 1.0), 39: {"iteration": 39, "bbox/AP": 10.0}}
    assert tool.main_loss_keys(entries) == ["total_loss", "loss_bbox", "loss_class", "loss_giou"]


def test_plot_of_a_resumed_run_with_evaluations(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    tool = _tool()
    records = [_losses(19, 1.0), _losses(39, 0.8), {"iteration": 39, "bbox/AP": 12.5, "bbox/AP50": 30.0},
               _losses(39, 0.7),  # logged again after a --resume: the last value counts
               _losses(59, 0.5), {"iteration": 59, "bbox/AP": float("nan"), "bbox/AP50": 41.0}]
    _write_metrics(tmp_path, records)
    entries = tool.metrics_by_iteration(tool.read_metrics_records(str(tmp_path)))
    assert tool.series(entries, "total_loss") == ([19, 39, 59], [20.0, 20.0 * 0.7, 10.0])
    assert tool.series(entries, "bbox/AP") == ([39], [12.5])  # NaN (no detections yet) left out

    tool.main([str(tmp_path)])
    with Image.open(tmp_path / "metrics.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100


def test_missing_metrics_or_losses_fail_clearly(tmp_path):
    tool = _tool()
    with pytest.raises(SystemExit, match="No metrics.json"):
        tool.main([str(tmp_path)])
    _write_metrics(tmp_path, [_losses(19, 1.0)])
    with pytest.raises(SystemExit, match="none of the losses"):
        tool.main([str(tmp_path), "--losses", "loss_mask"])
