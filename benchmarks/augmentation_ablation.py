"""Ablation of the multi-image augmentations and the curriculum on the embedded demo dataset.

Every variant trains configs/Demo/detr_shapes_tiny_improved.yaml (what ``bash tools/dev.sh demo``
trains) for the same number of iterations with ``tools/train_net.py``, one after the other, and
reports the final COCO AP / AP50 on ``shapes_val``::

    python benchmarks/augmentation_ablation.py                  # all variants, 1000 iterations
    python benchmarks/augmentation_ablation.py --iters 300 --variants none mosaic

Variants (schedules scale with ``--iters``):

* ``none``: no multi-image augmentation, no curriculum (the demo as it is)
* ``mosaic`` / ``mixup`` / ``cutmix`` / ``copy_paste``: that augmentation alone, probability 0.5
  (Mosaic cells of 224 px, the demo's training size)
* ``combination``: Mosaic 0.5 + MixUp 0.3 + Copy-Paste 0.5 + photometric distortion, multi-image
  augmentations off for the last 15 % of the iterations
* ``curriculum``: easy-to-hard sampling (30 % of the images growing to all by 30 % of the
  iterations), query ramp-up (5 -> 20 queries by 30 %), staged matching (L1 only to 10 %,
  class-agnostic to 20 %, then full)
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from decoder_convergence import train_variant, write_results  # noqa: E402

from dinodet2.benchmarking.training_runs import fixed_budget_overrides, train_net_command  # noqa: E402

CONFIG = "configs/Demo/detr_shapes_tiny_improved.yaml"


def variants(iters: int) -> dict:
    """Config overrides of every variant for a budget of ``iters`` iterations."""
    def at(fraction):
        return str(max(1, int(round(iters * fraction))))

    mosaic = ["INPUT.AUG.MOSAIC.ENABLED", "True", "INPUT.AUG.MOSAIC.PROB", "0.5", "INPUT.AUG.MOSAIC.SIZE", "224"]
    return {
        "none": [],
        "mosaic": mosaic,
        "mixup": ["INPUT.AUG.MIXUP.ENABLED", "True", "INPUT.AUG.MIXUP.PROB", "0.5"],
        "cutmix": ["INPUT.AUG.CUTMIX.ENABLED", "True", "INPUT.AUG.CUTMIX.PROB", "0.5"],
        "copy_paste": ["INPUT.AUG.COPY_PASTE.ENABLED", "True", "INPUT.AUG.COPY_PASTE.PROB", "0.5"],
        "combination": mosaic + ["INPUT.AUG.MIXUP.ENABLED", "True", "INPUT.AUG.MIXUP.PROB", "0.3",
                                 "INPUT.AUG.COPY_PASTE.ENABLED", "True", "INPUT.AUG.COPY_PASTE.PROB", "0.5",
                                 "INPUT.AUG.PHOTOMETRIC.ENABLED", "True",
                                 "INPUT.AUG.STRONG_OFF_LAST_ITERS", at(0.15)],
        "curriculum": ["CURRICULUM.SAMPLING.ENABLED", "True", "CURRICULUM.SAMPLING.START_FRACTION", "0.3",
                       "CURRICULUM.SAMPLING.RAMP_ITERS", at(0.3),
                       "CURRICULUM.QUERIES.ENABLED", "True", "CURRICULUM.QUERIES.START_QUERIES", "5",
                       "CURRICULUM.QUERIES.RAMP_ITERS", at(0.3),
                       "CURRICULUM.MATCHING.ENABLED", "True", "CURRICULUM.MATCHING.STAGES", "['l1','boxes']",
                       "CURRICULUM.MATCHING.STEPS", f"[{at(0.1)},{at(0.2)}]"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(variants(1)), choices=list(variants(1)))
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--output-dir", default="output/augmentation_ablation")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for every variant")
    args = parser.parse_args()

    out_root = REPO / args.output_dir
    table = variants(args.iters)
    results = {}
    for name in args.variants:
        run_dir = out_root / name
        cmd = train_net_command(CONFIG, [*table[name], *fixed_budget_overrides(args.iters, run_dir), *args.opts])
        results[name] = train_variant(name, cmd, run_dir)
    write_results(out_root, results)


if __name__ == "__main__":
    main()
