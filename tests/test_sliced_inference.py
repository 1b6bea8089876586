"""Sliced (tiled) inference: the tile grid, cut-box dropping, class-aware merging (NMS / WBF), exact
recovery of known boxes through a fake detector, batching of tiles, the test-time resize of each tile,
the config checks, and the evaluation path (``Trainer.test`` with ``TEST.SLICED.ENABLED`` scored by
COCOEvaluator)."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

from dinodet2.inference import (SlicedDetector, SlicedInference, SlicedPredictor, TileGrid, check_sliced_config,
                                tile_starts, weighted_box_fusion)
from dinodet2.inference.box_merging import nms_merge

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# A fake detector: objects are rectangles whose pixels hold (id, class, score * 255) in channels
# (0, 1, 2); it "detects" each id's bounding rectangle, mapped to the input's height / width.
# ------------------------------------------------------------------------------------------------
class RectangleDetector(torch.nn.Module):
    """Detects the id-coded rectangles of its input images; records each forward's inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []  # one list of (image H, W, height, width) per forward

    def forward(self, batched_inputs):
        self.calls.append([(*x["image"].shape[-2:], x["height"], x["width"]) for x in batched_inputs])
        outputs = []
        for x in batched_inputs:
            image = x["image"].long()
            h, w = image.shape[-2:]
            boxes, scores, classes = [], [], []
            for obj in image[0].unique():
                if obj == 0:
                    continue
                ys, xs = torch.nonzero(image[0] == obj, as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                classes.append(int(image[1, ys[0], xs[0]]))
                scores.append(float(image[2, ys[0], xs[0]]) / 255)
            scale = torch.tensor([x["width"] / w, x["height"] / h] * 2)
            result = Instances((x["height"], x["width"]))
            result.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale)
            result.scores = torch.tensor(scores, dtype=torch.float32)
            result.pred_classes = torch.tensor(classes, dtype=torch.int64)
            outputs.append({"instances": result})
        return outputs


def draw_rectangles(height, width, rectangles):
    """``CHW`` uint8 image of ``rectangles`` ([(x0, y0, x1, y1, class)]; ids 1, 2, ...; score of
    id ``i``: (255 - i) / 255) and their expected detections (boxes, scores, classes)."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for i, (x0, y0, x1, y1, c) in enumerate(rectangles, start=1):
        image[:, y0:y1, x0:x1] = torch.tensor([i, c, 255 - i], dtype=torch.uint8)[:, None, None]
    boxes = torch.tensor([r[:4] for r in rectangles], dtype=torch.float32)
    scores = torch.tensor([(255 - i) / 255 for i in range(1, len(rectangles) + 1)])
    return image, boxes, scores, torch.tensor([r[4] for r in rectangles])


def sliced(**kwargs):
    """A SlicedInference without a resize (the fake detector's pixels stay exact)."""
    args = dict(tile_size=64, overlap=24, full_image=False, merge="nms", merge_iou=0.5, max_detections=100,
                tile_batch=4, cut_box_margin=0.5, resize=[])
    args.update(kwargs)
    return SlicedInference(**args)


def sorted_rows(boxes, scores, classes):
    rows = torch.cat([boxes, scores[:, None], classes[:, None].float()], 1)
    return rows[torch.argsort(rows[:, 4], descending=True, stable=True)]


# ------------------------------------------------------------------------------------------------
# tile grid
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(1, 1), (63, 64), (65, 129), (157, 203), (300, 97), (513, 1000)])
@pytest.mark.parametrize("tile,overlap", [(64, 0), (64, 24), (64, 63), (100, 37)])
def test_tiles_cover_the_image_exactly(height, width, tile, overlap):
    grid = TileGrid.over(height, width, tile, overlap)
    coverage = torch.zeros(height, width, dtype=torch.int64)
    for x0, y0, x1, y1 in grid.tiles():
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height  # inside the image
        assert (x1 - x0, y1 - y0) == (min(tile, width), min(tile, height))
        coverage[y0:y1, x0:x1] += 1
    assert bool((coverage > 0).all())
    for starts, length in ((grid.xs, width), (grid.ys, height)):
        assert starts[0] == 0 and starts[-1] == max(length - tile, 0)  # last tile on the border
        steps = np.diff(starts)
        assert (steps > 0).all() and (steps <= tile - overlap).all()  # neighbours overlap >= overlap
    assert len(grid) == len(grid.tiles())


def test_tile_starts_hand_example():
    assert tile_starts(200, 64, 24) == [0, 40, 80, 120, 136]
    assert tile_starts(64, 64, 24) == [0]
    assert tile_starts(50, 64, 24) == [0]


def test_cut_by_inner_edge():
    grid = TileGrid.over(100, 100, 64, 28)  # xs = ys = (0, 36)
    boxes = torch.tensor([[50.0, 10, 64, 20],  # cut by tile 0's right edge, inside tile 1: dropped
                          [30.0, 10, 64, 20],  # cut, but starts before tile 1 (> overlap): kept
                          [0.0, 0, 10, 10],  # on the image border: kept
                          [40.0, 40, 50, 50],  # not touching an edge: kept
                          [10.0, 56, 20, 64]])  # cut by the bottom edge, inside tile 2: dropped
    assert grid.cut_by_inner_edge(boxes, 0, margin=0.5).tolist() == [True, False, False, False, True]
    # tile 3 (bottom right): its left / top edges are inner edges, its right / bottom the image border
    boxes = torch.tensor([[36.0, 70, 50, 80], [36.0, 70, 70, 80], [80.0, 90, 100, 100]])
    assert grid.cut_by_inner_edge(boxes, 3, margin=0.5).tolist() == [True, False, False]


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
def test_weighted_box_fusion_hand_example():
    boxes = torch.tensor([[0.0, 0, 10, 10], [2.0, 2, 12, 12], [0.0, 0, 10, 10], [50.0, 50, 60, 60],
                          [1.0, 1, 11, 11]])
    scores = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.3])
    classes = torch.tensor([0, 0, 1, 0, 0])
    fused, fused_scores, fused_classes = weighted_box_fusion(boxes, scores, classes, iou_threshold=0.4)
    # class 0: boxes 0, 1 and 4 (IoU with box 0: 0.47 and 0.68) fuse; box 3 alone; class 1 alone
    expected_box = (0.9 * boxes[0] + 0.6 * boxes[1] + 0.3 * boxes[4]) / 1.8
    assert torch.allclose(fused, torch.stack([expected_box, boxes[2], boxes[3]]))
    assert fused_scores.tolist() == pytest.approx([0.9, 0.8, 0.7])  # the leader's score
    assert fused_classes.tolist() == [0, 1, 0]


@pytest.mark.parametrize("merge", [nms_merge, weighted_box_fusion])
def test_merging_is_class_aware(merge):
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [0.0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    kept, kept_scores, kept_classes = merge(boxes, scores, torch.tensor([0, 1, 0]), 0.5)
    assert kept_classes.tolist() == [0, 1]  # the other class' overlapping box survives
    assert kept_scores.tolist() == pytest.approx([0.9, 0.8])
    kept, _, _ = merge(boxes, scores, torch.tensor([0, 0, 0]), 0.5)
    assert len(kept) == 1


# ------------------------------------------------------------------------------------------------
# sliced inference with the fake detector
# ------------------------------------------------------------------------------------------------
def rectangles_across_tile_edges(height, width, tile, overlap):
    """Non-overlapping rectangles (at most ``overlap`` px) straddling every inner tile edge and
    corner, plus some inside tiles and on image borders."""
    grid = TileGrid.over(height, width, tile, overlap)
    rects, taken = [], torch.zeros(height, width, dtype=torch.bool)

    def add(x0, y0, w, h, c):
        x0, y0 = max(0, min(x0, width - w)), max(0, min(y0, height - h))
        if not taken[max(0, y0 - 1):y0 + h + 1, max(0, x0 - 1):x0 + w + 1].any():
            taken[y0:y0 + h, x0:x0 + w] = True
            rects.append((x0, y0, x0 + w, y0 + h, c))

    for i, x in enumerate(grid.xs[1:]):  # straddle the left edge of every column but the first
        for j, y in enumerate(grid.ys):
            add(x - 5, y + 10 + 3 * i, 12, 9, (i + j) % 3)
    for j, y in enumerate(grid.ys[1:]):
        for i, x in enumerate(grid.xs):
            add(x + 30 + 2 * j, y - 4, 10, 11, (i + 2 * j) % 3)
    for x in grid.xs[1:]:  # corners
        for y in grid.ys[1:]:
            add(x - 3, y - 3, 8, 8, 2)
    for x, y in ((x1 - 1 - 6, y1 - 1 - 6) for x0, y0, x1, y1 in grid.tiles()):  # inner tile corners
        add(x, y, 7, 7, 1)
    add(0, 0, 9, 9, 0)
    add(width - 9, height - 9, 9, 9, 1)
    return rects


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_recovers_known_boxes_exactly(merge):
    height, width, tile, overlap = 157, 203, 64, 24
    rects = rectangles_across_tile_edges(height, width, tile, overlap)
    assert len(rects) > 20
    image, boxes, scores, classes = draw_rectangles(height, width, rects)
    detector = RectangleDetector()
    result = sliced(merge=merge)(detector, image)
    assert result.image_size == (height, width)
    # every object once, exactly, with its class and score (cut copies dropped, whole copies merged)
    got = sorted_rows(result.pred_boxes.tensor, result.scores, result.pred_classes)
    expected = sorted_rows(boxes, scores, classes)
    assert got.shape == expected.shape
    # WBF averages identical copies: equal up to float rounding
    assert torch.equal(got, expected) if merge == "nms" else torch.allclose(got, expected, rtol=0, atol=1e-4)
    # without dropping the cut copies, some would survive the merge
    uncut = sliced(merge=merge, cut_box_margin=0.5)
    uncut.cut_box_margin = -1e9
    assert len(uncut(RectangleDetector(), image)) > len(rects)


def test_tiles_are_batched():
    image, boxes, _, _ = draw_rectangles(157, 203, [(10, 10, 20, 20, 0)])
    detector = RectangleDetector()
    grid = TileGrid.over(157, 203, 64, 24)
    sliced(tile_batch=4, full_image=True)(detector, image)
    num_inputs = len(grid) + 1
    assert [len(c) for c in detector.calls] == [4] * (num_inputs // 4) + [num_inputs % 4] * bool(num_inputs % 4)
    assert detector.calls[-1][-1] == (157, 203, 157, 203)  # the full-image pass, last
    assert all(call[:2] == (64, 64) for calls in detector.calls for call in calls[:-1])


def test_image_smaller_than_a_tile_is_one_tile():
    image, boxes, scores, classes = draw_rectangles(40, 50, [(0, 0, 10, 10, 1), (30, 20, 50, 40, 2)])
    detector = RectangleDetector()
    result = sliced(full_image=True)(detector, image)
    assert detector.calls == [[(40, 50, 40, 50)]]  # the image once: no duplicate full-image pass
    assert torch.equal(sorted_rows(result.pred_boxes.tensor, result.scores, result.pred_classes),
                       sorted_rows(boxes, scores, classes))


def test_max_detections():
    rects = [(10 * i, 0, 10 * i + 5, 5, 0) for i in range(10)]
    image, _, scores, _ = draw_rectangles(30, 100, rects)
    result = sliced(max_detections=3)(RectangleDetector(), image)
    assert result.scores.tolist() == pytest.approx(scores[:3].tolist())


def test_tiles_get_the_test_time_resize(tiny_cfg):
    """Each tile reaches the model as DefaultPredictor would give it: original pixels resized by
    INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, with the tile's size as height / width."""
    tiny_cfg.TEST.SLICED.TILE_SIZE = 100
    tiny_cfg.TEST.SLICED.OVERLAP = 0.25
    received = []

    class Recorder(torch.nn.Module):
        def forward(self, batched_inputs):
            received.extend(batched_inputs)
            return [{"instances": Instances((x["height"], x["width"]), pred_boxes=Boxes(torch.zeros(0, 4)),
                                            scores=torch.zeros(0), pred_classes=torch.zeros(0, dtype=torch.long))}
                    for x in batched_inputs]

    image = torch.randint(0, 256, (3, 130, 170), dtype=torch.uint8)
    SlicedInference(tiny_cfg)(Recorder(), image)
    grid = TileGrid.over(130, 170, 100, 25)
    assert len(received) == len(grid) + 1
    resize = T.ResizeShortestEdge([tiny_cfg.INPUT.MIN_SIZE_TEST] * 2, tiny_cfg.INPUT.MAX_SIZE_TEST)
    for x, crop in zip(received, [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in grid.tiles()] + [image]):
        hwc = crop.permute(1, 2, 0).numpy()
        expected = resize.get_transform(hwc).apply_image(hwc)
        assert torch.equal(x["image"], torch.from_numpy(expected.copy()).permute(2, 0, 1))
        assert (x["height"], x["width"]) == tuple(crop.shape[-2:])
    assert received[0]["image"].shape[-2] == tiny_cfg.INPUT.MIN_SIZE_TEST  # really resized


@pytest.mark.parametrize("key,value,message", [
    ("TILE_SIZE", 0, "TILE_SIZE"), ("OVERLAP", 600.0, "OVERLAP"), ("OVERLAP", 512, "OVERLAP"),
    ("OVERLAP", -0.1, "OVERLAP"), ("MERGE", "soft-nms", "MERGE"), ("MERGE_IOU", 1.0, "MERGE_IOU"),
    ("TILE_BATCH", 0, "TILE_BATCH"), ("MAX_DETECTIONS", 0, "MAX_DETECTIONS"), ("CUT_BOX_MARGIN", -1.0, "CUT_BOX_MARGIN"),
])
def test_config_checks(tiny_cfg, key, value, message):
    check_sliced_config(tiny_cfg)  # defaults are valid
    tiny_cfg.TEST.SLICED[key] = value
    with pytest.raises(ValueError, match=f"TEST.SLICED.{message}"):
        check_sliced_config(tiny_cfg)


# ------------------------------------------------------------------------------------------------
# evaluation path and Python API
# ------------------------------------------------------------------------------------------------
def _register_rectangles_dataset(name, folder, images):
    """A COCO-style dataset of PNG images of id-coded rectangles (see draw_rectangles)."""
    from PIL import Image

    dicts = []
    for k, (height, width, rects) in enumerate(images):
        image, _, _, _ = draw_rectangles(height, width, rects)
        path = folder / f"{k}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)  # RGB: R = id
        dicts.append({"file_name": str(path), "image_id": k, "height": height, "width": width,
                      "annotations": [{"bbox": list(r[:4]), "bbox_mode": 0, "category_id": r[4], "iscrowd": 0}
                                      for r in rects]})
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])


def test_trainer_test_scores_sliced_inference(tiny_cfg, tmp_path):
    from dinodet2.engine import Trainer

    name = "sliced_rectangles_test"
    images = [(157, 203, rectangles_across_tile_edges(157, 203, 64, 24)),
              (90, 70, [(5, 5, 20, 30, 0), (40, 50, 60, 80, 2)])]
    _register_rectangles_dataset(name, tmp_path, images)
    try:
        cfg = tiny_cfg
        cfg.DATASETS.TEST = (name,)
        cfg.OUTPUT_DIR = str(tmp_path / "output")
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.INPUT.MIN_SIZE_TEST = 0  # no resize: the fake detector reads exact pixel ids
        cfg.TEST.SLICED.ENABLED = True
        cfg.TEST.SLICED.TILE_SIZE = 64
        cfg.TEST.SLICED.OVERLAP = 24
        cfg.TEST.SLICED.TILE_BATCH = 3
        cfg.TEST.SLICED.CUT_BOX_MARGIN = 0.5
        detector = RectangleDetector()
        results = Trainer.test(cfg, detector)
        assert results["bbox"]["AP"] == pytest.approx(100.0)
        # the loader gave original-size images; the model saw tiles (+ the full image), in batches of 3
        num_inputs = [len(TileGrid.over(h, w, 64, 24)) + (len(TileGrid.over(h, w, 64, 24)) > 1) for h, w, _ in images]
        assert len(detector.calls) == sum(math.ceil(n / 3) for n in num_inputs)
        assert max(len(c) for c in detector.calls) == 3
        assert (157, 203, 157, 203) in [x for c in detector.calls for x in c]
        # the same detector without slicing: one forward per image
        cfg.TEST.SLICED.ENABLED = False
        detector = RectangleDetector()
        assert Trainer.test(cfg, detector)["bbox"]["AP"] == pytest.approx(100.0)
        assert detector.calls == [[(157, 203, 157, 203)], [(90, 70, 90, 70)]]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_sliced_predictor_and_detector_with_a_tiny_model(tiny_cfg):
    tiny_cfg.TEST.SLICED.TILE_SIZE = 96
    tiny_cfg.TEST.SLICED.MERGE = "wbf"
    predictor = SlicedPredictor(tiny_cfg)
    image_bgr = np.random.default_rng(0).integers(0, 256, (150, 230, 3), dtype=np.uint8)
    instances = predictor(image_bgr)["instances"]
    assert instances.image_size == (150, 230)
    assert 0 < len(instances) <= tiny_cfg.TEST.SLICED.MAX_DETECTIONS
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 230).all() and (boxes[:, 3] <= 150).all()
    # the evaluation wrapper gives the same detections (RGB CHW input), mapped to height / width
    wrapper = SlicedDetector(predictor.model, predictor.sliced).eval()
    image = torch.from_numpy(np.ascontiguousarray(image_bgr[:, :, ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        out = wrapper([{"image": image, "height": 300, "width": 460}])[0]["instances"]
    assert out.image_size == (300, 460)
    assert torch.allclose(out.pred_boxes.tensor, boxes * 2, atol=1e-3)
    with pytest.raises(RuntimeError, match="inference"):
        wrapper.train()([{"image": image}])


def test_visualize_predictions_uses_the_sliced_predictor(tiny_cfg, tmp_path):
    import sys

    from detectron2.modeling import build_model

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        from visualize_predictions import build_predictor
    finally:
        sys.path.remove(str(REPO_ROOT / "tools"))
    trained = build_model(tiny_cfg)
    torch.save({"model": trained.state_dict()}, tmp_path / "weights.pth")
    tiny_cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    tiny_cfg.TEST.SLICED.ENABLED = True
    tiny_cfg.TEST.SLICED.TILE_SIZE = 96
    predictor = build_predictor(tiny_cfg)
    assert isinstance(predictor, SlicedPredictor)
    loaded = predictor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
    image_bgr = np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    assert predictor(image_bgr)["instances"].image_size == (120, 200)
