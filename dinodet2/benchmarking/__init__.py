"""The measuring core of ``tools/benchmark.py``, ``tools/crash_test.py`` and ``benchmarks/``.

* :mod:`.measurement`: timing, FLOPs, peak memory, checkpoint bytes and CPU contention of any model
* :mod:`.model_benchmark`: :func:`run_benchmark`, a dinodet2 config's train / inference step on a
  synthetic batch
* :mod:`.training_runs`: ``tools/train_net.py`` command lines and their ``metrics.json``
* :mod:`.compile_speed`: :func:`measure_compile`, eager vs ``torch.compile`` (``MODEL.COMPILE``) speed
* :mod:`.windowed_vit`: :func:`measure_windowed_vit`, DINOv2 forward time / peak memory with global vs
  windowed attention

Example::

    from dinodet2.benchmarking import run_benchmark
    from dinodet2.config import load_dinodet2_config

    cfg = load_dinodet2_config("configs/Demo/detr_shapes_tiny.yaml", ["MODEL.DEVICE", "cpu"])
    result = run_benchmark(cfg, "train", (224, 224), batch_size=2, iters=5, warmup=1)
"""
from .compile_speed import format_compile_summary, measure_compile
from .measurement import (
    BenchmarkSetupError,
    CpuContentionMeter,
    checkpoint_sizes,
    contention_warning,
    count_gflops_per_image,
    device_name,
    parameter_counts,
    peak_memory_mib,
    summary_stats,
    time_iterations,
)
from .model_benchmark import (
    DEFAULT_NUM_BOXES,
    DEFAULT_SEED,
    format_summary,
    make_synthetic_batch,
    parse_image_size,
    run_benchmark,
    seed_everything,
)
from .training_runs import (
    TRAIN_NET,
    bbox_metrics,
    fixed_budget_overrides,
    latest_scalars,
    median_iteration_seconds,
    metrics_by_iteration,
    read_metrics_records,
    train_net_command,
)
from .windowed_vit import VITDET_WINDOWED_BLOCKS, format_windowed_vit, measure_windowed_vit

__all__ = [
    "BenchmarkSetupError", "CpuContentionMeter", "DEFAULT_NUM_BOXES", "DEFAULT_SEED", "TRAIN_NET", "bbox_metrics",
    "checkpoint_sizes", "contention_warning", "count_gflops_per_image", "device_name", "fixed_budget_overrides",
    "format_compile_summary", "format_summary", "latest_scalars", "make_synthetic_batch", "measure_compile",
    "median_iteration_seconds", "metrics_by_iteration",
    "parameter_counts", "parse_image_size", "peak_memory_mib", "read_metrics_records", "run_benchmark",
    "seed_everything", "summary_stats", "time_iterations", "train_net_command",
    "VITDET_WINDOWED_BLOCKS", "format_windowed_vit", "measure_windowed_vit",
]
