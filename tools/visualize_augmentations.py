#!/usr/bin/env python
"""Write a grid of augmented training samples of any config (PNG), boxes drawn with Detectron2's
Visualizer: exactly what the model sees (the training mapper with every INPUT.AUG.* setting).

    python tools/visualize_augmentations.py --config-file configs/Demo/detr_shapes_tiny.yaml \
        --output output/aug_grid.png INPUT.AUG.MOSAIC.ENABLED True INPUT.AUG.MOSAIC.PROB 1.0

Labels show the class name, and the loss weight when MixUp label weighting is on. ``--no-strong``
shows the samples of the last iterations (multi-image augmentations switched off).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import convert_image_to_rgb  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from PIL import Image  # noqa: E402

from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.data import DetrDatasetMapper, check_datasets_exist, train_dataset_dicts  # noqa: E402


def draw_sample(mapped, metadata, image_format, scale=1.0):
    """RGB uint8 image of one mapper output with its ground-truth boxes and labels."""
    image = convert_image_to_rgb(mapped["image"].permute(1, 2, 0).numpy(), image_format)
    inst = mapped["instances"]
    names = metadata.get("thing_classes", None)
    labels = [names[c] if names else str(c) for c in inst.gt_classes.tolist()]
    if inst.has("gt_weights"):
        labels = [f"{label} w={w:.2f}" for label, w in zip(labels, inst.gt_weights.tolist())]
    vis = Visualizer(image, metadata=metadata, scale=scale)
    return vis.overlay_instances(boxes=inst.gt_boxes.tensor.numpy(), labels=labels).get_image()


def make_grid(tiles, cols, pad_value=255, gap=4):
    """Tiles (HxWx3 uint8, any sizes) in a grid of ``cols`` columns, each padded to the largest."""
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), pad_value, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * (h + gap):r * (h + gap) + tile.shape[0], c * (w + gap):c * (w + gap) + tile.shape[1]] = tile
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--num-images", type=int, default=12)
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation randomness")
    parser.add_argument("--scale", type=float, default=1.0, help="drawing scale of each sample")
    parser.add_argument("--no-strong", action="store_true", help="multi-image augmentations off")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.cols < 1:
        parser.error("--num-images and --cols must be >= 1")

    cfg = load_dinodet2_config(args.config_file, args.opts)
    check_datasets_exist(list(cfg.DATASETS.TRAIN))
    dataset = train_dataset_dicts(cfg)
    mapper = DetrDatasetMapper(cfg, is_train=True, dataset_dicts=dataset, strong_augmentation=not args.no_strong)
    metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    np.random.seed(args.seed)  # the mapper's (and Detectron2 augmentations') random generator
    tiles = []
    for index in np.random.permutation(len(dataset))[: args.num_images]:
        mapped = mapper(dataset[int(index)])
        if mapped is not None:
            tiles.append(draw_sample(mapped, metadata, cfg.INPUT.FORMAT, args.scale))
    if not tiles:
        raise RuntimeError(f"No readable training image in {list(cfg.DATASETS.TRAIN)}.")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(make_grid(tiles, min(args.cols, len(tiles)))).save(args.output)
    print(f"{args.output}: {len(tiles)} augmented samples of {list(cfg.DATASETS.TRAIN)}")
    return args.output


if __name__ == "__main__":
    main()
