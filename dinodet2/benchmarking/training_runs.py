"""``tools/train_net.py`` runs as benchmarks and tests drive them: their command lines, and what
they log to ``OUTPUT_DIR/metrics.json`` (Detectron2's ``JSONWriter``: one JSON object per line,
appended, so a resumed or repeated run logs some iterations again)."""
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

__all__ = [
    "TRAIN_NET",
    "bbox_metrics",
    "fixed_budget_overrides",
    "latest_scalars",
    "median_iteration_seconds",
    "metrics_by_iteration",
    "read_metrics_records",
    "train_net_command",
]

TRAIN_NET = "tools/train_net.py"  # relative to the repository root (the commands' working directory)


def train_net_command(config_file, overrides: Sequence[str] = (), *, resume: bool = False,
                      script: str = TRAIN_NET, python: str = sys.executable) -> List[str]:
    """``python script --config-file CONFIG [--resume] KEY VALUE ...``."""
    return [python, str(script), "--config-file", str(config_file), *(["--resume"] if resume else []), *overrides]


def fixed_budget_overrides(iters: int, output_dir, base_lr: Optional[float] = None) -> List[str]:
    """The overrides of a benchmark run of ``iters`` iterations: LR x0.1 at 85 %, no checkpoint
    before the final one, no data-loader workers (so runs one after the other compare), its own
    ``OUTPUT_DIR``, and ``SOLVER.BASE_LR`` if given."""
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.85)},)",
            *(["SOLVER.BASE_LR", str(base_lr)] if base_lr is not None else []),
            "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(output_dir)]


def read_metrics_records(output_dir) -> List[Dict]:
    """Every entry of ``output_dir/metrics.json``, in the order written (blank lines skipped)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_by_iteration(records: Sequence[Dict]) -> Dict[int, Dict]:
    """{iteration: its scalars}: entries of one iteration merged; an iteration logged again (after a
    resume) keeps the values logged last."""
    entries: Dict[int, Dict] = {}
    for record in records:
        entries.setdefault(record["iteration"], {}).update(record)
    return entries


def latest_scalars(records: Sequence[Dict], prefix: str) -> Dict:
    """{key: value} of every key starting with ``prefix``, each the last value in ``records``' order."""
    latest = {}
    for record in records:
        latest.update({k: v for k, v in record.items() if k.startswith(prefix)})
    return latest


def bbox_metrics(records: Sequence[Dict]) -> Dict:
    """The last COCOEvaluator box metrics logged (``bbox/AP`` ... as ``AP`` ...)."""
    return {k.split("/", 1)[1]: v for k, v in latest_scalars(records, "bbox/").items()}


def median_iteration_seconds(records: Sequence[Dict]) -> float:
    """The median (upper, for an even count) of the logged ``time`` per iteration; NaN if none."""
    times = sorted(record["time"] for record in records if "time" in record)
    return times[len(times) // 2] if times else float("nan")
