#!/usr/bin/env python
"""Draw a model's predictions on images of a registered dataset (PNG files), with Detectron2's
DefaultPredictor and Visualizer. ``MODEL.WEIGHTS`` is loaded by ``Dinodet2Checkpointer`` (no code
runs from the file; LoRA and trainable-only checkpoints load as in training). With
``TEST.SLICED.ENABLED True`` the predictions come from sliced inference (``TEST.SLICED.*``).

    python tools/visualize_predictions.py --config-file configs/Demo/detr_shapes_tiny.yaml \
        --output output/demo/predictions MODEL.WEIGHTS output/demo/model_final.pth
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.data import check_datasets_exist  # noqa: E402
from dinodet2.engine import build_predictor  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--dataset", default=None, help="registered dataset (default: first of DATASETS.TEST)")
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS path")
    args = parser.parse_args(argv)

    cfg = load_dinodet2_config(args.config_file, args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    check_datasets_exist([dataset])
    predictor = build_predictor(cfg)
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(args.output, exist_ok=True)
    for record in DatasetCatalog.get(dataset)[: args.num_images]:
        image_bgr = cv2.imread(record["file_name"])
        if image_bgr is None:
            raise FileNotFoundError(f"Cannot read image {record['file_name']} of dataset '{dataset}'.")
        instances = predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= args.score_threshold]
        vis = Visualizer(image_bgr[:, :, ::-1], metadata=metadata, scale=2.0)
        drawn = vis.draw_instance_predictions(instances).get_image()
        path = os.path.join(args.output, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png")
        cv2.imwrite(path, drawn[:, :, ::-1])
        print(f"{path}: {len(instances)} detections with score >= {args.score_threshold}")


if __name__ == "__main__":
    main()
