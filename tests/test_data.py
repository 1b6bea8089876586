"""Tests of dinodet2.data: the shapes dataset, dataset checks and DetrDatasetMapper."""
import json
import logging
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetFromList, MapDataset, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode

from dinodet2.config import add_dinodet2_config
from dinodet2.data.checks import DatasetNotRegisteredError, check_datasets_exist
from dinodet2.data.mapper import DetrDatasetMapper
from dinodet2.data.shapes import (
    SHAPES_CLASSES,
    generate_shapes_dataset,
    prepare_shapes_dataset,
    register_shapes_dataset,
    register_shapes_datasets,
    render_shapes_image,
)


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _unregister(name):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ------------------------------------------------------------------------------------------------
# shapes dataset
# ------------------------------------------------------------------------------------------------
def test_generation_is_deterministic(tmp_path):
    json_a = generate_shapes_dataset(tmp_path / "a", "val", num_images=6, seed=3)
    json_b = generate_shapes_dataset(tmp_path / "b", "val", num_images=6, seed=3)
    with open(json_a, "rb") as fa, open(json_b, "rb") as fb:
        assert fa.read() == fb.read()
    for image in _load_json(json_a)["images"]:
        np.testing.assert_array_equal(
            _pixels(tmp_path / "a" / "val" / image["file_name"]),
            _pixels(tmp_path / "b" / "val" / image["file_name"]),
        )
    other = _load_json(generate_shapes_dataset(tmp_path / "c", "val", num_images=6, seed=4))
    assert other["annotations"] != _load_json(json_a)["annotations"]


def test_boxes_are_tight_and_images_rectangular(tmp_path):
    seed, num_images = 5, 8
    dataset = _load_json(generate_shapes_dataset(tmp_path, "train", num_images, seed))
    assert [c["name"] for c in sorted(dataset["categories"], key=lambda c: c["id"])] == list(
        SHAPES_CLASSES
    )
    assert [c["id"] for c in dataset["categories"]] == [1, 2, 3]
    assert len({a["id"] for a in dataset["annotations"]}) == len(dataset["annotations"])
    for index, image_info in enumerate(dataset["images"]):
        rendered, objects = render_shapes_image(seed, index)
        height, width = rendered.shape[:2]
        assert (image_info["height"], image_info["width"]) == (height, width)
        assert height != width and 128 <= min(height, width) and max(height, width) <= 192
        on_disk = _pixels(tmp_path / "train" / image_info["file_name"]).astype(np.float64)
        annotations = [a for a in dataset["annotations"] if a["image_id"] == image_info["id"]]
        assert 1 <= len(annotations) == len(objects) <= 4
        for anno, obj in zip(annotations, objects):
            mask = obj["mask"]
            assert anno["category_id"] == obj["category_id"]
            # Fully visible: no later shape painted over this one.
            assert (rendered[mask] == obj["color"]).all()
            # The JPEG on disk shows the shape (up to compression error).
            assert np.abs(on_disk[mask].mean(axis=0) - obj["color"]).max() < 8
            x, y, w, h = anno["bbox"]
            assert 15 <= w <= 70 and 15 <= h <= 70
            ys, xs = np.nonzero(mask)
            # Every shape pixel [c, c+1) lies in the box and the shape touches all four edges.
            assert xs.min() >= x and xs.max() + 1 <= x + w
            assert ys.min() >= y and ys.max() + 1 <= y + h
            assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
            assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
            assert anno["area"] == mask.sum()
            # The RLE segmentation is the exact mask.
            np.testing.assert_array_equal(mask_util.decode(anno["segmentation"]).astype(bool), mask)


def test_generation_is_idempotent(tmp_path):
    json_file = generate_shapes_dataset(tmp_path, "val", num_images=4, seed=0)
    image_file = tmp_path / "val" / "000000.jpg"
    stamps = (os.stat(json_file).st_mtime_ns, os.stat(image_file).st_mtime_ns)
    assert generate_shapes_dataset(tmp_path, "val", num_images=4, seed=0) == json_file
    assert (os.stat(json_file).st_mtime_ns, os.stat(image_file).st_mtime_ns) == stamps
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]

    # Different parameters regenerate.
    generate_shapes_dataset(tmp_path, "val", num_images=5, seed=0)
    assert _load_json(json_file)["info"]["num_images"] == 5
    assert len(_load_json(json_file)["images"]) == 5

    # A truncated JSON (e.g. written by something interrupted) or a missing image regenerates.
    with open(json_file, "r+") as f:
        f.truncate(100)
    generate_shapes_dataset(tmp_path, "val", num_images=5, seed=0)
    assert len(_load_json(json_file)["images"]) == 5
    os.remove(image_file)
    generate_shapes_dataset(tmp_path, "val", num_images=5, seed=0)
    assert image_file.is_file()


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    generate_shapes_dataset(tmp_path, "val", num_images=60, seed=1)
    assert time.perf_counter() - start < 5.0


@pytest.fixture
def tmp_dataset_name():
    name = "shapes_unittest"
    _unregister(name)
    yield name
    _unregister(name)


def test_loader_through_dataset_catalog(tmp_path, tmp_dataset_name):
    register_shapes_dataset(tmp_dataset_name, tmp_path, "mini", num_images=10, seed=0)
    register_shapes_dataset(tmp_dataset_name, tmp_path, "mini", num_images=10, seed=0)  # no-op
    assert not (tmp_path / "annotations").exists()  # lazily generated

    dicts = DatasetCatalog.get(tmp_dataset_name)
    assert len(dicts) == 10
    assert os.path.isfile(MetadataCatalog.get(tmp_dataset_name).json_file)
    category_ids = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert category_ids == {0, 1, 2}
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert d["width"] != d["height"]
        for anno in d["annotations"]:
            assert anno["bbox_mode"] == BoxMode.XYWH_ABS and anno["iscrowd"] == 0
    metadata = MetadataCatalog.get(tmp_dataset_name)
    assert metadata.thing_classes == list(SHAPES_CLASSES)
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert metadata.evaluator_type == "coco"


@pytest.fixture
def restore_shapes_registration():
    original_root = MetadataCatalog.get("shapes_train").shapes_params["root"]
    yield
    register_shapes_datasets(original_root)


def test_register_shapes_datasets_uses_detectron2_datasets(
    tmp_path, monkeypatch, restore_shapes_registration
):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_shapes_datasets()
    register_shapes_datasets()  # idempotent
    root = tmp_path / "shapes"
    assert MetadataCatalog.get("shapes_val").json_file == str(
        root / "annotations" / "instances_val.json"
    )
    assert MetadataCatalog.get("shapes_train").image_root == str(root / "train")

    assert prepare_shapes_dataset("shapes_val") == str(root / "annotations" / "instances_val.json")
    assert len(_load_json(root / "annotations" / "instances_val.json")["images"]) == 60
    check_datasets_exist(["shapes_val"])  # already prepared: nothing to do, no error


# ------------------------------------------------------------------------------------------------
# dataset checks
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def coco_dataset_name():
    name = "missing_files_unittest"
    _unregister(name)
    yield name
    _unregister(name)


def test_missing_json_error_is_actionable(tmp_path, monkeypatch, coco_dataset_name):
    json_file = str(tmp_path / "annotations" / "instances.json")
    register_coco_instances(coco_dataset_name, {}, json_file, str(tmp_path / "images"))

    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with pytest.raises(FileNotFoundError) as error:
        check_datasets_exist([coco_dataset_name])
    message = str(error.value)
    for expected in (coco_dataset_name, json_file, "DETECTRON2_DATASETS", "./datasets",
                     "datasets/README.md"):
        assert expected in message

    monkeypatch.setenv("DETECTRON2_DATASETS", "/data/d2")
    with pytest.raises(FileNotFoundError, match="/data/d2"):
        check_datasets_exist(coco_dataset_name)


def test_missing_image_root_error(tmp_path, coco_dataset_name):
    json_file = tmp_path / "instances.json"
    json_file.write_text("{}")
    register_coco_instances(coco_dataset_name, {}, str(json_file), str(tmp_path / "images"))
    with pytest.raises(FileNotFoundError, match="image_root.*images"):
        check_datasets_exist([coco_dataset_name])
    (tmp_path / "images").mkdir()
    check_datasets_exist([coco_dataset_name])


def test_unregistered_dataset_error():
    with pytest.raises(KeyError) as error:
        check_datasets_exist(["no_such_dataset_unittest"])
    assert isinstance(error.value, DatasetNotRegisteredError)
    assert "no_such_dataset_unittest" in str(error.value)
    assert "register_coco_instances" in str(error.value)


# ------------------------------------------------------------------------------------------------
# DetrDatasetMapper
# ------------------------------------------------------------------------------------------------
IMAGE_W, IMAGE_H = 160, 128  # resized to 200 x 160 (shortest edge 160): scale 1.25


@pytest.fixture(scope="module")
def cfg():
    cfg = add_dinodet2_config(get_cfg())
    cfg.INPUT.MIN_SIZE_TRAIN = (160,)
    cfg.INPUT.MAX_SIZE_TRAIN = 256
    cfg.INPUT.MIN_SIZE_TEST = 160
    cfg.INPUT.MAX_SIZE_TEST = 256
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


class _WarningCollector(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def mapper_warnings():
    """Messages the mapper warns with (collected on its own logger, so this works whatever the
    logging setup of the "dinodet2" / root loggers is)."""
    logger = logging.getLogger("dinodet2.data.mapper")
    collector = _WarningCollector()
    logger.addHandler(collector)
    yield collector.messages
    logger.removeHandler(collector)


def _write_image(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8)).save(path)
    return str(path)


def _dataset_dict(file_name, annotations=None):
    record = {"file_name": file_name, "height": IMAGE_H, "width": IMAGE_W, "image_id": 1}
    if annotations is not None:
        record["annotations"] = annotations
    return record


def _anno(bbox, category_id=0, **extra):
    return {"bbox": bbox, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category_id, **extra}


def test_mapper_clips_and_drops_boxes(tmp_path, cfg, mapper_warnings):
    file_name = _write_image(tmp_path / "boxes.jpg")
    annotations = [
        _anno([10, 20, 30, 40], 0),  # inside
        _anno([-10, 100, 50, 40], 1),  # partly outside: clipped to [0, 100, 40, 128]
        _anno([50, 50, 0.5, 10], 2),  # degenerate
        _anno([200, 10, 20, 20], 2),  # outside: empty after clipping
        _anno([10, 10, float("nan"), 10], 2),  # non-finite
        _anno([159, 10, 5, 5], 2),  # 1 px wide after clipping
        _anno([10, 10, 30, 30], 2, iscrowd=1),  # crowd
        _anno([120, 0, 40, 128], 1),  # exactly the image border
    ]
    mapped = DetrDatasetMapper(cfg, is_train=True)(_dataset_dict(file_name, annotations))

    assert mapped["image"].shape == (3, 160, 200)
    instances = mapped["instances"]
    expected = torch.tensor(
        [[12.5, 25.0, 50.0, 75.0], [0.0, 125.0, 50.0, 160.0], [150.0, 0.0, 200.0, 160.0]]
    )
    torch.testing.assert_close(instances.gt_boxes.tensor, expected)
    assert instances.gt_classes.tolist() == [0, 1, 1]
    warnings = [m for m in mapper_warnings if "boxes.jpg" in m]
    assert len(warnings) == 1 and "Dropped 4 annotation(s)" in warnings[0]


@pytest.mark.parametrize("annotations", [[], None], ids=["empty-list", "no-key"])
def test_mapper_image_without_annotations(tmp_path, cfg, annotations):
    file_name = _write_image(tmp_path / "empty.jpg")
    mapped = DetrDatasetMapper(cfg, is_train=True)(_dataset_dict(file_name, annotations))
    instances = mapped["instances"]
    assert len(instances) == 0
    assert instances.image_size == (160, 200)
    assert instances.gt_boxes.tensor.shape == (0, 4)
    assert instances.gt_classes.shape == (0,) and instances.gt_classes.dtype == torch.int64


def test_mapper_inference_drops_annotations(tmp_path, cfg):
    file_name = _write_image(tmp_path / "test.jpg")
    mapped = DetrDatasetMapper(cfg, is_train=False)(
        _dataset_dict(file_name, [_anno([10, 20, 30, 40])])
    )
    assert mapped["image"].shape == (3, 160, 200)
    assert "instances" not in mapped and "annotations" not in mapped


def _make_bad_image(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "corrupt":
        path.write_bytes(b"this is not a jpeg" * 20)
    elif kind == "truncated":
        data = open(_write_image(path), "rb").read()
        path.write_bytes(data[: len(data) // 2])
    return str(path)  # kind == "missing": never written


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "missing"])
def test_mapper_bad_image_in_training_is_skipped(tmp_path, cfg, mapper_warnings, kind):
    file_name = _make_bad_image(tmp_path, kind)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    assert mapper(_dataset_dict(file_name, [_anno([10, 20, 30, 40])])) is None
    assert any(file_name in m for m in mapper_warnings)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "missing"])
def test_mapper_bad_image_in_inference_raises(tmp_path, cfg, kind):
    file_name = _make_bad_image(tmp_path, kind)
    mapper = DetrDatasetMapper(cfg, is_train=False)
    with pytest.raises(RuntimeError, match="annotation JSON") as error:
        mapper(_dataset_dict(file_name))
    assert file_name in str(error.value)


def test_map_dataset_retries_after_bad_image(tmp_path, cfg):
    bad = _dataset_dict(_make_bad_image(tmp_path, "corrupt"), [])
    good = _dataset_dict(_write_image(tmp_path / "good.jpg"), [_anno([10, 20, 30, 40])])
    dataset = MapDataset(DatasetFromList([bad, good]), DetrDatasetMapper(cfg, is_train=True))
    assert dataset[0]["file_name"] == good["file_name"]
