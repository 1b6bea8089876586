"""Convergence of the decoder variants on the embedded demo dataset (``shapes``), same iteration budget.

Trains every variant with ``tools/train_net.py`` (one after the other, so timings are comparable),
reads the final COCOEvaluator result that Detectron2's EvalHook writes to ``metrics.json`` and
the training speed from the same file, and prints / writes a Markdown table and JSON::

    python benchmarks/decoder_convergence.py                      # all variants, 1000 iterations
    python benchmarks/decoder_convergence.py --iters 300 --variants seed improved

Variants (all on configs/Demo/detr_shapes_tiny.yaml's backbone, data and optimiser):

* ``seed``: the seed's DETR decoder (learned queries, softmax CE, standard attention)
* ``two_stage``: two-stage query selection + iterative refinement, focal loss (the demo config)
* ``anchor_dn``: DAB anchor queries + contrastive denoising, focal loss, standard attention
* ``deformable_two_stage``: 3-level pyramid, deformable encoder layer + decoder, two-stage, focal
* ``improved``: configs/Demo/detr_shapes_tiny_improved.yaml (the above + denoising,
  look-forward-twice and the IoU-aware varifocal loss)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dinodet2.benchmarking.training_runs import (bbox_metrics, fixed_budget_overrides,  # noqa: E402
                                                  median_iteration_seconds, read_metrics_records, train_net_command)

DEMO = "configs/Demo/detr_shapes_tiny.yaml"
IMPROVED = "configs/Demo/detr_shapes_tiny_improved.yaml"

VARIANTS = {
    "seed": (DEMO, ["MODEL.DETR.TWO_STAGE", "False", "MODEL.DETR.CLASS_LOSS", "ce",
                    "MODEL.DETR.CLASS_WEIGHT", "1.0", "MODEL.DETR.COST_CLASS", "1.0"]),
    "two_stage": (DEMO, []),
    "anchor_dn": (DEMO, ["MODEL.DETR.TWO_STAGE", "False", "MODEL.DETR.ANCHOR_QUERIES", "True",
                         "MODEL.DETR.DN.ENABLED", "True", "MODEL.DETR.DN.NUM_QUERIES", "40"]),
    "deformable_two_stage": (IMPROVED, ["MODEL.DETR.DN.ENABLED", "False", "MODEL.DETR.LOOK_FORWARD_TWICE", "False",
                                        "MODEL.DETR.CLASS_LOSS", "focal"]),
    "improved": (IMPROVED, []),
}


def read_metrics(output_dir: Path) -> dict:
    """Final bbox metrics and median training time per iteration from Detectron2's metrics.json."""
    records = read_metrics_records(output_dir)
    return {**bbox_metrics(records), "s_per_iter": median_iteration_seconds(records)}


def train_variant(name: str, cmd: list, run_dir: Path) -> dict:
    """Run one training command (output silenced) and return its metrics, wall time and command."""
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    result = {**read_metrics(run_dir), "wall_s": round(time.time() - start, 1), "command": " ".join(cmd[1:])}
    print(name, json.dumps({k: v for k, v in result.items() if k != "command"}), flush=True)
    return result


def write_results(out_root: Path, results: dict) -> None:
    """Print the Markdown table of ``results`` and write it and the JSON under ``out_root``."""
    lines = ["| variant | AP | AP50 | AP75 | APs | APm | APl | s/iter | wall |", "|---|" + ":--:|" * 8]
    for name, r in results.items():
        cells = [f"{r.get(k, float('nan')):.2f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['s_per_iter']:.2f} | {r['wall_s'] / 60:.1f} min |")
    table = "\n".join(lines)
    print(table)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.json").write_text(json.dumps(results, indent=2))
    (out_root / "results.md").write_text(table + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--output-dir", default="output/decoder_convergence")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for every variant")
    args = parser.parse_args()

    out_root = REPO / args.output_dir
    results = {}
    for name in args.variants:
        config, overrides = VARIANTS[name]
        run_dir = out_root / name
        cmd = train_net_command(config, [*overrides, *fixed_budget_overrides(args.iters, run_dir, args.lr),
                                         *args.opts])
        results[name] = train_variant(name, cmd, run_dir)
    write_results(out_root, results)


if __name__ == "__main__":
    main()
