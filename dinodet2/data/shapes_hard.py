"""A harder synthetic detection dataset ("shapes_hard"), written like :mod:`.shapes` as COCO files.

The easy ``shapes`` set is nearly solved by the demo models, so it cannot show what a training
signal or a small-object technique is worth. This variant keeps its classes and adds what makes
real detection hard:

* **Cluttered backgrounds**: a smooth noisy gradient as in ``shapes`` plus one texture (stripes at
  a random angle and period, an axis-aligned checkerboard or smooth blobs) and 15-40
  low-contrast scribbles (colours within +-30 of the local background).
* **Many, mostly small objects**: 4-30 class shapes per image, sizes log-uniform in 6-80 px,
  on images of 192-320 px per side (random, non-square), so most objects are COCO "small"
  (area < 32^2) and a large share is under 16 px.
* **Occlusion**: shapes are placed independently and may overlap; later ones are painted over
  earlier ones. Every annotation describes the *visible* part: ``segmentation`` is the RLE of
  the visible mask, ``bbox`` its exact extent and ``area`` its pixel count. A shape is **not
  annotated** when less than ``MIN_VISIBLE_FRACTION`` (40 %) of its pixels stay visible, or when
  its visible part is less than ``MIN_VISIBLE_EXTENT`` (3) px wide or high.
* **A rare class**: ``diamond`` (a rhombus with vertical and horizontal diagonals, 55-80 % as wide
  as tall, so never a rotated square) is drawn for 4 % of the class shapes.
* **Unlabelled distractors**: 1-6 shapes per image of other kinds (``cross``, a plus sign; ``ring``,
  a circle with a hole; ``star``, five points) in the same saturated colours, 12-48 px, painted
  in the same random order as the class shapes (they occlude and are occluded), never annotated.

Categories (COCO ids 1-4): square, circle, triangle, diamond. Generation is deterministic: image
``i`` of a split is rendered from its own random stream seeded by ``(seed, i)``.
``shapes_hard_train`` (600 images, seed 2) and ``shapes_hard_val`` (100 images, seed 3) are
registered by :func:`register_shapes_hard_datasets` under ``$DETECTRON2_DATASETS/shapes_hard``
and generated lazily, like the ``shapes`` splits (:func:`.shapes.prepare_shapes_dataset`
prepares them too).
"""
import dataclasses
from typing import List

import cv2
import numpy as np

from .shapes import (
    SHAPE_DRAWERS,
    ShapesVariant,
    datasets_dir,
    draw_shape_mask,
    mask_to_xywh,
    polygon_on_circle,
    random_image_size,
    random_saturated_color,
    register_generated_dataset,
    register_splits,
    smooth_gradient,
    write_shapes_split,
)

__all__ = [
    "SHAPES_HARD_CLASSES",
    "DISTRACTOR_KINDS",
    "MIN_VISIBLE_FRACTION",
    "MIN_VISIBLE_EXTENT",
    "SHAPES_HARD",
    "ShapesHardImage",
    "annotation_statistics",
    "default_shapes_hard_root",
    "render_shapes_hard_image",
    "generate_shapes_hard_dataset",
    "register_shapes_hard_dataset",
    "register_shapes_hard_datasets",
]

# Bump whenever the rendering or the annotations change, so stale files on disk are regenerated.
SHAPES_HARD_VERSION = 1
# Class names in COCO category-id order (ids 1-4); "diamond" is the rare class.
SHAPES_HARD_CLASSES = ("square", "circle", "triangle", "diamond")
# Drawn, never annotated; each looks unlike every class (a cross and a star have concave
# corners, a ring has a hole).
DISTRACTOR_KINDS = ("cross", "ring", "star")
# A class shape is annotated only if at least this fraction of its pixels is visible ...
MIN_VISIBLE_FRACTION = 0.4
# ... and its visible part is at least this many pixels wide and high.
MIN_VISIBLE_EXTENT = 3
# name -> (split, num_images, seed)
_SHAPES_HARD_SPLITS = {"shapes_hard_train": ("train", 600, 2), "shapes_hard_val": ("val", 100, 3)}

_CLASS_PROBABILITIES = (0.32, 0.32, 0.32, 0.04)
_OBJECTS_PER_IMAGE = (4, 30)  # class shapes drawn (inclusive); occlusion drops some
_DISTRACTORS_PER_IMAGE = (1, 6)
_OBJECT_SIZE_RANGE = (6, 80)  # side of the square a class shape is drawn in: log-uniform
_DISTRACTOR_SIZE_RANGE = (12, 48)  # large enough for a visible hole / concave corners
_CLUTTER_ITEMS = (15, 40)
_CLUTTER_CONTRAST = 30.0  # clutter colour: local background +- up to this, per channel
_TEXTURE_AMPLITUDE = (15.0, 40.0)


# ------------------------------------------------------------------------------------------------
# Shapes: the rare class and the distractors (drawers as in shapes.SHAPE_DRAWERS; each gets an
# all-zero uint8 mask of its own)
# ------------------------------------------------------------------------------------------------
def _draw_diamond(rng, mask, x0, y0, size):
    """Rhombus with axis-aligned diagonals: full height, 55-80 % as wide."""
    half_width = rng.uniform(0.55, 0.8)
    angles = np.array([0.0, 0.5, 1.0, 1.5]) * np.pi
    radii = [half_width, 1.0, half_width, 1.0]
    cv2.fillPoly(mask, [polygon_on_circle(x0, y0, size, angles, radii)], 1)


def _draw_cross(rng, mask, x0, y0, size):
    """Plus sign; arms 20-30 % of the size thick."""
    arm = max(2, int(round(size * rng.uniform(0.2, 0.3))))
    offset = (size - arm) // 2
    cv2.rectangle(mask, (x0 + offset, y0), (x0 + offset + arm - 1, y0 + size - 1), 1, thickness=-1)
    cv2.rectangle(mask, (x0, y0 + offset), (x0 + size - 1, y0 + offset + arm - 1), 1, thickness=-1)


def _draw_ring(rng, mask, x0, y0, size):
    """Disc with a concentric hole; the rim is 30-45 % of the radius thick."""
    radius = (size - 1) // 2
    rim = max(2, int(round(radius * rng.uniform(0.3, 0.45))))
    centre = (x0 + radius, y0 + radius)
    cv2.circle(mask, centre, radius, 1, thickness=-1)
    cv2.circle(mask, centre, radius - rim, 0, thickness=-1)


def _draw_star(rng, mask, x0, y0, size):
    """Five-pointed star, random rotation, inner radius 45 % of the outer."""
    angles = rng.uniform(0.0, 2 * np.pi) + np.arange(10) * np.pi / 5
    cv2.fillPoly(mask, [polygon_on_circle(x0, y0, size, angles, [1.0, 0.45] * 5)], 1)


_HARD_DRAWERS = {
    **SHAPE_DRAWERS,
    "diamond": _draw_diamond,
    "cross": _draw_cross,
    "ring": _draw_ring,
    "star": _draw_star,
}


# ------------------------------------------------------------------------------------------------
# Background: textures and clutter
# ------------------------------------------------------------------------------------------------
def _pixel_grid(height, width):
    return np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]


def _stripes(rng, height, width):
    """Hard-edged stripes at a random angle, period 4-24 px."""
    ys, xs = _pixel_grid(height, width)
    angle, period = rng.uniform(0.0, np.pi), rng.uniform(4.0, 24.0)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / period)
    return np.sign(np.sin(phase + rng.uniform(0.0, 2 * np.pi)))


def _checker(rng, height, width):
    """Axis-aligned checkerboard, cells 4-20 px."""
    ys, xs = _pixel_grid(height, width)
    cell = int(rng.integers(4, 21))
    return ((ys // cell + xs // cell) % 2) * 2.0 - 1.0


def _blobs(rng, height, width):
    """Smooth random blobs about 12 px across (bicubically upsampled noise, squashed)."""
    grid = rng.uniform(-1.0, 1.0, size=(height // 12 + 2, width // 12 + 2)).astype(np.float32)
    return np.tanh(4.0 * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC))


_TEXTURES = (_stripes, _checker, _blobs)


def _draw_clutter(rng, image):
    """Low-contrast scribbles (random-walk polylines, 1-4 px thick), in place on the float32
    HxWx3 ``image``. Open strokes only: a filled clutter blob could look like a class shape."""
    height, width = image.shape[:2]
    for _ in range(int(rng.integers(_CLUTTER_ITEMS[0], _CLUTTER_ITEMS[1] + 1))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        color = image[y, x] + rng.uniform(-_CLUTTER_CONTRAST, _CLUTTER_CONTRAST, size=3)
        steps = rng.normal(0.0, 6.0, size=(int(rng.integers(2, 7)), 2))
        points = np.round(np.array([x, y]) + np.cumsum(steps, axis=0)).astype(np.int32)
        cv2.polylines(image, [points], False, color.tolist(), thickness=int(rng.integers(1, 5)))


def _render_cluttered_background(rng, height, width):
    """:func:`.shapes.smooth_gradient` + Gaussian noise (std 8, as in ``shapes``) + one random
    texture (tinted) + clutter, uint8 RGB. All in float32: the background is most of the
    generation time."""
    image = smooth_gradient(rng, height, width)
    image += rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(8.0)
    texture = _TEXTURES[int(rng.integers(len(_TEXTURES)))](rng, height, width)
    amplitude = rng.uniform(*_TEXTURE_AMPLITUDE) * rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    image += texture[:, :, None] * amplitude
    _draw_clutter(rng, image)
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShapesHardImage:
    """One rendered image and everything drawn on it.

    Attributes:
        image: HxWx3 uint8 RGB, before JPEG compression.
        objects: the annotated class shapes, in painting order: dicts with ``category_id``
            (1-based COCO id), ``mask`` (HxW bool, the visible pixels), ``bbox`` (exact XYWH
            extent of ``mask``), ``area`` (its pixel count), ``full_mask`` (the whole shape),
            ``visible_fraction`` and ``color`` (RGB tuple).
        dropped_objects: class shapes drawn but not annotated (too occluded: see the module
            docstring); same keys except ``bbox`` and ``area``.
        distractors: the unlabelled shapes: dicts with ``kind`` (one of DISTRACTOR_KINDS),
            ``mask`` (visible pixels), ``full_mask`` and ``color``.
    """

    image: np.ndarray
    objects: List[dict]
    dropped_objects: List[dict]
    distractors: List[dict]


def _log_uniform_size(rng, size_range):
    low, high = size_range
    return min(max(int(round(np.exp(rng.uniform(np.log(low), np.log(high))))), low), high)


def _is_visible_enough(visible, full):
    """Whether a class shape whose drawn pixels are ``full`` and visible ones ``visible`` (bool
    masks of its drawing window) is annotated."""
    if visible.sum() < MIN_VISIBLE_FRACTION * full.sum():
        return False
    ys, xs = np.nonzero(visible)
    return min(xs.max() - xs.min(), ys.max() - ys.min()) + 1 >= MIN_VISIBLE_EXTENT


def _full_size(window_mask, window, height, width):
    """HxW bool mask holding ``window_mask`` at ``window`` (x0, y0, size), False elsewhere."""
    x0, y0, size = window
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y0 + size, x0:x0 + size] = window_mask
    return mask


def render_shapes_hard_image(seed, index, min_size=192, max_size=320):
    """Render image ``index`` of the shapes_hard split generated with ``seed`` (see the module
    docstring) and return a :class:`ShapesHardImage`."""
    rng = np.random.default_rng([seed, index])
    height, width = random_image_size(rng, min_size, max_size)
    image = _render_cluttered_background(rng, height, width)
    num_objects = int(rng.integers(_OBJECTS_PER_IMAGE[0], _OBJECTS_PER_IMAGE[1] + 1))
    num_distractors = int(rng.integers(_DISTRACTORS_PER_IMAGE[0], _DISTRACTORS_PER_IMAGE[1] + 1))
    category_ids = rng.choice(len(SHAPES_HARD_CLASSES), size=num_objects, p=_CLASS_PROBABILITIES) + 1
    distractor_kinds = rng.integers(0, len(DISTRACTOR_KINDS), size=num_distractors)
    items = [{"category_id": int(c)} for c in category_ids]
    items += [{"kind": DISTRACTOR_KINDS[k]} for k in distractor_kinds]

    # Shapes are drawn in their own size x size window; `owner` holds, per pixel, the index
    # (in `painted`) of the shape painted there last, so a shape's visible pixels are its own.
    owner = np.full((height, width), -1, dtype=np.int16)
    painted, windows, drawn = [], [], []
    for position in rng.permutation(len(items)):
        item = items[position]
        if "kind" in item:
            name, size = item["kind"], _log_uniform_size(rng, _DISTRACTOR_SIZE_RANGE)
        else:
            name = SHAPES_HARD_CLASSES[item["category_id"] - 1]
            size = _log_uniform_size(rng, _OBJECT_SIZE_RANGE)
        x0 = int(rng.integers(0, width - size + 1))
        y0 = int(rng.integers(0, height - size + 1))
        shape = draw_shape_mask(rng, name, size, size, 0, 0, size, _HARD_DRAWERS)
        item["color"] = random_saturated_color(rng)
        image[y0:y0 + size, x0:x0 + size][shape] = item["color"]
        owner[y0:y0 + size, x0:x0 + size][shape] = len(painted)
        painted.append(item)
        windows.append((x0, y0, size))
        drawn.append(shape)

    objects, dropped_objects, distractors = [], [], []
    for k, (item, window, shape) in enumerate(zip(painted, windows, drawn)):
        x0, y0, size = window
        visible = owner[y0:y0 + size, x0:x0 + size] == k
        item["mask"] = _full_size(visible, window, height, width)
        item["full_mask"] = _full_size(shape, window, height, width)
        if "kind" in item:
            distractors.append(item)
            continue
        item["visible_fraction"] = float(visible.sum() / shape.sum())
        if _is_visible_enough(visible, shape):
            x, y, w, h = mask_to_xywh(visible)
            item.update(bbox=[x + x0, y + y0, w, h], area=float(visible.sum()))
            objects.append(item)
        else:
            dropped_objects.append(item)
    return ShapesHardImage(image, objects, dropped_objects, distractors)


def _render_annotated(seed, index, min_size, max_size):
    """(image, annotated objects) of :func:`render_shapes_hard_image`, for ShapesVariant."""
    rendered = render_shapes_hard_image(seed, index, min_size, max_size)
    return rendered.image, rendered.objects


SHAPES_HARD = ShapesVariant(
    "dinodet2 synthetic shapes (hard)",
    SHAPES_HARD_VERSION,
    SHAPES_HARD_CLASSES,
    _render_annotated,
    smallest_min_size=2 * _OBJECT_SIZE_RANGE[1],
)


# ------------------------------------------------------------------------------------------------
# Files, registration, statistics
# ------------------------------------------------------------------------------------------------
def default_shapes_hard_root():
    """``$DETECTRON2_DATASETS/shapes_hard`` (``./datasets/shapes_hard`` if the variable is unset)."""
    return datasets_dir("shapes_hard")


def generate_shapes_hard_dataset(root, split, num_images, seed, min_size=192, max_size=320):
    """Write the shapes_hard split ``split`` under ``root`` (layout as in :mod:`.shapes`) unless it
    is already there with the same parameters, and return the path of its COCO JSON file."""
    return write_shapes_split(SHAPES_HARD, root, split, num_images, seed, min_size, max_size)


def register_shapes_hard_dataset(name, root, split, num_images, seed, min_size=192, max_size=320):
    """Register one shapes_hard split as Detectron2 dataset ``name`` (files generated lazily; see
    :func:`.shapes.register_generated_dataset`)."""
    register_generated_dataset(name, SHAPES_HARD, root, split, num_images, seed, min_size, max_size)


def register_shapes_hard_datasets(root=None):
    """Register ``shapes_hard_train`` (600 images, seed 2) and ``shapes_hard_val`` (100 images,
    seed 3).

    Args:
        root: where the files live (or will be generated); defaults to
            :func:`default_shapes_hard_root`, evaluated now.
    """
    root = default_shapes_hard_root() if root is None else root
    register_splits(register_shapes_hard_dataset, _SHAPES_HARD_SPLITS, root)


def annotation_statistics(dataset):
    """Counts of a COCO ``dataset`` dict (e.g. a loaded ``instances_<split>.json``): ``images``,
    ``instances``, ``min/max_per_image``, ``per_image`` (mean), ``small`` (share with COCO area
    < 32^2), ``under_16px`` (share whose box is under 16 px on its longer side) and ``class_share``
    (category name -> share of the instances)."""
    annotations = dataset["annotations"]
    per_image = {im["id"]: 0 for im in dataset["images"]}
    for a in annotations:
        per_image[a["image_id"]] += 1
    counts = list(per_image.values()) or [0]
    total = max(len(annotations), 1)
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    return {
        "images": len(dataset["images"]),
        "instances": len(annotations),
        "min_per_image": min(counts),
        "max_per_image": max(counts),
        "per_image": len(annotations) / max(len(dataset["images"]), 1),
        "small": sum(a["area"] < 32 ** 2 for a in annotations) / total,
        "under_16px": sum(max(a["bbox"][2:]) < 16 for a in annotations) / total,
        "class_share": {
            name: sum(a["category_id"] == i for a in annotations) / total for i, name in names.items()
        },
    }
