"""Data-loading cost of each augmentation: the training mapper's time per image, in one process.

Maps the same images of a config's training set with every variant (after a warm-up pass so
file caching does not count) and prints / writes the milliseconds per image, images per second
and the overhead over no augmentation::

    python benchmarks/augmentation_throughput.py                       # demo data, 300 images
    python benchmarks/augmentation_throughput.py --config-file my.yaml --num-images 500

Multiply images per second by DATALOADER.NUM_WORKERS for the loader's rate with that many
workers (the mapper is all a worker does).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.data import DetrDatasetMapper, check_datasets_exist, train_dataset_dicts  # noqa: E402

VARIANTS = {
    "none": [],
    "photometric": ["INPUT.AUG.PHOTOMETRIC.ENABLED", True],
    "lsj": ["INPUT.AUG.LSJ.ENABLED", True, "INPUT.AUG.LSJ.SIZE", 224],
    "mosaic": ["INPUT.AUG.MOSAIC.ENABLED", True, "INPUT.AUG.MOSAIC.PROB", 1.0, "INPUT.AUG.MOSAIC.SIZE", 224],
    "mixup": ["INPUT.AUG.MIXUP.ENABLED", True, "INPUT.AUG.MIXUP.PROB", 1.0],
    "cutmix": ["INPUT.AUG.CUTMIX.ENABLED", True, "INPUT.AUG.CUTMIX.PROB", 1.0],
    "copy_paste": ["INPUT.AUG.COPY_PASTE.ENABLED", True, "INPUT.AUG.COPY_PASTE.PROB", 1.0],
    "all_multi_image": ["INPUT.AUG.MOSAIC.ENABLED", True, "INPUT.AUG.MOSAIC.PROB", 1.0, "INPUT.AUG.MOSAIC.SIZE", 224,
                        "INPUT.AUG.MIXUP.ENABLED", True, "INPUT.AUG.MIXUP.PROB", 1.0,
                        "INPUT.AUG.CUTMIX.ENABLED", True, "INPUT.AUG.CUTMIX.PROB", 1.0,
                        "INPUT.AUG.COPY_PASTE.ENABLED", True, "INPUT.AUG.COPY_PASTE.PROB", 1.0],
}


def time_mapper(cfg, dataset, num_images: int, seed: int = 0) -> float:
    """Seconds per image of the training mapper of ``cfg`` over the first ``num_images`` dicts."""
    mapper = DetrDatasetMapper(cfg, is_train=True, dataset_dicts=dataset)
    np.random.seed(seed)
    records = [dataset[i % len(dataset)] for i in range(num_images)]
    start = time.perf_counter()
    for record in records:
        mapper(record)
    return (time.perf_counter() - start) / num_images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(REPO / "configs/Demo/detr_shapes_tiny_improved.yaml"))
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", default="output/augmentation_throughput.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every variant")
    args = parser.parse_args()

    base = load_dinodet2_config(args.config_file, args.opts)
    check_datasets_exist(list(base.DATASETS.TRAIN))
    dataset = train_dataset_dicts(base)
    time_mapper(base, dataset, min(args.num_images, len(dataset)))  # warm-up: file cache, imports
    results = {}
    for name in args.variants:
        cfg = load_dinodet2_config(args.config_file, list(args.opts) + VARIANTS[name])
        seconds = time_mapper(cfg, dataset, args.num_images)
        results[name] = {"ms_per_image": round(1000 * seconds, 2), "images_per_s": round(1 / seconds, 1)}
    reference = results.get("none", {}).get("ms_per_image")
    lines = ["| augmentation | ms / image | images / s (1 worker) | overhead vs none |", "|---|--:|--:|--:|"]
    for name, r in results.items():
        overhead = f"{r['ms_per_image'] - reference:+.2f} ms" if reference is not None else "n/a"
        lines.append(f"| {name} | {r['ms_per_image']:.2f} | {r['images_per_s']:.0f} | {overhead} |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Path(args.output).write_text(json.dumps({"config": args.config_file, "num_images": args.num_images,
                                             "results": results}, indent=2))


if __name__ == "__main__":
    main()
