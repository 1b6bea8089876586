"""``tools/train_net.py`` runs as benchmarks and tests drive them: their command lines, and what
they log to ``OUTPUT_DIR/metrics.json`` (Detectron2's ``JSONWriter``: one JSON object per line,
appended, so a resumed or repeated run logs some iterations again)."""
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = [
    "TRAIN_NET",
    "bbox_metrics",
    "fixed_budget_overrides",
    "fixed_budget_run",
    "mean_over_seeds",
    "run_measured",
    "latest_scalars",
    "median_iteration_seconds",
    "metrics_by_iteration",
    "read_metrics_records",
    "train_net_command",
    "write_json",
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


def run_measured(cmd: Sequence[str], log_path: str, cwd: str) -> Dict:
    """Run ``cmd`` in ``cwd``, its output in ``log_path``; its wall seconds and peak RSS in MiB (the
    process's own, from ``wait4``'s rusage, not the largest of all children). Raises naming the log if
    the command fails."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log_path}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def fixed_budget_run(config, overrides: Sequence[str], output_dir: str, iters: int, seed: int, *, cwd: str,
                     reuse: bool = False, label: str = "benchmark") -> Dict:
    """One ``tools/train_net.py`` run of ``iters`` iterations (:func:`fixed_budget_overrides`, ``SEED``
    ``seed``, evaluated once at its end) into ``output_dir``: wall seconds, peak RSS, median s/iter and
    the box metrics, also written to ``output_dir/result.json``. With ``reuse`` a finished run (its
    ``result.json``) is read instead of run again, so an interrupted measurement can be completed."""
    done = os.path.join(output_dir, "result.json")
    if reuse and os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(output_dir, exist_ok=True)
    cmd = train_net_command(config, [*overrides, *fixed_budget_overrides(iters, output_dir), "SEED", str(seed),
                                     "TEST.EVAL_PERIOD", "0"])
    print(f"[{label}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    measured = run_measured(cmd, os.path.join(output_dir, "run.log"), cwd)
    records = read_metrics_records(output_dir)
    result = {**measured, "s_per_iter": median_iteration_seconds(records), **bbox_metrics(records)}
    with open(done, "w") as f:
        json.dump(result, f, indent=2)
    return result


def mean_over_seeds(rows: Sequence[Dict], keys: Sequence[str] = ("AP", "AP50", "AP75", "APs", "s_per_iter",
                                                                  "peak_rss_mib")) -> List[Dict]:
    """Per ``variant`` (in first-seen order): the mean of every metric in ``keys`` over its runs, the
    per-run values (``<key>_per_seed``) and the seeds."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == name]
        entry = {"variant": name, "seeds": [r["seed"] for r in runs]}
        for key in keys:
            values = [r[key] for r in runs if r.get(key) is not None]
            entry[key] = statistics.mean(values) if values else None
            entry[key + "_per_seed"] = values
        out.append(entry)
    return out


def write_json(path, result) -> None:
    """``result`` as indented JSON in ``path`` (its folder made), written to a temporary file and renamed
    into place, so an interrupted benchmark never leaves a half-written result."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
