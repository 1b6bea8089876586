"""tools/demo.py: a trained model on a folder of images and on a video; class names stored with
the checkpoint; merged LoRA checkpoints carry them over."""
import json
import logging

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from dinodet2.config import load_dinodet2_config
from dinodet2.engine import Dinodet2Checkpointer, build_predictor, class_names_of, model_class_names

from conftest import load_tool, make_tiny_cfg, write_images

FRUIT = ["apple", "pear", "plum"]
TRAIN_SET = "demo_test_fruit_train"  # registered only while the checkpoint is written


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA model "trained" on an unregistered custom dataset: checkpoint + config.yaml."""
    tmp = tmp_path_factory.mktemp("demo_model")
    torch.manual_seed(0)
    cfg = make_tiny_cfg()
    cfg.DATASETS.TRAIN = (TRAIN_SET,)
    cfg.OUTPUT_DIR = str(tmp)
    model = build_model(cfg)
    MetadataCatalog.get(TRAIN_SET).thing_classes = FRUIT
    try:
        Dinodet2Checkpointer(model, str(tmp), cfg=cfg).save("model_final")
    finally:
        MetadataCatalog.remove(TRAIN_SET)
    cfg.MODEL.WEIGHTS = str(tmp / "model_final.pth")
    (tmp / "config.yaml").write_text(cfg.dump())
    return tmp


def _write_images(folder):
    sizes = {"a.png": (70, 98), "b.jpg": (96, 64), "c.png": (80, 80)}
    write_images(folder, sizes)
    (folder / "notes.txt").write_text("not an image")
    return sorted(sizes)


def _xywh(instances):
    x0, y0, x1, y1 = instances.pred_boxes.tensor.unbind(1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], 1)


def test_demo_on_a_folder_matches_the_predictor(trained, tmp_path):
    names = _write_images(tmp_path / "images")
    cfg = load_dinodet2_config(str(trained / "config.yaml"))
    predictor = build_predictor(cfg)
    expected = {n: predictor(cv2.imread(str(tmp_path / "images" / n)))["instances"] for n in names}
    scores = torch.cat([inst.scores for inst in expected.values()])
    threshold = scores.median().item()  # some detections pass, some do not

    out = tmp_path / "out"
    json_path = load_tool("demo").main(["--config-file", str(trained / "config.yaml"), "--input",
                                         str(tmp_path / "images"), "--output", str(out),
                                         "--confidence-threshold", str(threshold)])
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["predictions.json"])
    for n in names:  # annotated images have the input's size (scale 1)
        assert cv2.imread(str(out / n)).shape == cv2.imread(str(tmp_path / "images" / n)).shape
    records = json.loads(open(json_path).read())
    for image_id, n in enumerate(names):
        kept = expected[n][expected[n].scores >= threshold]
        mine = [r for r in records if r["file_name"].endswith(n)]
        assert len(mine) == len(kept) and {r["image_id"] for r in mine} <= {image_id}
        assert torch.allclose(torch.tensor([r["bbox"] for r in mine]).reshape(-1, 4), _xywh(kept), atol=1e-4)
        assert [r["score"] for r in mine] == pytest.approx(kept.scores.tolist(), abs=1e-6)
        assert [r["category_id"] for r in mine] == kept.pred_classes.tolist()
    assert 0 < len(records) < len(scores)
    # class names come from the checkpoint: the training dataset is not registered now
    assert TRAIN_SET not in MetadataCatalog.list()
    assert all(r["category_name"] == FRUIT[r["category_id"]] for r in records)


def test_demo_on_a_video_writes_every_frame(trained, tmp_path):
    video_in = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video_in), cv2.VideoWriter_fourcc(*"MJPG"), 5, (80, 64))
    assert writer.isOpened()
    for i in range(4):
        writer.write(np.full((64, 80, 3), 40 * i, np.uint8))
    writer.release()

    video_out = tmp_path / "out" / "annotated.mp4"
    json_path = load_tool("demo").main(["--config-file", str(trained / "config.yaml"), "--video-input",
                                         str(video_in), "--output", str(video_out), "--confidence-threshold", "0"])
    capture = cv2.VideoCapture(str(video_out))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 4 and frames[0].shape == (64, 80, 3)
    records = json.loads(open(json_path).read())
    assert json_path == str(tmp_path / "out" / "annotated.json")
    assert {r["frame"] for r in records} == {0, 1, 2, 3}
    assert all(r["category_name"] in FRUIT for r in records)


def test_class_names_checkpoint_then_dataset_then_numbered(trained, tmp_path, caplog):
    cfg = load_dinodet2_config(str(trained / "config.yaml"), freeze=False)
    assert class_names_of(cfg.MODEL.WEIGHTS) == FRUIT
    assert model_class_names(cfg) == FRUIT

    # a checkpoint without names (saved without cfg): the registered training dataset's names
    Dinodet2Checkpointer(build_model(cfg), str(tmp_path)).save("plain")
    assert class_names_of(str(tmp_path / "plain.pth")) is None
    cfg.MODEL.WEIGHTS = str(tmp_path / "plain.pth")
    cfg.DATASETS.TRAIN = ("shapes_train",)
    assert model_class_names(cfg) == MetadataCatalog.get("shapes_train").thing_classes

    # neither: numbered, with a warning that says how to fix it
    cfg.DATASETS.TRAIN = ("demo_test_not_registered",)
    with caplog.at_level(logging.WARNING, logger="dinodet2"):
        assert model_class_names(cfg) == ["class 0", "class 1", "class 2"]
    assert "not registered" in caplog.text


def test_merged_lora_checkpoint_keeps_names_and_predictions(trained, tmp_path):
    _write_images(tmp_path / "images")
    demo = load_tool("demo")
    original = json.loads(open(demo.main(["--config-file", str(trained / "config.yaml"), "--input",
                                          str(tmp_path / "images" / "*.png"), "--output", str(tmp_path / "a"),
                                          "--confidence-threshold", "0"])).read())
    load_tool("merge_lora").main(["--config-file", str(trained / "config.yaml"), "--weights",
                                   str(trained / "model_final.pth"), "--output-dir", str(tmp_path / "merged"),
                                   "--image-size", "56", "--iters", "0"])
    assert class_names_of(str(tmp_path / "merged" / "model_merged.pth")) == FRUIT
    merged = json.loads(open(demo.main(["--config-file", str(tmp_path / "merged" / "config.yaml"), "--input",
                                        str(tmp_path / "images" / "*.png"), "--output", str(tmp_path / "b"),
                                        "--confidence-threshold", "0"])).read())
    assert len(original) == len(merged) > 0
    assert {r["file_name"].rsplit("/", 1)[1] for r in merged} == {"a.png", "c.png"}  # the glob, not b.jpg
    for r, m in zip(original, merged):
        assert r["category_name"] == m["category_name"] and r["score"] == pytest.approx(m["score"], abs=1e-4)
        assert r["bbox"] == pytest.approx(m["bbox"], abs=1e-3)


def test_demo_input_errors_name_the_argument(tmp_path):
    demo = load_tool("demo")
    with pytest.raises(FileNotFoundError, match="--input .*missing"):
        demo.expand_inputs([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        demo.expand_inputs([str(tmp_path / "empty")])
    assert demo.output_names(["x/a.jpg", "y/a.jpg", "z/a.bmp"]) == ["a.jpg", "a_1.jpg", "a.png"]


def test_a_class_id_without_a_name_is_a_clear_error():
    """A config with fewer classes than the model (e.g. an exported graph run with another config):
    a ValueError naming NUM_CLASSES, not an IndexError from the visualizer."""
    from detectron2.structures import Boxes, Instances

    demo = load_tool("demo")
    instances = Instances((20, 30), pred_boxes=Boxes(torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 4.0, 4.0]])),
                          scores=torch.tensor([0.9, 0.2]), pred_classes=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="class id 4, but the config gives it 3 classes.*NUM_CLASSES"):
        demo.confident({"instances": instances}, 0.5, FRUIT)
    kept = demo.confident({"instances": instances}, 0.5, FRUIT + ["fig", "kiwi"])
    assert kept.pred_classes.tolist() == [1]
    assert demo.detection_records(kept, FRUIT + ["fig", "kiwi"], image_id=0)[0]["category_name"] == "pear"
