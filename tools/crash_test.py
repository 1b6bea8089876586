#!/usr/bin/env python
"""Kill a training run with SIGKILL at random moments, resume it each time, and compare it with the
same run left alone: losses at every logged iteration, final COCO metrics and final weights.

Both runs are ``tools/train_net.py`` processes with the same config and overrides. The interrupted
one is started in its own process group and killed (``kill -9`` of the group, data-loader workers
included) after a random delay, ``--kills`` times, each time restarted with ``--resume``; the last
segment runs to the end. A kill may land anywhere: during start-up, a step, a checkpoint write or
the final evaluation.

Example (the README's numbers)::

    python tools/crash_test.py --config-file configs/Demo/detr_shapes_tiny_improved.yaml \\
        --iters 300 --kills 3 --output output/crash_test

Writes ``OUTPUT/summary.json`` and prints a table; exits 1 if the runs differ beyond ``--rtol``.
"""
import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dinodet2.benchmarking.training_runs import (  # noqa: E402
    TRAIN_NET,
    latest_scalars,
    metrics_by_iteration,
    read_metrics_records,
    train_net_command,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs/Demo/detr_shapes_tiny_improved.yaml"))
    parser.add_argument("--iters", type=int, default=300, help="SOLVER.MAX_ITER of both runs")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of the interrupted run")
    parser.add_argument("--checkpoint-period", type=int, default=25)
    parser.add_argument("--seed", type=int, default=7, help="SEED of both runs")
    parser.add_argument("--kill-seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance for losses and metrics")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "crash_test"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for both runs")
    return parser.parse_args(argv)


def train_command(args, output_dir, resume):
    return train_net_command(args.config_file, ["OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", str(args.iters),
                                                "SEED", str(args.seed), "SOLVER.CHECKPOINT_PERIOD",
                                                str(args.checkpoint_period), *args.opts],
                             resume=resume, script=os.path.join(REPO, TRAIN_NET))


TRAINING_STARTED = "Starting training from iteration"  # Detectron2's TrainerBase.train logs it


def run(cmd, log_path, kill_after=None):
    """Run ``cmd`` (appending to ``log_path``). With ``kill_after``, SIGKILL its process group that
    many seconds after its training loop started (start-up is not counted, so kills land in
    training, checkpoint writes or the final evaluation). Returns (killed, seconds of training)."""
    offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    started = None
    while proc.poll() is None:
        if started is None:
            with open(log_path) as f:
                f.seek(offset)
                if TRAINING_STARTED in f.read():
                    started = time.time()
        elif kill_after is not None and time.time() - started >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, time.time() - started
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log_path}.")
    return False, time.time() - (started or time.time())


def _checkpoint_iteration(output_dir):
    """The iteration of the checkpoint last_checkpoint names (-1 if none)."""
    path = os.path.join(output_dir, "last_checkpoint")
    if not os.path.exists(path):
        return -1
    with open(path) as f:
        name = f.read().strip()
    digits = name[len("model_"):-len(".pth")]
    return int(digits) if digits.isdigit() else -1


def compare_logs(straight, resumed, rtol):
    """Max relative difference of every loss at every iteration both runs logged, and the final metrics."""
    worst, compared, missing = 0.0, 0, []
    for it, entry in straight.items():
        other = resumed.get(it)
        for key, value in entry.items():
            if not (key.startswith("loss") or key == "total_loss" or key.startswith("bbox/")):
                continue
            if other is None or key not in other:
                missing.append(f"{key}@{it}")
                continue
            compared += 1
            a, b = float(value), float(other[key])
            if not (math.isnan(a) and math.isnan(b)):
                worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    return {"values_compared": compared, "max_rel_diff": worst, "missing": missing[:10], "ok": worst <= rtol and not missing}


def compare_weights(path_a, path_b):
    import torch

    a = torch.load(path_a, map_location="cpu", weights_only=True)["model"]
    b = torch.load(path_b, map_location="cpu", weights_only=True)["model"]
    if a.keys() != b.keys():
        return {"ok": False, "reason": "different tensors"}
    diff = max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0) for k in a)
    return {"ok": True, "tensors": len(a), "max_abs_diff": diff}


def final_metrics(entries):
    """The last ``bbox/*`` values in iteration order."""
    return latest_scalars([entries[it] for it in sorted(entries)], "bbox/")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    straight_dir, crashed_dir = os.path.join(args.output, "straight"), os.path.join(args.output, "interrupted")
    for d in (straight_dir, crashed_dir):
        if os.path.exists(os.path.join(d, "metrics.json")):
            raise SystemExit(f"{d} already holds a run; remove it or choose another --output.")
    rng = random.Random(args.kill_seed)

    print(f"[crash_test] uninterrupted run -> {straight_dir}", flush=True)
    _, straight_seconds = run(train_command(args, straight_dir, resume=False), os.path.join(args.output, "straight.log"))

    print(f"[crash_test] interrupted run -> {crashed_dir}", flush=True)
    kills, segments, resume = [], 0, False
    log = os.path.join(args.output, "interrupted.log")
    while True:
        segments += 1
        delay = None
        if len(kills) < args.kills:
            # spread the kills over the run: each segment trains for about a fair slice of it
            delay = rng.uniform(0.5, 1.5) * straight_seconds / (args.kills + 1)
            done = _checkpoint_iteration(crashed_dir) + 1  # what the next segment does not redo
            delay = min(delay, 0.9 * straight_seconds * (1 - done / args.iters))  # kill before the end
        killed, seconds = run(train_command(args, crashed_dir, resume=resume), log, kill_after=delay)
        resume = True
        if not killed:
            break
        last_path = os.path.join(crashed_dir, "last_checkpoint")
        with open(last_path if os.path.exists(last_path) else os.devnull) as f:
            last = f.read().strip() or "(none yet)"
        kills.append({"seconds_into_training": round(seconds, 1), "last_checkpoint": last})
        print(f"[crash_test]   kill -9 {seconds:.1f} s into training (last checkpoint: {last})", flush=True)

    straight, resumed = (metrics_by_iteration(read_metrics_records(d)) for d in (straight_dir, crashed_dir))
    summary = {
        "config": os.path.relpath(args.config_file, REPO), "iters": args.iters, "seed": args.seed,
        "checkpoint_period": args.checkpoint_period, "opts": args.opts,
        "kills": kills, "segments": segments, "straight_training_seconds": round(straight_seconds, 1),
        "logs": compare_logs(straight, resumed, args.rtol),
        "final_metrics": {"uninterrupted": final_metrics(straight), "interrupted": final_metrics(resumed)},
        "weights": compare_weights(os.path.join(straight_dir, "model_final.pth"),
                                   os.path.join(crashed_dir, "model_final.pth")),
    }
    summary["ok"] = bool(summary["logs"]["ok"] and summary["weights"].get("ok"))
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    fm = summary["final_metrics"]
    print(f"[crash_test] {len(kills)} kills, {segments} segments; {summary['logs']['values_compared']} logged values "
          f"compared, max relative difference {summary['logs']['max_rel_diff']:.3g}; final weights max |diff| "
          f"{summary['weights'].get('max_abs_diff')}")
    for name in ("uninterrupted", "interrupted"):
        m = fm[name]
        print(f"[crash_test]   {name:>13}: AP {m.get('bbox/AP', float('nan')):.2f}  AP50 {m.get('bbox/AP50', float('nan')):.2f}"
              f"  AP75 {m.get('bbox/AP75', float('nan')):.2f}")
    print(f"[crash_test] {'PASS' if summary['ok'] else 'FAIL'}; details in {os.path.join(args.output, 'summary.json')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
