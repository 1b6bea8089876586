#!/usr/bin/env python
"""Run a trained dinodet2 model on your own images or a video (after Detectron2's demo/demo.py).

Images (files, globs or folders)::

    python tools/demo.py --config-file output/demo/config.yaml --input photos/ "more/*.jpg" \\
        --output output/demo_images --opts MODEL.WEIGHTS output/demo/model_final.pth

writes one annotated image per input into the ``--output`` folder (same name, PNG/JPEG as the
input; a ``_<n>`` suffix where two inputs share a name) and ``predictions.json``. A video::

    python tools/demo.py --config-file output/demo/config.yaml --video-input clip.mp4 \\
        --output output/clip_annotated.mp4 --opts MODEL.WEIGHTS output/demo/model_final.pth

writes the annotated video (``.mp4``: mp4v, ``.avi``: MJPG; a folder: ``<video name>.mp4`` in it)
and ``<video output without extension>.json``.

The JSON is a COCO-results-style list with one entry per detection scoring at least
``--confidence-threshold``: ``file_name`` (input path), ``output_file``, ``image_id`` (index of the
image in the input order, or of the frame), ``frame`` (videos only), ``bbox`` ([x, y, width, height]
in the original image's pixels), ``score``, ``category_id`` (the model's class index, 0-based) and
``category_name``. Class names come from the checkpoint (stored by dinodet2's trainer), else from the
training dataset's registered metadata, else ``class <i>`` (warned). Weights are ``MODEL.WEIGHTS``
loaded by ``Dinodet2Checkpointer``: full, trainable-only, LoRA and LoRA-merged checkpoints work.

An exported model (``tools/export_model.py``) runs through ONNX Runtime when ``MODEL.WEIGHTS`` ends
in ``.onnx``, with the config it was exported with (its ``INPUT.*`` test resize and format are
used; class names come from the ONNX metadata)::

    python tools/demo.py --config-file output/demo/config.yaml --input photos/ --output output/demo_onnx \
        --opts MODEL.WEIGHTS output/demo/model.onnx

The outputs and the JSON are the same as for the PyTorch model (up to the export's parity). A model
exported at a fixed size only takes images that resize to that size; export with ``--dynamic``.
"""
import argparse
import glob
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import tqdm  # noqa: E402
from detectron2.data import Metadata  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.video_visualizer import VideoVisualizer  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.engine.cpu_allocator import apply_allocator_config  # noqa: E402
from dinodet2.engine import build_predictor, model_class_names  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
logger = logging.getLogger("dinodet2.demo")


def expand_inputs(patterns):
    """Image paths of ``patterns`` (files, globs, folders: their images, sorted), in order, each once."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise FileNotFoundError(f"--input {pattern!r}: no such file or folder.")
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        paths += [p for p in found if p not in paths]
    return paths


def output_names(paths):
    """Output file name of each input: its base name, with ``_<n>`` added where names repeat."""
    used, names = set(), []
    for path in paths:
        stem, ext = os.path.splitext(os.path.basename(path))
        ext = ext if ext.lower() in (".png", ".jpg", ".jpeg") else ".png"
        name, n = stem + ext, 1
        while name in used:
            name, n = f"{stem}_{n}{ext}", n + 1
        used.add(name)
        names.append(name)
    return names


def detection_records(instances, class_names, **fields):
    """COCO-results-style dicts of ``instances`` (boxes XYXY -> XYWH), each with ``fields``."""
    records = []
    boxes = instances.pred_boxes.tensor.tolist()
    for (x0, y0, x1, y1), score, cls in zip(boxes, instances.scores.tolist(), instances.pred_classes.tolist()):
        records.append({**fields, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score, "category_id": cls,
                        "category_name": class_names[cls]})
    return records


def confident(predictions, threshold, class_names):
    """The detections scoring at least ``threshold``, on the CPU. A class id without a name means the
    config does not describe the model (e.g. an exported graph with more classes than its
    ``MODEL.DETR.NUM_CLASSES``): a ValueError says so instead of an IndexError while drawing."""
    instances = predictions["instances"].to("cpu")
    if len(instances) and int(instances.pred_classes.max()) >= len(class_names):
        raise ValueError(
            f"The model predicted class id {int(instances.pred_classes.max())}, but the config gives it "
            f"{len(class_names)} classes (MODEL.DETR.NUM_CLASSES and the stored / dataset class names). Run the "
            "demo with the config the model was trained (and exported) with, e.g. the config.yaml in its "
            "OUTPUT_DIR, or set MODEL.DETR.NUM_CLASSES to the model's class count.")
    return instances[instances.scores >= threshold]


def run_on_images(predictor, paths, output_dir, metadata, threshold):
    os.makedirs(output_dir, exist_ok=True)
    records = []
    for image_id, (path, name) in enumerate(zip(tqdm.tqdm(paths, desc="images"), output_names(paths))):
        image_bgr = cv2.imread(path)
        if image_bgr is None:
            raise FileNotFoundError(f"Cannot read image {path} (not an image OpenCV can decode).")
        instances = confident(predictor(image_bgr), threshold, metadata.thing_classes)
        drawn = Visualizer(image_bgr[:, :, ::-1], metadata=metadata).draw_instance_predictions(instances).get_image()
        out_path = os.path.join(output_dir, name)
        if not cv2.imwrite(out_path, drawn[:, :, ::-1]):
            raise OSError(f"Cannot write {out_path}.")
        records += detection_records(instances, metadata.thing_classes, file_name=path, output_file=out_path,
                                     image_id=image_id)
    json_path = os.path.join(output_dir, "predictions.json")
    return records, json_path


def video_output_path(video_input, output):
    if os.path.isdir(output) or not os.path.splitext(output)[1]:
        os.makedirs(output, exist_ok=True)
        output = os.path.join(output, os.path.splitext(os.path.basename(video_input))[0] + ".mp4")
    if os.path.splitext(output)[1].lower() not in VIDEO_CODECS:
        raise ValueError(f"--output {output!r}: a video is written as {' or '.join(VIDEO_CODECS)} (or give a folder).")
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    return output


def run_on_video(predictor, video_input, output, metadata, threshold):
    video = cv2.VideoCapture(video_input)
    if not video.isOpened():
        raise FileNotFoundError(f"--video-input {video_input!r}: OpenCV cannot open this video.")
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out_path = video_output_path(video_input, output)
    codec = VIDEO_CODECS[os.path.splitext(out_path)[1].lower()]
    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*codec), fps, (width, height), True)
    if not writer.isOpened():
        raise OSError(f"Cannot write {out_path} with codec {codec} in this OpenCV build; try the other extension "
                      f"({', '.join(VIDEO_CODECS)}).")
    visualizer = VideoVisualizer(metadata, ColorMode.IMAGE)
    records = []
    with tqdm.tqdm(total=frames, desc="frames") as progress:
        frame_index = 0
        while True:
            ok, frame_bgr = video.read()
            if not ok:
                break
            instances = confident(predictor(frame_bgr), threshold, metadata.thing_classes)
            drawn = visualizer.draw_instance_predictions(frame_bgr[:, :, ::-1], instances).get_image()
            writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            records += detection_records(instances, metadata.thing_classes, file_name=video_input,
                                         output_file=out_path, image_id=frame_index, frame=frame_index)
            frame_index += 1
            progress.update(1)
    video.release()
    writer.release()
    return records, os.path.splitext(out_path)[0] + ".json"


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, globs (quote them) or folders")
    source.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", required=True,
                        help="folder for the annotated images and predictions.json; for a video: the output video "
                             "file (.mp4/.avi) or a folder")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of a shown detection")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS path/to/model_final.pth (or an "
                             "exported path/to/model.onnx: ONNX Runtime)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="dinodet2")
    cfg = load_dinodet2_config(args.config_file, args.opts)
    apply_allocator_config(cfg)
    metadata = Metadata(name="dinodet2_demo", thing_classes=model_class_names(cfg))
    predictor = build_predictor(cfg)
    if args.video_input:
        records, json_path = run_on_video(predictor, args.video_input, args.output, metadata, args.confidence_threshold)
    else:
        paths = expand_inputs(args.input)
        records, json_path = run_on_images(predictor, paths, args.output, metadata, args.confidence_threshold)
    with open(json_path, "w") as f:
        json.dump(records, f, indent=1)
    logger.info("%d detections with score >= %s; written to %s", len(records), args.confidence_threshold, json_path)
    return json_path


if __name__ == "__main__":
    main()
