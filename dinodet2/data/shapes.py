"""A small synthetic detection dataset ("shapes") written to disk as real COCO-format files.

Each image has a random non-square size, a smooth noisy background and 1-4 filled shapes
(square, circle, triangle) in saturated colours. Shapes never overlap, so every box is the exact
extent of its drawn shape; every annotation also has the shape's exact mask as a compressed COCO
RLE ``segmentation``. Generation is deterministic: image ``i`` of a split is rendered from
its own random stream seeded by ``(seed, i)``, so the same parameters always produce
byte-identical JSON and identical pixels.

Layout under ``root``::

    <root>/<split>/000000.jpg ...
    <root>/annotations/instances_<split>.json

``shapes_train`` (400 images, seed 0) and ``shapes_val`` (60 images, seed 1) are registered with
Detectron2's catalogs by :func:`register_shapes_datasets`; their files are generated lazily the
first time the dataset is loaded (or by :func:`prepare_shapes_dataset`).

The machinery is shared with the harder variant in :mod:`dinodet2.data.shapes_hard`: the shape
drawers (:data:`SHAPE_DRAWERS`), the :class:`ShapesVariant` description of a kind of dataset,
:func:`write_shapes_split` (one split as COCO files, written atomically and only when missing or
stale) and :func:`register_generated_dataset` (lazy registration; :func:`is_shapes_dataset` and
:func:`prepare_shapes_dataset` handle every variant).
"""
import colorsys
import dataclasses
import functools
import io
import json
import logging
import os
import time
from typing import Callable, Tuple

import cv2
import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "SHAPES_CLASSES",
    "SHAPE_DRAWERS",
    "SHAPES",
    "ShapesVariant",
    "default_shapes_root",
    "render_shapes_image",
    "write_shapes_split",
    "generate_shapes_dataset",
    "register_generated_dataset",
    "register_shapes_dataset",
    "register_shapes_datasets",
    "register_splits",
    "is_shapes_dataset",
    "prepare_shapes_dataset",
]

logger = logging.getLogger(__name__)

# Bump whenever the rendering or the annotations change, so stale files on disk are regenerated.
# 2: annotations carry the exact shape masks as COCO RLE ``segmentation`` (used by Copy-Paste).
SHAPES_VERSION = 2
# Class names in COCO category-id order (ids 1, 2, 3).
SHAPES_CLASSES = ("square", "circle", "triangle")
# name -> (split, num_images, seed)
_SHAPES_SPLITS = {"shapes_train": ("train", 400, 0), "shapes_val": ("val", 60, 1)}

_OBJECT_SIZE_RANGE = (20, 70)  # side of the square each shape is drawn in, in pixels
_MAX_OBJECTS = 4
_OBJECT_GAP = 2  # minimum free pixels between the squares of two shapes
_PLACEMENT_TRIES = 20
_JPEG_QUALITY = 95


def datasets_dir(name):
    """``$DETECTRON2_DATASETS/<name>`` (``./datasets/<name>`` if the variable is unset)."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), name)


def default_shapes_root():
    """``$DETECTRON2_DATASETS/shapes`` (``./datasets/shapes`` if the variable is unset)."""
    return datasets_dir("shapes")


def random_image_size(rng, min_size, max_size):
    """A random (height, width) in [min_size, max_size]^2 with height != width."""
    width = int(rng.integers(min_size, max_size + 1))
    height = int(rng.integers(min_size, max_size))  # one value fewer: skip `width` below
    if height >= width:
        height += 1
    return height, width


def smooth_gradient(rng, height, width):
    """A smooth colour gradient (bilinearly upsampled random 3x3 grid), float32 HxWx3 in [50, 200]."""
    grid = rng.uniform(50, 200, size=(3, 3, 3)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)


def render_background(rng, height, width):
    """A smooth colour gradient plus Gaussian noise (std 8), uint8 RGB."""
    smooth = smooth_gradient(rng, height, width)
    noise = rng.normal(0.0, 8.0, size=(height, width, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def random_saturated_color(rng):
    """A fully saturated, bright RGB colour as a tuple of ints."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), 1.0, rng.uniform(0.75, 1.0))
    return tuple(int(round(255 * c)) for c in rgb)


def _place_square(rng, height, width, size, placed):
    """Top-left corner of a free ``size`` x ``size`` square inside the image, or None.

    "Free" means at least ``_OBJECT_GAP`` pixels away from every square in ``placed``
    (a list of (x0, y0, size)).
    """
    for _ in range(_PLACEMENT_TRIES):
        x0 = int(rng.integers(0, width - size + 1))
        y0 = int(rng.integers(0, height - size + 1))
        if all(
            x0 >= px + ps + _OBJECT_GAP
            or px >= x0 + size + _OBJECT_GAP
            or y0 >= py + ps + _OBJECT_GAP
            or py >= y0 + size + _OBJECT_GAP
            for px, py, ps in placed
        ):
            return x0, y0
    return None


def _draw_square(rng, mask, x0, y0, size):
    cv2.rectangle(mask, (x0, y0), (x0 + size - 1, y0 + size - 1), 1, thickness=-1)


def _draw_circle(rng, mask, x0, y0, size):
    radius = (size - 1) // 2
    cv2.circle(mask, (x0 + radius, y0 + radius), radius, 1, thickness=-1)


def polygon_on_circle(x0, y0, size, angles, radii=1.0):
    """int32 vertices at ``angles`` (radians) and ``radii`` (fractions of the radius) around the
    centre of the square (x0, y0, size), on the circle inscribed in it."""
    radius = (size - 1) / 2.0
    radii = radius * np.asarray(radii, dtype=np.float64)
    points = np.stack(
        [x0 + radius + radii * np.cos(angles), y0 + radius + radii * np.sin(angles)], axis=1
    )
    return np.round(points).astype(np.int32)


def _draw_triangle(rng, mask, x0, y0, size):
    """Equilateral, random rotation, inscribed in the square's circle."""
    angles = rng.uniform(0.0, 2 * np.pi) + np.array([0.0, 2.0, 4.0]) * np.pi / 3
    cv2.fillPoly(mask, [polygon_on_circle(x0, y0, size, angles)], 1)


# Shape name -> drawer(rng, mask, x0, y0, size): fills the shape, drawn inside the square
# (x0, y0, size), with 1s in the uint8 ``mask`` (no anti-aliasing).
SHAPE_DRAWERS = {"square": _draw_square, "circle": _draw_circle, "triangle": _draw_triangle}


def draw_shape_mask(rng, name, height, width, x0, y0, size, drawers=SHAPE_DRAWERS):
    """Boolean HxW mask of shape ``name`` (a key of ``drawers``) drawn inside the square
    (x0, y0, size)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    drawers[name](rng, mask, x0, y0, size)
    return mask.astype(bool)


def mask_to_xywh(mask):
    """Tight COCO box [x, y, w, h] (pixel-edge coordinates, floats) of a boolean mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def _mask_to_rle(mask):
    """Compressed COCO RLE of a boolean mask, JSON-serialisable."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def render_shapes_image(seed, index, min_size=128, max_size=192):
    """Render image ``index`` of the shapes split generated with ``seed``.

    Returns:
        image (np.ndarray): HxWx3 uint8 RGB, before JPEG compression.
        objects (list[dict]): one dict per shape with ``category_id`` (1-based COCO id),
            ``bbox`` (tight XYWH floats), ``area`` (pixel count), ``color`` (RGB tuple)
            and ``mask`` (HxW bool; shapes never overlap, so every mask is fully visible).
    """
    rng = np.random.default_rng([seed, index])
    height, width = random_image_size(rng, min_size, max_size)
    image = render_background(rng, height, width)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        category_id = int(rng.integers(1, len(SHAPES_CLASSES) + 1))
        size = int(rng.integers(_OBJECT_SIZE_RANGE[0], _OBJECT_SIZE_RANGE[1] + 1))
        corner = _place_square(rng, height, width, size, placed)
        if corner is None:
            continue
        placed.append((*corner, size))
        mask = draw_shape_mask(rng, SHAPES_CLASSES[category_id - 1], height, width, *corner, size)
        color = random_saturated_color(rng)
        image[mask] = color
        objects.append(
            {
                "category_id": category_id,
                "bbox": mask_to_xywh(mask),
                "area": float(mask.sum()),
                "color": color,
                "mask": mask,
            }
        )
    return image, objects


def _encode_jpeg(image):
    """JPEG bytes of an HxWx3 uint8 RGB array (no chroma subsampling: keeps colour edges on
    the box boundaries sharp)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _atomic_write(path, data):
    """Write ``data`` (bytes) to ``path`` via a temporary file and an atomic rename.

    Readers (and concurrent writers, e.g. several DDP ranks generating the same files) never
    observe a partially written file.
    """
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            f.write(data)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _shapes_paths(root, split):
    """(image_root, json_file) of a split."""
    return (
        os.path.join(root, split),
        os.path.join(root, "annotations", f"instances_{split}.json"),
    )


def _is_complete(json_file, image_root, info):
    """Whether ``json_file`` was written with generation parameters ``info`` and all of its
    images exist."""
    try:
        with open(json_file) as f:
            dataset = json.load(f)
    except (OSError, ValueError):
        return False
    return dataset.get("info") == info and all(
        os.path.isfile(os.path.join(image_root, im["file_name"])) for im in dataset["images"]
    )


@dataclasses.dataclass(frozen=True)
class ShapesVariant:
    """What distinguishes one kind of generated shapes dataset from another.

    Attributes:
        description: the JSON ``info.description``.
        version: the JSON ``info.version``; bump it whenever the rendering or the annotations
            change, so stale files on disk are regenerated.
        classes: category names in COCO id order (ids 1, 2, ...).
        render: ``render(seed, index, min_size, max_size) -> (image, objects)``: an HxWx3 uint8
            RGB image and its annotated objects (dicts with ``category_id``, ``bbox``, ``area``
            and an HxW bool ``mask``, written as the RLE ``segmentation``).
        smallest_min_size: the smallest allowed ``min_size`` (the largest object must fit).
    """

    description: str
    version: int
    classes: Tuple[str, ...]
    render: Callable
    smallest_min_size: int


# The easy set; its files must never change unless SHAPES_VERSION is bumped.
SHAPES = ShapesVariant(
    "dinodet2 synthetic shapes", SHAPES_VERSION, SHAPES_CLASSES, render_shapes_image, 80
)


def write_shapes_split(variant, root, split, num_images, seed, min_size, max_size):
    """Write split ``split`` of the :class:`ShapesVariant` ``variant`` as COCO files under
    ``root`` (see module docstring) unless it is already there with the same parameters, and
    return the path of its COCO JSON file.

    Images are written first and the JSON last, each atomically, so an existing JSON always
    describes a complete split.
    """
    if not variant.smallest_min_size <= min_size < max_size:
        raise ValueError(
            f"Need {variant.smallest_min_size} <= min_size < max_size, got min_size={min_size}, "
            f"max_size={max_size}."
        )
    root = os.fspath(root)
    image_root, json_file = _shapes_paths(root, split)
    info = {
        "description": variant.description,
        "version": variant.version,
        "split": split,
        "num_images": num_images,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
    }
    if _is_complete(json_file, image_root, info):
        return json_file

    start = time.perf_counter()
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = variant.render(seed, index, min_size, max_size)
        file_name = f"{index:06d}.jpg"
        _atomic_write(os.path.join(image_root, file_name), _encode_jpeg(image))
        image_id, first_annotation_id = index + 1, len(annotations) + 1
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": image.shape[0],
                "width": image.shape[1],
            }
        )
        annotations.extend(
            {
                "id": first_annotation_id + k,
                "image_id": image_id,
                "category_id": obj["category_id"],
                "bbox": obj["bbox"],
                "area": obj["area"],
                "segmentation": _mask_to_rle(obj["mask"]),
                "iscrowd": 0,
            }
            for k, obj in enumerate(objects)
        )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(variant.classes)
    ]
    dataset = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    _atomic_write(json_file, json.dumps(dataset).encode("utf-8"))
    logger.info(
        f"Generated '{variant.description}' split '{split}' ({num_images} images, "
        f"{len(annotations)} objects) in {image_root} in {time.perf_counter() - start:.1f}s."
    )
    return json_file


def generate_shapes_dataset(root, split, num_images, seed, min_size=128, max_size=192):
    """Write the shapes split ``split`` under ``root`` (see module docstring) unless it is already
    there with the same parameters, and return the path of its COCO JSON file."""
    return write_shapes_split(SHAPES, root, split, num_images, seed, min_size, max_size)


def _load_shapes(name, variant, params):
    """DatasetCatalog loader: generate the files if needed, then read them as COCO."""
    json_file = write_shapes_split(variant, **params)
    image_root, _ = _shapes_paths(params["root"], params["split"])
    return load_coco_json(json_file, image_root, name)


def register_generated_dataset(name, variant, root, split, num_images, seed, min_size, max_size):
    """Register split ``split`` of the :class:`ShapesVariant` ``variant`` (files under ``root``,
    generated lazily) as Detectron2 dataset ``name``.

    Calling it again with the same arguments does nothing; calling it with different arguments
    replaces an earlier shapes registration of ``name``. A dataset of that name registered by
    something else is left alone (with a warning).
    """
    params = {
        "root": os.fspath(root),
        "split": split,
        "num_images": num_images,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
    }
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        previous = metadata.get("shapes_params", None)
        if previous == params and metadata.get("shapes_variant", None) == variant:
            return
        if previous is None:
            logger.warning(
                f"Dataset '{name}' is already registered and is not a shapes dataset; "
                "not registering the shapes dataset under that name."
            )
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    image_root, json_file = _shapes_paths(params["root"], split)
    DatasetCatalog.register(name, functools.partial(_load_shapes, name, variant, params))
    MetadataCatalog.get(name).set(
        thing_classes=list(variant.classes),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(variant.classes))},
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        shapes_params=params,
        shapes_variant=variant,
    )


def register_shapes_dataset(name, root, split, num_images, seed, min_size=128, max_size=192):
    """Register one shapes split as Detectron2 dataset ``name`` (files generated lazily; see
    :func:`register_generated_dataset`)."""
    register_generated_dataset(name, SHAPES, root, split, num_images, seed, min_size, max_size)


def register_shapes_datasets(root=None):
    """Register ``shapes_train`` (400 images, seed 0) and ``shapes_val`` (60 images, seed 1).

    Args:
        root: where the files live (or will be generated); defaults to
            :func:`default_shapes_root`, evaluated now.
    """
    root = default_shapes_root() if root is None else root
    register_splits(register_shapes_dataset, _SHAPES_SPLITS, root)


def register_splits(register, splits, root):
    """``register(name, root, split, num_images, seed)`` for every ``name: (split, num_images,
    seed)`` of ``splits``."""
    for name, (split, num_images, seed) in splits.items():
        register(name, root, split, num_images, seed)


def is_shapes_dataset(name):
    """Whether ``name`` is registered as a generated shapes dataset (any variant)."""
    return (
        name in DatasetCatalog.list()
        and MetadataCatalog.get(name).get("shapes_params", None) is not None
    )


def prepare_shapes_dataset(name):
    """Make sure the files of the registered shapes dataset ``name`` (any variant) exist
    (generating them if needed) and return its JSON path. Call this before anything that reads
    ``json_file`` directly, such as :class:`detectron2.evaluation.COCOEvaluator`."""
    if not is_shapes_dataset(name):
        raise ValueError(f"'{name}' is not a registered shapes dataset.")
    metadata = MetadataCatalog.get(name)
    return write_shapes_split(metadata.shapes_variant, **metadata.shapes_params)
