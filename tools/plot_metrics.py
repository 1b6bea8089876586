#!/usr/bin/env python
"""Plot a training run's curves from ``OUTPUT_DIR/metrics.json`` (what Detectron2's JSONWriter
logs) into one PNG: the total loss and the main (final decoder layer) losses over iterations, and
the COCO box AP / AP50 / AP75 of every evaluation.

    python tools/plot_metrics.py output/demo                  # writes output/demo/metrics.png
    python tools/plot_metrics.py output/demo --output curves.png --losses total_loss loss_class_enc

The same scalars are in TensorBoard (``tensorboard --logdir output/demo``); this script is for a
picture without a server. An iteration logged again after ``--resume`` keeps its last values.
Needs matplotlib (a dependency of dinodet2's setup.py).
"""
import argparse
import math
import os
import re
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinodet2.benchmarking.training_runs import metrics_by_iteration, read_metrics_records  # noqa: E402

# The total loss and the final decoder layer's losses (loss_class, loss_bbox, loss_giou, ...):
# one word after "loss_"; auxiliary-layer ("_0"), encoder ("_enc") and denoising ("_dn") copies
# have a suffix.
_MAIN_LOSS = re.compile(r"^(total_loss|loss_[a-z]+)$")
AP_KEYS = ("bbox/AP", "bbox/AP50", "bbox/AP75")


def main_loss_keys(entries: Dict[int, Dict]) -> List[str]:
    """The total and main loss names logged in ``entries``, ``total_loss`` first."""
    keys = {k for scalars in entries.values() for k in scalars if _MAIN_LOSS.match(k)}
    return sorted(keys, key=lambda k: (k != "total_loss", k))


def series(entries: Dict[int, Dict], key: str):
    """(iterations, values) of the finite values of ``key``, by iteration."""
    points = [(it, float(s[key])) for it, s in sorted(entries.items())
              if isinstance(s.get(key), (int, float)) and math.isfinite(float(s[key]))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(output_dir: str, png_path: str, loss_keys: Sequence[str] = (), title: str = "") -> str:
    """Write the loss / AP figure of ``output_dir/metrics.json`` to ``png_path``; returns it.
    ``loss_keys``: the losses to draw (default :func:`main_loss_keys`)."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("tools/plot_metrics.py needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = metrics_by_iteration(read_metrics_records(output_dir))
    loss_keys = list(loss_keys) or main_loss_keys(entries)
    if not any(series(entries, k)[0] for k in loss_keys):
        raise SystemExit(f"{os.path.join(output_dir, 'metrics.json')} logs none of the losses {loss_keys}.")
    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys:
        its, values = series(entries, key)
        loss_ax.plot(its, values, label=key, linewidth=2.0 if key == "total_loss" else 1.2)
    loss_ax.set(xlabel="iteration", ylabel="loss (median of the logging window)", title="losses")
    if all(v > 0 for k in loss_keys for v in series(entries, k)[1]):
        loss_ax.set_yscale("log")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=8)
    drawn = False
    for key in AP_KEYS:
        its, values = series(entries, key)
        if its:
            ap_ax.plot(its, values, marker="o", label=key.split("/", 1)[1])
            drawn = True
    if drawn:
        ap_ax.legend(fontsize=8)
        last_iteration = max(entries)
        ap_ax.set_xlim(0, last_iteration * 1.05 + 1)
        ap_ax.set_ylim(0, 100)
    else:
        ap_ax.text(0.5, 0.5, "no evaluation logged\n(TEST.EVAL_PERIOD / final evaluation)",
                   ha="center", va="center", transform=ap_ax.transAxes)
    ap_ax.set(xlabel="iteration", ylabel="COCO box AP (%)", title="evaluation")
    ap_ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a training run's OUTPUT_DIR (holding metrics.json)")
    parser.add_argument("--output", default="", help="PNG to write (default: OUTPUT_DIR/metrics.png)")
    parser.add_argument("--losses", nargs="*", default=[],
                        help="loss names to draw (default: total_loss and the main losses)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.output_dir, "metrics.json")):
        raise SystemExit(f"No metrics.json in {args.output_dir}: pass a training run's OUTPUT_DIR.")
    path = plot_metrics(args.output_dir, args.output or os.path.join(args.output_dir, "metrics.png"),
                        args.losses, args.title)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
