"""Multi-image augmentations (Mosaic, MixUp, CutMix, Copy-Paste): pixel-exact boxes on images of
uniquely coloured rectangles, exact drops by visibility / size, rare-class preference, the mapper
path (determinism, multiple dataloader workers, label weights)."""
import numpy as np
import pytest
import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.structures import BoxMode
from PIL import Image

from dinodet2.data.mapper import DetrDatasetMapper
from dinodet2.data.multi_image import PasteObject, Sample, copy_paste, cutmix, mixup, mosaic, occlude_boxes
from dinodet2.data.multi_image_pipeline import MultiImageAugmentation, ObjectIndex, cut_object

# 64 distinct colours, none of them the grey background (128) or padding (114); id = class id.
PALETTE = np.array([(r, g, b) for r in (20, 90, 170, 240) for g in (20, 90, 170, 240) for b in (20, 90, 170, 240)],
                   dtype=np.uint8)


def make_sample(h, w, ids, seed=0, grid=(2, 3)):
    """Grey image with one rectangle per id (colour PALETTE[id], class id), one per grid cell."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    boxes = []
    rows, cols = grid
    ch, cw = h // rows, w // cols
    for k, obj_id in enumerate(ids):
        r, c = divmod(k, cols)
        bw, bh = int(rng.integers(cw // 3, cw - 4)), int(rng.integers(ch // 3, ch - 4))
        x0, y0 = c * cw + int(rng.integers(2, cw - bw - 1)), r * ch + int(rng.integers(2, ch - bh - 1))
        image[y0:y0 + bh, x0:x0 + bw] = PALETTE[obj_id]
        boxes.append([x0, y0, x0 + bw, y0 + bh])
    return Sample(image, boxes, list(ids))


def colour_pixels(image, obj_id):
    return np.all(image == PALETTE[obj_id], axis=-1)


def tight_box(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def assert_exact(sample):
    """Every box is exactly the tight box of its own colour's pixels; classes are unique."""
    assert len(set(sample.classes.tolist())) == len(sample.classes)
    for box, obj_id in zip(sample.boxes, sample.classes):
        mask = colour_pixels(sample.image, obj_id)
        assert mask.any(), obj_id
        np.testing.assert_array_equal(box, tight_box(mask), err_msg=f"object {obj_id}")


def visible_fraction(image, obj_id, area):
    return colour_pixels(image, obj_id).sum() / area


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("center", [(160, 120), (90, 200), (230, 70), (60, 60)])
def test_mosaic_boxes_are_exact_and_drops_follow_visibility(center):
    size = 160
    samples = [make_sample(120, 160, range(6 * i, 6 * i + 6), seed=i) for i in range(4)]
    areas = {int(c): float((b[2] - b[0]) * (b[3] - b[1])) for s in samples for b, c in zip(s.boxes, s.classes)}
    out = mosaic(samples, size, center, pad_value=114, min_visibility=0.5)
    assert_exact(out)
    for obj_id, area in areas.items():
        fraction = visible_fraction(out.image, obj_id, area)
        assert (obj_id in out.classes) == (fraction >= 0.5), (obj_id, fraction)
    # the canvas is cropped to the images: no all-padding border row or column
    assert out.image.shape[0] <= 2 * size and out.image.shape[1] <= 2 * size
    assert not np.all(out.image[0] == 114) and not np.all(out.image[:, -1] == 114)


def test_mosaic_resizes_each_image_to_size_with_its_boxes():
    samples = [make_sample(240, 320, range(6 * i, 6 * i + 6), seed=i) for i in range(4)]
    out = mosaic(samples, 160, (160, 160))
    assert out.image.shape[:2] == (240, 320)  # 4 cells of 120 x 160 around the centre
    assert len(out.boxes) == 24
    for box, obj_id in zip(out.boxes, out.classes):  # bilinear resize: colour edges within a pixel
        mask = np.abs(out.image.astype(int) - PALETTE[obj_id]).max(-1) <= 2
        np.testing.assert_allclose(box, tight_box(mask), atol=1.0)


def test_cutmix_pastes_region_boxes_and_occludes_the_base():
    a = make_sample(120, 180, range(0, 6), seed=1)
    b = make_sample(120, 180, range(6, 12), seed=2)
    region = (40, 20, 130, 100)
    out = cutmix(a, b, region, min_visibility=0.3)
    np.testing.assert_array_equal(out.image[20:100, 40:130], b.image[20:100, 40:130])
    assert_exact(out)
    for sample, inside in ((a, False), (b, True)):
        for box, obj_id in zip(sample.boxes, sample.classes):
            area = (box[2] - box[0]) * (box[3] - box[1])
            fraction = visible_fraction(out.image, obj_id, area)
            assert (obj_id in out.classes) == (fraction >= 0.3), (obj_id, inside, fraction)


def test_cutmix_resizes_the_second_image_to_cover_the_first():
    a = make_sample(120, 180, range(0, 6), seed=1)
    b = make_sample(60, 60, [6], seed=2, grid=(1, 1))
    out = cutmix(a, b, (0, 0, 180, 120))  # whole image: b scaled x3 to 180 x 180, top 120 rows kept
    assert out.image.shape == a.image.shape
    assert out.classes.tolist() == [6]
    np.testing.assert_allclose(out.boxes[0], np.clip(b.boxes[0] * 3, 0, [180, 120, 180, 120]), atol=1e-9)


def test_occlusion_thresholds_are_exact():
    sample = Sample(np.zeros((50, 50, 3), np.uint8), [[10, 10, 20, 20], [30, 30, 40, 40], [0, 0, 10, 10]], [0, 1, 2])
    cover = np.zeros((50, 50), bool)
    cover[:, 10:14] = True  # 4 of 10 columns of box 0
    cover[30:40, 33:37] = True  # a vertical band through box 1: box unchanged, 60 % visible
    cover[0:10, 0:10] = True  # box 2 fully covered
    out = occlude_boxes(sample, cover, min_visibility=0.6)
    assert out.classes.tolist() == [0, 1]
    np.testing.assert_array_equal(out.boxes, [[14, 10, 20, 20], [30, 30, 40, 40]])
    out = occlude_boxes(sample, cover, min_visibility=0.61)  # box 0 is exactly 60 % visible
    assert out.classes.tolist() == []
    out = occlude_boxes(sample, cover, min_box_size=6)  # box 0 is now 6 px wide: dropped
    assert out.classes.tolist() == [1]


def test_occlusion_keeps_fractional_coordinates_on_uncovered_sides():
    sample = Sample(np.zeros((40, 40, 3), np.uint8), [[5.5, 6.25, 20.5, 30.75]], [0])
    cover = np.zeros((40, 40), bool)
    cover[:, 15:] = True
    out = occlude_boxes(sample, cover)
    np.testing.assert_allclose(out.boxes, [[5.5, 6.25, 15, 30.75]])


@pytest.mark.parametrize("label_weighting", [False, True])
def test_mixup_blends_pixels_and_keeps_both_box_sets(label_weighting):
    a = make_sample(120, 180, range(0, 6), seed=1)
    b = make_sample(60, 60, [6], seed=2, grid=(1, 1))
    out = mixup(a, b, ratio=0.7, offset=(50, 0), pad_value=114, label_weighting=label_weighting)
    layer = np.full_like(a.image, 114)
    layer[:, 50:170] = np.asarray(Image.fromarray(b.image).resize((120, 120), Image.BILINEAR))
    expected = np.clip(np.round(0.7 * a.image.astype(np.float32) + 0.3 * layer.astype(np.float32)), 0, 255)
    np.testing.assert_allclose(out.image.astype(int), expected.astype(int), atol=1)
    assert out.classes.tolist() == list(range(7))
    np.testing.assert_array_equal(out.boxes[:6], a.boxes)
    np.testing.assert_allclose(out.boxes[6], b.boxes[0] * 2 + [50, 0, 50, 0])
    expected_weights = [0.7] * 6 + [0.3] if label_weighting else [1.0] * 7
    np.testing.assert_allclose(out.weights, expected_weights)


def test_copy_paste_rectangles_and_masks_occlude_in_order():
    base = make_sample(120, 180, range(0, 6), seed=3)
    src = make_sample(120, 180, range(10, 16), seed=4)
    x0, y0, x1, y1 = src.boxes[0].astype(int)
    rect = PasteObject(src.image[y0:y1, x0:x1], None, 10)
    circle = np.zeros((30, 30), bool)
    yy, xx = np.mgrid[:30, :30]
    circle[(yy - 14.5) ** 2 + (xx - 14.5) ** 2 <= 100] = True  # radius 10 disc inside a 30 x 30 patch
    disc = PasteObject(np.full((30, 30, 3), PALETTE[20], np.uint8), circle, 20)
    bx = base.boxes[4].astype(int)  # paste the rectangle over box 4's top-left corner
    positions = [(int(bx[0]) - 3, int(bx[1]) - 3), (100, 60)]
    out = copy_paste(base, [rect, disc], positions, min_visibility=0.2)
    assert_exact(out)
    assert out.classes.tolist()[-2:] == [10, 20]
    np.testing.assert_array_equal(out.boxes[-1], [100 + 5, 60 + 5, 100 + 25, 60 + 25])
    # outside the disc (inside its patch) the base image shows through
    assert not colour_pixels(out.image[60:90, 100:130], 20)[~circle].any()
    for box, obj_id in zip(base.boxes, base.classes):
        fraction = visible_fraction(out.image, obj_id, (box[2] - box[0]) * (box[3] - box[1]))
        assert (obj_id in out.classes) == (fraction >= 0.2), (obj_id, fraction)


def test_cut_object_uses_polygon_or_rle_masks_and_boxes_otherwise():
    image = np.zeros((40, 50, 3), np.uint8)
    image[10:30, 5:25] = 200
    polygon = [[5, 10, 25, 10, 5, 30]]  # lower-left triangle of the square
    anno = {"bbox": [5, 10, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "segmentation": polygon}
    obj = cut_object(image, anno)
    assert obj.patch.shape == (20, 20, 3) and obj.category == 3
    assert obj.mask[0, 0] and obj.mask[15, 0] and obj.mask[0, 15] and not obj.mask[19, 19] and not obj.mask[12, 12]
    assert cut_object(image, anno, use_masks=False).mask is None
    from pycocotools import mask as mask_util

    full = np.zeros((40, 50), np.uint8, order="F")
    full[12:28, 8:20] = 1
    anno_rle = {**anno, "segmentation": mask_util.encode(full)}
    np.testing.assert_array_equal(cut_object(image, anno_rle).mask, full[10:30, 5:25].astype(bool))


def test_object_index_prefers_rare_classes():
    dicts = [{"annotations": [{"category_id": 0, "iscrowd": 0}] * 9 + [{"category_id": 1, "iscrowd": 0}]}
             for _ in range(10)] + [{"annotations": [{"category_id": 2, "iscrowd": 1}]}]
    for power, expected in ((0.0, [0.9, 0.1]), (1.0, [0.5, 0.5]), (2.0, [0.1, 0.9])):
        index = ObjectIndex(dicts, power)
        assert index.class_counts == {0: 90, 1: 10}
        np.testing.assert_allclose(index.class_probabilities, expected)
    rng = np.random.RandomState(0)
    index = ObjectIndex(dicts, 1.0)
    drawn = [dicts[i]["annotations"][j]["category_id"] for i, j in (index.draw(rng) for _ in range(2000))]
    assert abs(np.mean(drawn) - 0.5) < 0.05


# ---------------------------------------------------------------------------------------------
def _rects_dataset(tmp_path, num_images=6):
    dicts = []
    for i in range(num_images):
        sample = make_sample(120, 180, range(6 * i, 6 * i + 6), seed=i)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(sample.image).save(path)
        annotations = [{"bbox": b.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c), "iscrowd": 0}
                       for b, c in zip(sample.boxes, sample.classes)]
        dicts.append({"file_name": str(path), "height": 120, "width": 180, "image_id": i, "annotations": annotations})
    return dicts


ALL_OPS = {"INPUT.AUG.MOSAIC.ENABLED": True, "INPUT.AUG.MOSAIC.PROB": 1.0, "INPUT.AUG.MOSAIC.SIZE": 180,
           "INPUT.AUG.MIXUP.ENABLED": True, "INPUT.AUG.MIXUP.PROB": 1.0, "INPUT.AUG.MIXUP.LABEL_WEIGHTING": True,
           "INPUT.AUG.CUTMIX.ENABLED": True, "INPUT.AUG.CUTMIX.PROB": 1.0,
           "INPUT.AUG.COPY_PASTE.ENABLED": True, "INPUT.AUG.COPY_PASTE.PROB": 1.0}


def _mapper(tiny_cfg, dicts, **overrides):
    tiny_cfg.INPUT.FORMAT = "RGB"
    tiny_cfg.INPUT.MIN_SIZE_TRAIN = (240,)
    tiny_cfg.INPUT.MAX_SIZE_TRAIN = 480
    for key, value in overrides.items():
        tiny_cfg.merge_from_list([key, value])
    return DetrDatasetMapper(tiny_cfg, is_train=True, dataset_dicts=dicts)


@pytest.mark.parametrize("op", ["MOSAIC", "CUTMIX", "COPY_PASTE"])
def test_mapper_boxes_enclose_their_colour_after_each_op(tiny_cfg, tmp_path, op):
    dicts = _rects_dataset(tmp_path)
    mapper = _mapper(tiny_cfg, dicts, **{k: v for k, v in ALL_OPS.items() if k.split(".")[2] == op},
                     **{"INPUT.AUG.MIN_VISIBILITY": 0.3})
    for seed in range(4):
        np.random.seed(seed)
        mapped = mapper(dicts[seed])
        image = mapped["image"].permute(1, 2, 0).numpy().astype(int)
        inst = mapped["instances"]
        assert len(inst) > 0
        for box, cls in zip(inst.gt_boxes.tensor.numpy(), inst.gt_classes.tolist()):
            # An image can be drawn twice (its colours then appear twice): look 3 px around the box.
            x0, y0 = max(int(box[0]) - 3, 0), max(int(box[1]) - 3, 0)
            mask = np.abs(image[y0:int(box[3]) + 4, x0:int(box[2]) + 4] - PALETTE[cls]).max(-1) <= 3
            assert mask.any(), cls
            # the resize blurs colour edges by < 1.5 px
            np.testing.assert_allclose(box, np.add(tight_box(mask), [x0, y0, x0, y0]), atol=1.5)


def test_mapper_is_deterministic_under_a_seed_and_carries_label_weights(tiny_cfg, tmp_path):
    dicts = _rects_dataset(tmp_path)
    mapper = _mapper(tiny_cfg, dicts, **ALL_OPS)
    outputs = []
    for seed in (0, 0, 1):
        np.random.seed(seed)
        outputs.append(mapper(dicts[0]))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    assert torch.equal(outputs[0]["instances"].gt_boxes.tensor, outputs[1]["instances"].gt_boxes.tensor)
    assert outputs[0]["image"].shape != outputs[2]["image"].shape or not torch.equal(outputs[0]["image"],
                                                                                   outputs[2]["image"])
    weights = outputs[0]["instances"].gt_weights
    assert len(weights) == len(outputs[0]["instances"]) and (weights > 0).all() and (weights < 1).any()
    plain_mapper = DetrDatasetMapper(tiny_cfg, is_train=True, dataset_dicts=dicts, strong_augmentation=False)
    assert plain_mapper.multi_image is None  # the data schedule's last iterations: single-image path only
    np.random.seed(0)
    plain = plain_mapper(dicts[0])
    assert not plain["instances"].has("gt_weights") and len(plain["instances"]) == 6


def test_multi_image_loader_is_deterministic_with_two_workers(tiny_cfg, tmp_path):
    dicts = _rects_dataset(tmp_path)
    mapper = _mapper(tiny_cfg, dicts, **ALL_OPS)

    def batches():
        torch.manual_seed(0)  # Detectron2 seeds each worker from the main process's torch seed
        loader = build_detection_train_loader(dicts, mapper=mapper, sampler=TrainingSampler(len(dicts), seed=0),
                                              total_batch_size=2, aspect_ratio_grouping=False, num_workers=2)
        it = iter(loader)
        return [[(x["image"].clone(), x["instances"].gt_boxes.tensor.clone()) for x in next(it)] for _ in range(3)]

    first, second = batches(), batches()
    for batch_a, batch_b in zip(first, second):
        for (img_a, box_a), (img_b, box_b) in zip(batch_a, batch_b):
            assert torch.equal(img_a, img_b) and torch.equal(box_a, box_b)


def test_invalid_multi_image_config_names_the_key(tiny_cfg, tmp_path):
    dicts = _rects_dataset(tmp_path, 1)
    for key, value in (("INPUT.AUG.MOSAIC.PROB", 1.5), ("INPUT.AUG.CUTMIX.AREA_RANGE", (0.5, 0.1)),
                       ("INPUT.AUG.MIXUP.ALPHA", 0.0), ("INPUT.AUG.COPY_PASTE.MAX_OBJECTS", 0)):
        op = key.split(".")[2]
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            _mapper(tiny_cfg.clone(), dicts, **{f"INPUT.AUG.{op}.ENABLED": True, key: value})


def test_multi_image_augmentation_is_off_by_default(tiny_cfg):
    assert DetrDatasetMapper(tiny_cfg, is_train=True).multi_image is None
    assert MultiImageAugmentation.from_config(tiny_cfg, [{"annotations": []}]) is None
