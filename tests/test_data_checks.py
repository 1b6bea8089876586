"""Early, clear errors for bad data: a too small MODEL.DETR.NUM_CLASSES, high-bit-depth and unusual
images, an unloadable DINOv2 and datasets that leave nothing to train on."""
import json
import logging
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data.datasets import register_coco_instances

from dinodet2.data import image_io, train_dataset_dicts
from dinodet2.data.image_io import UnreadableImageError, UnsupportedImageError, read_image, to_8bit
from dinodet2.data.mapper import DetrDatasetMapper
from dinodet2.data.multi_image_pipeline import read_sample
from dinodet2.modeling.backbone.dinov2 import load_dinov2_model

IMAGE_W, IMAGE_H = 40, 32
CLASS_NAMES = ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class _LogCollector(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def checks_log():
    """Messages of dinodet2.data.checks (collected on its own logger, whatever the logging setup)."""
    logger = logging.getLogger("dinodet2.data.checks")
    collector = _LogCollector()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(collector)
    yield collector.messages
    logger.removeHandler(collector)
    logger.setLevel(old_level)


@pytest.fixture
def registered():
    """register(name, ...) -> a COCO dataset registered under ``name``; unregistered afterwards."""
    names = []

    def register(name, json_file, image_root):
        _unregister(name)
        register_coco_instances(name, {}, str(json_file), str(image_root))
        names.append(name)
        return name

    yield register
    for name in names:
        _unregister(name)


def _unregister(name):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _write_coco(root, num_images=3, num_categories=5, annotations="per-image", image_writer=None):
    """A tiny COCO dataset under ``root``: ``num_images`` images, ``num_categories`` categories
    (ids 1..K), and annotations: "per-image" (image i has one box of category i % K + 1),
    "mismatched-ids" (their image_id matches no image), "crowd" (all iscrowd) or "none"."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annos = [], []
    for i in range(num_images):
        file_name = f"{i:03d}.png"
        if image_writer is None:
            Image.fromarray(np.full((IMAGE_H, IMAGE_W, 3), 60 + 20 * i, np.uint8)).save(images_dir / file_name)
        else:
            image_writer(images_dir / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": IMAGE_W, "height": IMAGE_H})
        if annotations != "none":
            annos.append({"id": i + 1, "image_id": i + 1 + (1000 if annotations == "mismatched-ids" else 0),
                          "category_id": i % num_categories + 1, "bbox": [4, 4, 20, 16], "area": 320,
                          "iscrowd": int(annotations == "crowd")})
    categories = [{"id": k + 1, "name": CLASS_NAMES[k] if k < len(CLASS_NAMES) else f"c{k}"}
                  for k in range(num_categories)]
    json_file = root / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annos, "categories": categories}))
    return json_file, images_dir


def _png_16bit(array, color_type):
    """A PNG with 16 bits per sample (``color_type`` 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA), written
    by hand: PIL cannot write 16-bit colour PNGs."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _gray16(path, value=32768, box_value=None):
    """A 16-bit grayscale PNG (PIL mode "I;16"): ``value`` everywhere, ``box_value`` in the
    annotated box of :func:`_write_coco`."""
    pixels = np.full((IMAGE_H, IMAGE_W), value, np.uint16)
    if box_value is not None:
        pixels[4:20, 4:24] = box_value
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "I;16"
    return str(path)


def _train_cfg(cfg, name, tmp_path, **overrides):
    cfg.merge_from_list([
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2,
        "SOLVER.CHECKPOINT_PERIOD", 1000, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "out"),
        "INPUT.MIN_SIZE_TRAIN", (56,), "INPUT.MAX_SIZE_TRAIN", 112, "INPUT.MIN_SIZE_TEST", 56,
        "INPUT.MAX_SIZE_TEST", 112, "INPUT.RANDOM_FLIP", "none",
    ])
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


# ------------------------------------------------------------------------------------------------
# 1. MODEL.DETR.NUM_CLASSES smaller than the dataset's categories
# ------------------------------------------------------------------------------------------------
def test_too_small_num_classes_fails_when_the_trainer_is_built(tiny_cfg, tmp_path, registered):
    from dinodet2.engine import Trainer

    name = registered("checks_five_classes", *_write_coco(tmp_path, num_images=5, num_categories=5))
    cfg = _train_cfg(tiny_cfg, name, tmp_path, **{"MODEL.DETR.NUM_CLASSES": 3})
    with pytest.raises(ValueError) as error:
        Trainer(cfg)  # builds the model and the train loader; no iteration runs
    message = str(error.value)
    for expected in ("MODEL.DETR.NUM_CLASSES=3", f"'{name}'", "5 categories (len(thing_classes))",
                     "largest contiguous category_id 4", "needs 5 classes", "MODEL.DETR.NUM_CLASSES 5",
                     str(tmp_path / "instances.json")):
        assert expected in message, (expected, message)


def test_larger_num_classes_is_legal_and_logged(tiny_cfg, tmp_path, registered, checks_log):
    name = registered("checks_three_classes", *_write_coco(tmp_path, num_images=3, num_categories=3))
    cfg = _train_cfg(tiny_cfg, name, tmp_path, **{"MODEL.DETR.NUM_CLASSES": 91})
    assert len(train_dataset_dicts(cfg)) == 3
    assert any("NUM_CLASSES=91" in m and "3 classes" in m for m in checks_log), checks_log

    cfg.MODEL.DETR.NUM_CLASSES = 2
    with pytest.raises(ValueError, match="NUM_CLASSES=2 is too small for DATASETS.TRAIN"):
        train_dataset_dicts(cfg)


def test_too_small_num_classes_fails_on_the_evaluation_path(tiny_cfg, tmp_path, registered):
    from dinodet2.engine import Trainer

    name = registered("checks_eval_five", *_write_coco(tmp_path, num_images=2, num_categories=5))
    cfg = _train_cfg(tiny_cfg, "shapes_train", tmp_path, **{"MODEL.DETR.NUM_CLASSES": 3})
    with pytest.raises(ValueError) as error:
        Trainer.build_test_loader(cfg, name)  # what training-time evaluation and --eval-only call
    message = str(error.value)
    assert "DATASETS.TEST" in message and f"'{name}'" in message and "MODEL.DETR.NUM_CLASSES 5" in message
    cfg.MODEL.DETR.NUM_CLASSES = 5
    assert len(Trainer.build_test_loader(cfg, name)) == 2

    # a training run checks its test sets before iteration 0, not at the first evaluation
    cfg.MODEL.DETR.NUM_CLASSES = 3
    cfg.DATASETS.TEST = (name,)
    with pytest.raises(ValueError, match="too small for DATASETS.TEST"):
        Trainer(cfg)


# ------------------------------------------------------------------------------------------------
# 2. High-bit-depth and unusual images
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, expected", [("BGR", [128, 128, 128]), ("RGB", [128, 128, 128]), ("L", [128])])
def test_16bit_grayscale_png_is_scaled_not_clamped(tmp_path, fmt, expected):
    path = _gray16(tmp_path / "gray16.png", value=32768)
    image = read_image(path, fmt)
    assert image.dtype == np.uint8 and image.shape == (IMAGE_H, IMAGE_W, len(expected))
    assert image[0, 0].tolist() == expected  # round(32768 * 255 / 65535) = 128 (PIL's convert: 255)
    assert read_image(_gray16(tmp_path / "max.png", value=65535), fmt).min() == 255
    assert read_image(_gray16(tmp_path / "dark.png", value=1000), fmt).max() == 4


@pytest.mark.parametrize("color_type, samples, expected_bgr", [
    (2, (1000, 32768, 65535), [255, 128, 3]),  # RGB: PIL keeps the high byte
    (6, (1000, 32768, 65535, 20000), [255, 128, 3]),  # RGBA: alpha dropped, as for 8-bit RGBA
    (4, (32768, 65535), [128, 128, 128]),  # grey + alpha
], ids=["rgb16", "rgba16", "la16"])
def test_16bit_colour_pngs_are_read_at_8_bits(tmp_path, color_type, samples, expected_bgr):
    path = tmp_path / f"colour{color_type}.png"
    path.write_bytes(_png_16bit(np.dstack([np.full((4, 6), s, np.uint16) for s in samples]), color_type))
    assert read_image(str(path), "BGR")[0, 0].tolist() == expected_bgr


@pytest.mark.parametrize("mode, value, expected", [
    ("F", 0.5, 128), ("F", 200.0, 200), ("F", 30000.0, 117), ("I", 200, 200), ("I", 30000, 117),
])
def test_float_and_32bit_images_are_scaled_by_their_range(tmp_path, mode, value, expected):
    pixels = np.full((IMAGE_H, IMAGE_W), value, np.float32 if mode == "F" else np.int32)
    pixels[0, 0] = 0
    path = tmp_path / "wide.tif"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == mode
    image = read_image(str(path), "BGR")
    assert image[1, 1].tolist() == [expected] * 3 and image[0, 0].tolist() == [0, 0, 0]


def test_16bit_png_opened_as_mode_i_by_older_pillow_is_scaled_as_16_bit():
    # Pillow < 10.x opens 16-bit grayscale PNGs as "I"; a PNG cannot hold wider pixels.
    image = Image.fromarray(np.full((2, 2), 200, np.int32))
    assert image.mode == "I"
    assert np.asarray(to_8bit(image, file_format="PNG")).max() == 1  # round(200 * 255 / 65535)
    assert np.asarray(to_8bit(image)).max() == 200  # e.g. a TIFF: [0, 255] is kept as is


@pytest.mark.parametrize("mode, value", [("I", 100000), ("F", 70000.0), ("F", -1.0), ("F", float("nan"))])
def test_images_outside_every_supported_range_are_rejected_naming_the_file(tmp_path, mode, value):
    path = tmp_path / "unsupported.tif"
    Image.fromarray(np.full((4, 4), value, np.float32 if mode == "F" else np.int32)).save(path)
    with pytest.raises(UnsupportedImageError) as error:
        read_image(str(path), "BGR")
    message = str(error.value)
    assert str(path) in message and f"'{mode}'" in message and "Convert it to an 8-bit" in message
    # ... also in training: a data error to fix, not an unreadable file to skip
    record = {"file_name": str(path), "height": 4, "width": 4, "image_id": 1, "annotations": []}
    with pytest.raises(UnsupportedImageError):
        DetrDatasetMapper(_mapper_cfg(), is_train=True)(record)


def _mapper_cfg():
    from detectron2.config import get_cfg

    from dinodet2.config import add_dinodet2_config

    cfg = add_dinodet2_config(get_cfg())
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


def _exif_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.mark.parametrize("kind", ["L", "LA", "P", "P-transparent", "RGBA", "1", "CMYK-jpeg", "rotated-jpeg",
                                  "I;16-rotated"])
def test_other_modes_read_as_detectron2_reads_them(tmp_path, kind):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8))
    if kind == "CMYK-jpeg":
        path = tmp_path / "cmyk.jpg"
        rgb.convert("CMYK").save(path)
    elif kind == "rotated-jpeg":
        path = tmp_path / "rotated.jpg"
        rgb.save(path, exif=_exif_orientation(6))
    elif kind == "P-transparent":
        path = tmp_path / "transparent.png"
        rgb.convert("P").save(path, transparency=0)
    elif kind == "I;16-rotated":
        path = tmp_path / "rotated16.png"
        Image.fromarray(np.full((IMAGE_H, IMAGE_W), 32768, np.uint16)).save(path, exif=_exif_orientation(6))
    else:
        path = tmp_path / f"mode_{kind}.png"
        rgb.convert(kind).save(path)
    for fmt in ("BGR", "RGB", "L"):
        ours = read_image(str(path), fmt)
        if kind == "I;16-rotated":
            assert ours.shape[:2] == (IMAGE_W, IMAGE_H) and (ours == 128).all()  # rotated and scaled
        else:
            np.testing.assert_array_equal(ours, d2_utils.read_image(str(path), fmt))
    if kind == "rotated-jpeg":
        assert ours.shape[:2] == (IMAGE_W, IMAGE_H)


def test_mapper_and_multi_image_reader_scale_16bit_pngs(tmp_path):
    path = _gray16(tmp_path / "gray16.png", value=32768)
    record = {"file_name": path, "height": IMAGE_H, "width": IMAGE_W, "image_id": 1,
              "annotations": [{"bbox": [4, 4, 20, 16], "bbox_mode": 1, "category_id": 0}]}
    cfg = _mapper_cfg()
    for is_train in (True, False):
        mapped = DetrDatasetMapper(cfg, is_train=is_train)(dict(record))
        assert mapped["image"].dtype == torch.uint8 and mapped["image"].shape == (3, 64, 80)
        assert (mapped["image"] == 128).all()  # a constant image stays constant when resized
        assert (mapped["height"], mapped["width"]) == (IMAGE_H, IMAGE_W)
        assert ("instances" in mapped) == is_train
    sample = read_sample(dict(record), "BGR")  # what Mosaic / MixUp / CutMix draw
    assert (sample.image == 128).all() and len(sample.boxes) == 1


def test_two_training_iterations_on_16bit_pngs_see_unsaturated_images(tiny_cfg, tmp_path, registered):
    from dinodet2.engine import Trainer

    name = registered("checks_gray16", *_write_coco(
        tmp_path, num_images=2, num_categories=3,
        image_writer=lambda p: _gray16(p, value=20000, box_value=50000)))  # 8 bits: 78 and 195
    cfg = _train_cfg(tiny_cfg, name, tmp_path, **{"MODEL.DETR.NUM_CLASSES": 3})
    trainer = Trainer(cfg)
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.extend(x["image"] for x in args[0]))
    trainer.train()
    assert len(seen) == 4  # 2 iterations x 2 images
    for image in seen:
        values = set(image.unique().tolist())
        assert {78, 195} <= values and max(values) <= 195 and min(values) >= 78, sorted(values)


@pytest.mark.parametrize("error", [ValueError("newer Detectron2 / PathManager"), OSError("disk")])
def test_unreadable_image_errors_are_handled_whatever_their_type(tmp_path, monkeypatch, error):
    path = _gray16(tmp_path / "ok.png")

    def failing_open(*args, **kwargs):
        raise error

    monkeypatch.setattr(image_io.Image, "open", failing_open)
    with pytest.raises(UnreadableImageError, match="ok.png"):
        read_image(path, "BGR")
    record = {"file_name": path, "height": IMAGE_H, "width": IMAGE_W, "image_id": 1, "annotations": []}
    assert DetrDatasetMapper(_mapper_cfg(), is_train=True)(dict(record)) is None  # skipped in training
    with pytest.raises(RuntimeError, match="ok.png"):
        DetrDatasetMapper(_mapper_cfg(), is_train=False)(dict(record))
    with pytest.raises(OSError):  # multi-image augmentations skip OSErrors
        read_sample(dict(record), "BGR")


# ------------------------------------------------------------------------------------------------
# 3. DINOv2 that cannot be loaded
# ------------------------------------------------------------------------------------------------
REMEDIES = ("save_pretrained", "MODEL.DINOV2.NAME", "HF_HUB_OFFLINE", "MODEL.DINOV2.LOCAL_FILES_ONLY",
            "MODEL.DINOV2.RANDOM_INIT")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty HuggingFace cache, offline (as HF_HOME=<empty> HF_HUB_OFFLINE=1 would give)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_offline_hub_id_error_names_every_remedy(empty_hub_cache):
    with pytest.raises(OSError) as error:
        load_dinov2_model("facebook/dinov2-base")
    message = str(error.value)
    for expected in REMEDIES + ("facebook/dinov2-base", str(empty_hub_cache)):
        assert expected in message, (expected, message)


def test_corrupt_cached_download_error_names_every_remedy(empty_hub_cache, saved_dinov2_dir):
    # An interrupted download: config.json is in the cache, the weights file is truncated.
    repo = empty_hub_cache / "models--facebook--dinov2-base"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copy(f"{saved_dinov2_dir}/config.json", snapshot)
    (snapshot / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(OSError) as error:  # was safetensors' SafetensorError, with no remedy
        load_dinov2_model("facebook/dinov2-base")
    message = str(error.value)
    assert all(expected in message for expected in REMEDIES), message
    assert "partial or corrupt download" in message and "SafetensorError" in message


def test_truncated_local_directory_error_says_to_save_it_again(saved_dinov2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = tmp_path / "dinov2"
    shutil.copytree(saved_dinov2_dir, local)
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(OSError) as error:
        load_dinov2_model(str(local))
    message = str(error.value)
    assert str(local) in message and "save_pretrained" in message and "MODEL.DINOV2.RANDOM_INIT" in message


# ------------------------------------------------------------------------------------------------
# 4. Nothing to train on
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("annotations, cause", [
    ("mismatched-ids", '"image_id"'), ("none", '"annotations" list is empty'), ("crowd", '"iscrowd": 1'),
])
def test_all_images_filtered_out_names_dataset_counts_cause_and_key(tiny_cfg, tmp_path, registered, annotations,
                                                                    cause):
    name = registered("checks_unannotated", *_write_coco(tmp_path, num_images=3, annotations=annotations))
    cfg = _train_cfg(tiny_cfg, name, tmp_path, **{"MODEL.DETR.NUM_CLASSES": 5})
    with pytest.raises(ValueError) as error:  # was Detectron2's bare "No valid data found" assertion
        train_dataset_dicts(cfg)
    message = str(error.value)
    for expected in (f"'{name}'", str(tmp_path / "instances.json"), "3 images found, 3 dropped",
                     "DATALOADER.FILTER_EMPTY_ANNOTATIONS False", cause):
        assert expected in message, (expected, message)

    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # the remedy: train on them as background
    assert len(train_dataset_dicts(cfg)) == 3


def test_a_dataset_losing_every_image_next_to_a_good_one_is_warned_about(tiny_cfg, tmp_path, registered,
                                                                         checks_log):
    bad = registered("checks_bad_ids", *_write_coco(tmp_path / "bad", num_images=2, annotations="mismatched-ids"))
    good = registered("checks_good", *_write_coco(tmp_path / "good", num_images=3))
    cfg = _train_cfg(tiny_cfg, good, tmp_path, **{"MODEL.DETR.NUM_CLASSES": 5})
    cfg.DATASETS.TRAIN = (bad, good)
    assert len(train_dataset_dicts(cfg)) == 3
    warnings = [m for m in checks_log if f"'{bad}'" in m]
    assert len(warnings) == 1 and "2 images found, 2 dropped" in warnings[0]
    assert "FILTER_EMPTY_ANNOTATIONS" in warnings[0]


def test_dataset_without_images_is_a_clear_error_for_training_and_evaluation(tiny_cfg, tmp_path, registered):
    from dinodet2.engine import Trainer

    name = registered("checks_no_images", *_write_coco(tmp_path, num_images=0))
    cfg = _train_cfg(tiny_cfg, name, tmp_path, **{"MODEL.DETR.NUM_CLASSES": 5})
    for build, key in ((lambda: train_dataset_dicts(cfg), "DATASETS.TRAIN"),
                       (lambda: Trainer.build_test_loader(cfg, name), "DATASETS.TEST")):
        with pytest.raises(ValueError) as error:  # was Detectron2's "Dataset '...' is empty!" assertion
            build()
        message = str(error.value)
        assert f"'{name}'" in message and "contains no images" in message and key in message
        assert str(tmp_path / "instances.json") in message
