"""Tests of the hard synthetic dataset (dinodet2.data.shapes_hard) and of the shared shapes
machinery it reuses: the easy ``shapes`` files must not change."""
import hashlib
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog

from dinodet2.data.checks import check_datasets_exist
from dinodet2.data.shapes import (
    _encode_jpeg,
    generate_shapes_dataset,
    is_shapes_dataset,
    prepare_shapes_dataset,
    register_shapes_dataset,
    render_shapes_image,
)
from dinodet2.data.shapes_hard import (
    DISTRACTOR_KINDS,
    MIN_VISIBLE_EXTENT,
    MIN_VISIBLE_FRACTION,
    SHAPES_HARD_CLASSES,
    annotation_statistics,
    generate_shapes_hard_dataset,
    register_shapes_hard_dataset,
    register_shapes_hard_datasets,
    render_shapes_hard_image,
)

SPLIT_SEED, SPLIT_IMAGES = 2, 40


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _decode(segmentation):
    return mask_util.decode(segmentation).astype(bool)


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _unregister(name):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def hard_split(tmp_path_factory):
    """A 40-image shapes_hard split on disk: (root, its COCO dict, the rendered images)."""
    root = tmp_path_factory.mktemp("shapes_hard")
    dataset = _load_json(generate_shapes_hard_dataset(root, "train", SPLIT_IMAGES, SPLIT_SEED))
    rendered = [render_shapes_hard_image(SPLIT_SEED, i) for i in range(SPLIT_IMAGES)]
    return root, dataset, rendered


def _annotations_by_image(dataset):
    by_image = {im["id"]: [] for im in dataset["images"]}
    for anno in dataset["annotations"]:
        by_image[anno["image_id"]].append(anno)
    return [by_image[im["id"]] for im in dataset["images"]]


# ------------------------------------------------------------------------------------------------
# The easy shapes set is unchanged by the shared machinery
# ------------------------------------------------------------------------------------------------
# Digests of shapes split "val", 4 images, seed 3, as generated before shapes_hard existed. If the
# easy set's rendering or annotations change on purpose, bump SHAPES_VERSION and update these.
_SHAPES_JSON_SHA256 = "076df4ef874e57f3dbe4020158329fc844850924359f64c8976075a00d542ef6"
_SHAPES_PIXELS_SHA256 = "0580aaaa8052b5603cf162c358ca438f05b18954d2bb31b1fb9890049564db2a"


def test_shapes_files_are_unchanged(tmp_path):
    json_file = generate_shapes_dataset(tmp_path, "val", num_images=4, seed=3)
    with open(json_file, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == _SHAPES_JSON_SHA256
    pixels = hashlib.sha256()
    for index in range(4):
        image, _ = render_shapes_image(3, index)
        pixels.update(image.tobytes())
        # The JPEG on disk is the rendered image's.
        assert (tmp_path / "val" / f"{index:06d}.jpg").read_bytes() == _encode_jpeg(image)
    assert pixels.hexdigest() == _SHAPES_PIXELS_SHA256


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------
def _split_digest(root, split):
    """SHA-256 of a split's JSON and JPEG bytes."""
    digest = hashlib.sha256((root / "annotations" / f"instances_{split}.json").read_bytes())
    for path in sorted((root / split).iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_generation_is_deterministic(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_shapes_hard_dataset(tmp_path / name, "val", num_images=4, seed=seed)
    assert _split_digest(tmp_path / "a", "val") == _split_digest(tmp_path / "b", "val")
    assert _split_digest(tmp_path / "a", "val") != _split_digest(tmp_path / "c", "val")
    np.testing.assert_array_equal(render_shapes_hard_image(7, 1).image, render_shapes_hard_image(7, 1).image)


def test_images_categories_and_object_counts(hard_split):
    _, dataset, rendered = hard_split
    assert [(c["id"], c["name"]) for c in dataset["categories"]] == list(enumerate(SHAPES_HARD_CLASSES, 1))
    assert dataset["info"]["description"] == "dinodet2 synthetic shapes (hard)"
    counts = []
    for image_info, annotations, render in zip(dataset["images"], _annotations_by_image(dataset), rendered):
        height, width = render.image.shape[:2]
        assert (image_info["height"], image_info["width"]) == (height, width)
        assert height != width and 192 <= min(height, width) and max(height, width) <= 320
        assert len(annotations) == len(render.objects)
        assert {a["category_id"] for a in annotations} <= {1, 2, 3, 4}
        counts.append(len(annotations))
    assert 1 <= min(counts) <= 8 and 20 <= max(counts) <= 30  # many objects, a wide range
    assert 10 <= np.mean(counts) <= 20


def test_small_objects_and_rare_class_share(hard_split):
    stats = annotation_statistics(hard_split[1])
    assert stats["images"] == SPLIT_IMAGES and stats["instances"] > 400
    assert 0.6 <= stats["small"] <= 0.9  # COCO small: area < 32^2
    assert 0.25 <= stats["under_16px"] <= 0.55  # box under 16 px on its longer side
    assert 0.02 <= stats["class_share"]["diamond"] <= 0.07  # the rare class
    for name in ("square", "circle", "triangle"):
        assert 0.25 <= stats["class_share"][name] <= 0.4


# ------------------------------------------------------------------------------------------------
# Annotations describe the visible part
# ------------------------------------------------------------------------------------------------
def test_boxes_are_the_exact_extent_of_the_visible_masks(hard_split):
    _, dataset, rendered = hard_split
    for image_info, annotations, render in zip(dataset["images"], _annotations_by_image(dataset), rendered):
        for anno, obj in zip(annotations, render.objects):
            mask = _decode(anno["segmentation"])
            assert mask.shape == (image_info["height"], image_info["width"])
            assert anno["bbox"] == _box_of(mask)
            assert anno["area"] == mask.sum()
            np.testing.assert_array_equal(mask, obj["mask"])
            assert anno["category_id"] == obj["category_id"] and anno["iscrowd"] == 0


def test_visible_masks_are_what_the_image_shows(hard_split):
    """Visible masks of all drawn shapes (annotated, dropped, distractors) are disjoint, each
    shows its own colour, and together they cover every drawn shape: what is hidden of one
    shape is visible of another."""
    for render in hard_split[2]:
        drawn = render.objects + render.dropped_objects + render.distractors
        visible = np.zeros(render.image.shape[:2], dtype=np.int32)
        for item in drawn:
            assert not (item["mask"] & ~item["full_mask"]).any()
            assert (render.image[item["mask"]] == item["color"]).all()
            visible += item["mask"]
        assert visible.max() == 1
        for item in drawn:
            assert visible[item["full_mask"]].all()


def test_mostly_hidden_objects_are_dropped(hard_split):
    _, dataset, rendered = hard_split
    fractions = [obj["visible_fraction"] for render in rendered for obj in render.objects]
    assert min(fractions) >= MIN_VISIBLE_FRACTION
    assert sum(f < 1.0 for f in fractions) > 0.1 * len(fractions)  # occluded objects are kept
    hidden = [obj["visible_fraction"] for render in rendered for obj in render.dropped_objects]
    assert sum(0.0 < f < MIN_VISIBLE_FRACTION for f in hidden) >= 10  # partly visible, dropped
    for render in rendered:
        for obj in render.dropped_objects:
            if obj["visible_fraction"] >= MIN_VISIBLE_FRACTION:  # dropped for being too thin
                x, y, w, h = _box_of(obj["mask"])
                assert min(w, h) < MIN_VISIBLE_EXTENT
    # Dropped shapes have no annotation: every annotation is one of the kept objects.
    assert len(dataset["annotations"]) == len(fractions)


# ------------------------------------------------------------------------------------------------
# Distractors
# ------------------------------------------------------------------------------------------------
def _solidity(mask):
    """Pixel count / pixel count of the filled convex hull: ~1 for convex shapes."""
    ys, xs = np.nonzero(mask)
    hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
    filled = np.zeros(mask.shape, dtype=np.uint8)
    cv2.fillConvexPoly(filled, hull, 1)
    return mask.sum() / filled.sum()


def test_distractors_are_drawn_but_not_annotated(hard_split):
    _, dataset, rendered = hard_split
    kinds = set()
    for annotations, render in zip(_annotations_by_image(dataset), rendered):
        assert render.distractors
        distractor_pixels = np.zeros(render.image.shape[:2], dtype=bool)
        for distractor in render.distractors:
            kinds.add(distractor["kind"])
            distractor_pixels |= distractor["mask"]
        # No annotation covers a visible distractor pixel (so none is a distractor's), while
        # every annotation is the visible part of a class shape (test_boxes_are_...).
        for anno in annotations:
            assert not (_decode(anno["segmentation"]) & distractor_pixels).any()
        assert distractor_pixels.any()
    assert kinds == set(DISTRACTOR_KINDS)


def test_distractors_look_unlike_every_class(hard_split):
    """Class shapes are convex; distractors are not (a cross's and a star's concave corners, a
    ring's hole)."""
    rendered = hard_split[2]
    classes = [_solidity(o["full_mask"]) for r in rendered for o in r.objects + r.dropped_objects]
    distractors = [_solidity(d["full_mask"]) for r in rendered for d in r.distractors]
    assert min(classes) > 0.77 > max(distractors)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tmp_dataset_name():
    # Registering replaces an earlier shapes registration of the name: only clean up after.
    yield "shapes_hard_unittest"
    _unregister("shapes_hard_unittest")


def test_registered_split_loads_and_prepares(tmp_path, tmp_dataset_name):
    register_shapes_hard_dataset(tmp_dataset_name, tmp_path, "mini", num_images=3, seed=0)
    assert is_shapes_dataset(tmp_dataset_name)
    assert not (tmp_path / "annotations").exists()  # lazily generated
    check_datasets_exist([tmp_dataset_name])
    assert prepare_shapes_dataset(tmp_dataset_name) == str(tmp_path / "annotations" / "instances_mini.json")
    dicts = DatasetCatalog.get(tmp_dataset_name)
    assert len(dicts) == 3
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= {0, 1, 2, 3}
    metadata = MetadataCatalog.get(tmp_dataset_name)
    assert metadata.thing_classes == list(SHAPES_HARD_CLASSES)
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}


def test_registering_another_variant_replaces_the_registration(tmp_path, tmp_dataset_name):
    register_shapes_dataset(tmp_dataset_name, tmp_path, "mini", num_images=3, seed=0)
    register_shapes_hard_dataset(tmp_dataset_name, tmp_path, "mini", num_images=3, seed=0, min_size=160, max_size=192)
    assert MetadataCatalog.get(tmp_dataset_name).thing_classes == list(SHAPES_HARD_CLASSES)
    prepare_shapes_dataset(tmp_dataset_name)
    info = _load_json(tmp_path / "annotations" / "instances_mini.json")["info"]
    assert info["description"] == "dinodet2 synthetic shapes (hard)" and info["max_size"] == 192


@pytest.fixture
def restore_shapes_hard_registration():
    original_root = MetadataCatalog.get("shapes_hard_train").shapes_params["root"]
    yield
    register_shapes_hard_datasets(original_root)


def test_default_splits_are_registered_under_detectron2_datasets(tmp_path, monkeypatch, restore_shapes_hard_registration):
    train, val = (MetadataCatalog.get(n).shapes_params for n in ("shapes_hard_train", "shapes_hard_val"))
    assert (train["num_images"], val["num_images"]) == (600, 100)
    seeds = {train["seed"], val["seed"]} | {MetadataCatalog.get(n).shapes_params["seed"] for n in ("shapes_train", "shapes_val")}
    assert len(seeds) == 4
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_shapes_hard_datasets()
    assert MetadataCatalog.get("shapes_hard_val").json_file == str(
        tmp_path / "shapes_hard" / "annotations" / "instances_val.json"
    )
    assert MetadataCatalog.get("shapes_hard_train").thing_classes == list(SHAPES_HARD_CLASSES)


def test_too_small_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        generate_shapes_hard_dataset(tmp_path, "val", num_images=2, seed=0, min_size=128, max_size=200)
