"""Single-image augmentations (INPUT.AUG.*): exact box transforms on images of uniquely coloured
rectangles, clipping / dropping by size and visibility, determinism, photometric ops, defaults."""
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from dinodet2.data.augmentations import RandomHue, _rotate_hue, build_train_augmentations
from dinodet2.data.mapper import DetrDatasetMapper, filter_by_visibility

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def _rectangles_dataset_dict(tmp_path, h=240, w=320, seed=0):
    """Grey image with non-overlapping rectangles of unique colours; class id = colour index."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    annotations = []
    cells = [(r, c) for r in range(2) for c in range(3)]
    for k, (r, c) in enumerate(cells):
        cw, ch = w // 3, h // 2
        bw, bh = rng.integers(30, cw - 10), rng.integers(30, ch - 10)
        x0, y0 = c * cw + rng.integers(2, cw - bw - 2), r * ch + rng.integers(2, ch - bh - 2)
        image[y0:y0 + bh, x0:x0 + bw] = COLOURS[k]
        annotations.append({"bbox": [int(x0), int(y0), int(bw), int(bh)], "bbox_mode": BoxMode.XYWH_ABS,
                            "category_id": k, "iscrowd": 0})
    path = tmp_path / f"rects_{seed}.png"
    Image.fromarray(image).save(path)
    return {"file_name": str(path), "height": h, "width": w, "image_id": seed, "annotations": annotations}


def _mapper(tiny_cfg, **overrides):
    tiny_cfg.INPUT.MIN_SIZE_TRAIN = (200,)
    tiny_cfg.INPUT.MAX_SIZE_TRAIN = 400
    for key, value in overrides.items():
        tiny_cfg.merge_from_list([key, value])
    return DetrDatasetMapper(tiny_cfg, is_train=True)


def _assert_boxes_enclose_their_colour(mapped):
    image = mapped["image"].permute(1, 2, 0).numpy().astype(np.int32)  # RGB (INPUT.FORMAT)
    inst = mapped["instances"]
    for box, cls in zip(inst.gt_boxes.tensor.tolist(), inst.gt_classes.tolist()):
        x0, y0, x1, y1 = [int(round(v)) for v in box]
        inner = image[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
        if inner.size == 0:
            continue
        match = (np.abs(inner - np.array(COLOURS[cls])).max(-1) <= 12).mean()
        assert match > 0.9, (box, cls, match)
        # just outside the box (where inside the image) is not this colour: the box is tight
        ring = []
        if y0 - 3 >= 0:
            ring.append(image[y0 - 3, x0 + 2:x1 - 2])
        if x1 + 3 < image.shape[1]:
            ring.append(image[y0 + 2:y1 - 2, x1 + 3])
        for strip in ring:
            if len(strip):
                assert (np.abs(strip - np.array(COLOURS[cls])).max(-1) <= 12).mean() < 0.5, (box, cls)


@pytest.mark.parametrize("overrides", [
    {},
    {"INPUT.AUG.LSJ.ENABLED": True, "INPUT.AUG.LSJ.SIZE": 256, "INPUT.AUG.LSJ.SCALE_RANGE": (0.3, 2.0)},
    {"INPUT.AUG.DETR_CROP.ENABLED": True, "INPUT.AUG.DETR_CROP.PROB": 1.0,
     "INPUT.AUG.DETR_CROP.RESIZE_SIZES": (240, 300), "INPUT.AUG.DETR_CROP.CROP_SIZE": (120, 200)},
], ids=["default", "lsj", "detr_crop"])
def test_every_kept_box_encloses_its_own_colour(tiny_cfg, tmp_path, overrides):
    mapper = _mapper(tiny_cfg, **overrides)
    for seed in range(6):
        np.random.seed(seed)
        mapped = mapper(_rectangles_dataset_dict(tmp_path, seed=seed))
        _assert_boxes_enclose_their_colour(mapped)
        boxes = mapped["instances"].gt_boxes.tensor
        h, w = mapped["image"].shape[-2:]
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_lsj_output_has_the_fixed_size(tiny_cfg, tmp_path):
    mapper = _mapper(tiny_cfg, **{"INPUT.AUG.LSJ.ENABLED": True, "INPUT.AUG.LSJ.SIZE": 192})
    np.random.seed(0)
    assert tuple(mapper(_rectangles_dataset_dict(tmp_path))["image"].shape[-2:]) == (192, 192)


def test_visibility_and_size_thresholds_drop_exactly():
    crop = T.TransformList([T.CropTransform(50, 0, 100, 100)])  # keep x in [50, 150)
    annotations = [
        {"bbox": [60, 10, 100, 50], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},   # fully inside
        {"bbox": [30, 10, 70, 50], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},    # half visible
        {"bbox": [140, 10, 190, 50], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 2},  # 10 of 50 px visible
        {"bbox": [60, 10, 63, 50], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 3},    # 3 px wide
    ]

    def kept(**kw):
        return [a["category_id"] for a in filter_by_visibility(annotations, crop, (100, 100), **kw)[0]]

    assert kept() == [0, 1, 2, 3]
    assert kept(min_visibility=0.5) == [0, 1, 3]
    assert kept(min_visibility=0.51) == [0, 3]
    assert kept(min_box_size=3.0) == [0, 1, 2]
    assert kept(min_box_size=2.9, min_visibility=0.21) == [0, 1, 3]


def test_mapper_applies_the_visibility_threshold(tiny_cfg, tmp_path):
    d = _rectangles_dataset_dict(tmp_path)
    strict = _mapper(tiny_cfg.clone(), **{"INPUT.AUG.DETR_CROP.ENABLED": True, "INPUT.AUG.DETR_CROP.PROB": 1.0,
                                          "INPUT.AUG.DETR_CROP.RESIZE_SIZES": (240,),
                                          "INPUT.AUG.DETR_CROP.CROP_SIZE": (100, 120),
                                          "INPUT.AUG.MIN_VISIBILITY": 0.999, "INPUT.RANDOM_FLIP": "none"})
    for seed in range(8):
        np.random.seed(seed)
        mapped = strict(dict(d))
        h, w = mapped["image"].shape[-2:]
        for box in mapped["instances"].gt_boxes.tensor.tolist():  # only (almost) fully visible boxes remain
            assert box[0] > 0 or box[2] < w  # not cut on both sides
        _assert_boxes_enclose_their_colour(mapped)


def test_augmentation_is_deterministic_for_a_seed(tiny_cfg, tmp_path):
    mapper = _mapper(tiny_cfg, **{"INPUT.AUG.LSJ.ENABLED": True, "INPUT.AUG.LSJ.SIZE": 160,
                                  "INPUT.AUG.PHOTOMETRIC.ENABLED": True})
    d = _rectangles_dataset_dict(tmp_path)
    outs = []
    for _ in range(2):
        np.random.seed(7)
        outs.append(mapper(dict(d)))
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert torch.equal(outs[0]["instances"].gt_boxes.tensor, outs[1]["instances"].gt_boxes.tensor)
    np.random.seed(8)
    assert not torch.equal(mapper(dict(d))["image"], outs[0]["image"])


def test_photometric_changes_pixels_not_boxes(tiny_cfg, tmp_path):
    d = _rectangles_dataset_dict(tmp_path)
    plain = _mapper(tiny_cfg.clone(), **{"INPUT.RANDOM_FLIP": "none"})
    photo = _mapper(tiny_cfg.clone(), **{"INPUT.RANDOM_FLIP": "none", "INPUT.AUG.PHOTOMETRIC.ENABLED": True,
                                         "INPUT.AUG.PHOTOMETRIC.PROB": 1.0})
    np.random.seed(0)
    a = plain(dict(d))
    np.random.seed(0)
    b = photo(dict(d))
    assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
    assert not torch.equal(a["image"], b["image"])


def test_hue_rotation_keeps_grey_and_is_invertible():
    rng = np.random.default_rng(0)
    image = rng.uniform(40, 200, size=(8, 8, 3)).astype(np.float32)
    grey = np.full((2, 2, 3), 100.0, dtype=np.float32)
    assert np.allclose(_rotate_hue(grey, 1.0), grey, atol=1e-3)
    assert np.allclose(_rotate_hue(_rotate_hue(image, 0.3), -0.3), image, atol=1e-2)
    assert np.allclose(_rotate_hue(image, 0.0), image)
    assert not np.allclose(_rotate_hue(image, 0.5), image, atol=1.0)
    assert np.allclose(_rotate_hue(image, 0.5).mean(-1), image.mean(-1), atol=1e-3)  # rotation about grey
    with pytest.raises(ValueError, match="HUE"):
        RandomHue(0.7)


def test_default_augmentations_are_detectron2s(tiny_cfg):
    augs = build_train_augmentations(tiny_cfg)
    assert [type(a).__name__ for a in augs] == ["ResizeShortestEdge", "RandomFlip"]


def test_invalid_augmentation_configs(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.INPUT.AUG.LSJ.ENABLED = True
    cfg.INPUT.AUG.DETR_CROP.ENABLED = True
    with pytest.raises(ValueError, match="enable one of them"):
        build_train_augmentations(cfg)
    cfg = tiny_cfg.clone()
    cfg.INPUT.AUG.PHOTOMETRIC.ENABLED = True
    cfg.INPUT.AUG.PHOTOMETRIC.CONTRAST = (1.5, 0.5)
    with pytest.raises(ValueError, match="PHOTOMETRIC.CONTRAST"):
        build_train_augmentations(cfg)
