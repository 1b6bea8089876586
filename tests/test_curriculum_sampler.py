"""Tests of dinodet2.data.curriculum_sampler: difficulty scores, the pool schedule and CurriculumSampler."""
import itertools
import logging

import numpy as np
import pytest

from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.structures import BoxMode
from detectron2.utils import comm

from dinodet2.config import add_dinodet2_config
from dinodet2.data.curriculum_sampler import (
    CurriculumSampler,
    build_curriculum_sampler,
    difficulty_scores,
    pool_fraction,
    pool_size,
)


def _anno(bbox, mode=BoxMode.XYXY_ABS, iscrowd=0):
    return {"bbox": list(bbox), "bbox_mode": mode, "category_id": 0, "iscrowd": iscrowd}


def _handcrafted_dataset():
    """Five images whose score terms (count / 3, small fraction, mean highest IoU) are known."""
    return [
        # Two 10x10 (small) boxes overlapping in a 5x10 strip: IoU = 50 / 150 = 1/3. The big crowd
        # box is ignored (it would add a third, non-small, overlapping box).
        {"image_id": 0, "annotations": [_anno([0, 0, 10, 10]), _anno([5, 0, 15, 10]),
                                        _anno([0, 0, 100, 100], iscrowd=1)]},
        # XYWH input: 40x40 (area 1600, not small) and 20x20 (area 400, small); plus a 50x50 XYXY
        # box; no two overlap. Read as XYXY, the XYWH boxes would be 30x30 (900) and empty, both small.
        {"image_id": 1, "annotations": [_anno([10, 10, 40, 40], BoxMode.XYWH_ABS),
                                        _anno([100, 100, 20, 20], BoxMode.XYWH_ABS),
                                        _anno([200, 200, 250, 250])]},
        {"image_id": 2, "annotations": []},
        {"image_id": 3, "annotations": [_anno([0, 0, 50, 50], iscrowd=1)]},
        {"image_id": 4, "annotations": [_anno([0, 0, 100, 100])]},
    ]


# Terms per image: [count / max count (3), small fraction, mean highest IoU].
HANDCRAFTED_TERMS = np.array([
    [2 / 3, 1.0, 1 / 3],
    [1.0, 1 / 3, 0.0],
    [0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0],
    [1 / 3, 0.0, 0.0],
])


# ------------------------------------------------------------------------------------------------
# Difficulty scores
# ------------------------------------------------------------------------------------------------

def test_difficulty_scores_default_weights_exact():
    scores = difficulty_scores(_handcrafted_dataset())
    assert scores.dtype == np.float64 and scores.shape == (5,)
    np.testing.assert_allclose(scores, [2.0, 4 / 3, 0.0, 0.0, 1 / 3], rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights", [(2.0, 0.5, 3.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_difficulty_scores_weights_each_term(weights):
    scores = difficulty_scores(_handcrafted_dataset(), weights=weights)
    np.testing.assert_allclose(scores, HANDCRAFTED_TERMS @ np.array(weights), rtol=0, atol=1e-12)


def test_small_area_threshold_is_strict():
    # Image 0's boxes have area exactly 100: small below a threshold of 100.5, not at 100.
    data = _handcrafted_dataset()
    assert difficulty_scores(data, (0, 1, 0), small_area=100.5)[0] == pytest.approx(1.0)
    assert difficulty_scores(data, (0, 1, 0), small_area=100.0)[0] == pytest.approx(0.0)
    # Image 1: only the 20x20 XYWH box (400 px) is below 1000, not the 40x40 one (1600 px).
    assert difficulty_scores(data, (0, 1, 0), small_area=1000.0)[1] == pytest.approx(1 / 3)


def test_overlap_is_mean_of_per_box_highest_iou():
    # A-B: 50 / 150 = 1/3; A-C: 50 / 100 = 1/2; B-C: 25 / 125 = 1/5.
    # Highest per box: A 1/2, B 1/3, C 1/2 -> mean 4/9 (the mean over pairs would be 31/90).
    data = [{"annotations": [_anno([0, 0, 10, 10]), _anno([5, 0, 15, 10]), _anno([0, 0, 10, 5])]}]
    assert difficulty_scores(data, (0, 0, 1))[0] == pytest.approx(4 / 9, abs=1e-12)


def test_dataset_without_objects_scores_zero():
    np.testing.assert_array_equal(difficulty_scores([{"annotations": []}, {}]), [0.0, 0.0])


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, -0.5, 1.0), (0.0, 0.0, 0.0), (1.0, float("nan"), 1.0),
                                     (1.0, True, 1.0), 1.0])
def test_difficulty_weights_validation(weights):
    with pytest.raises(ValueError, match="CURRICULUM.SAMPLING.DIFFICULTY_WEIGHTS"):
        difficulty_scores(_handcrafted_dataset(), weights=weights)


def test_small_area_validation():
    with pytest.raises(ValueError, match="CURRICULUM.SAMPLING.SMALL_AREA"):
        difficulty_scores(_handcrafted_dataset(), small_area=-1.0)


# ------------------------------------------------------------------------------------------------
# Pool schedule
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("iteration, expected", [(0, 0.3), (25, 0.475), (50, 0.65), (99, 0.993), (100, 1.0),
                                                 (1000, 1.0)])
def test_pool_fraction_linear(iteration, expected):
    assert pool_fraction(iteration, 0.3, 100) == pytest.approx(expected)
    assert pool_fraction(iteration, 0.3, 100, "linear") == pytest.approx(expected)


@pytest.mark.parametrize("iteration, expected", [(0, 0.3), (25, 0.65), (64, 0.86), (100, 1.0), (500, 1.0)])
def test_pool_fraction_sqrt(iteration, expected):
    assert pool_fraction(iteration, 0.3, 100, "sqrt") == pytest.approx(expected)


def test_pool_fraction_without_ramp_is_full():
    assert pool_fraction(0, 0.3, 0) == 1.0
    assert pool_fraction(7, 0.3, 0, "sqrt") == 1.0


@pytest.mark.parametrize("iteration, expected", [(0, 3), (10, 4), (50, 7), (99, 10), (100, 10), (200, 10)])
def test_pool_size(iteration, expected):
    # 10 images, fraction 0.3 + 0.7 * t / 100: 3.0 -> 3 (no float-noise extra image), 3.7 -> 4, 6.5 -> 7.
    assert pool_size(iteration, 10, 0.3, 100, "linear") == expected


def test_pool_size_bounds():
    assert pool_size(0, 10, 0.001, 100) == 1
    assert pool_size(0, 1, 0.3, 100) == 1
    assert pool_size(0, 7, 1.0, 100) == 7
    assert pool_size(30, 100, 0.2, 120, "sqrt") == 60  # 0.2 + 0.8 * 0.5 = 0.6


@pytest.mark.parametrize("kwargs, key", [
    ({"start_fraction": 0.0}, "START_FRACTION"),
    ({"start_fraction": 1.5}, "START_FRACTION"),
    ({"start_fraction": -0.1}, "START_FRACTION"),
    ({"ramp_iters": -1}, "RAMP_ITERS"),
    ({"ramp_iters": 10.5}, "RAMP_ITERS"),
    ({"schedule": "cosine"}, "SCHEDULE"),
])
def test_pool_schedule_validation(kwargs, key):
    args = {"iteration": 0, "start_fraction": 0.3, "ramp_iters": 100, "schedule": "linear", **kwargs}
    with pytest.raises(ValueError, match=f"CURRICULUM.SAMPLING.{key}"):
        pool_fraction(**args)
    with pytest.raises(ValueError, match=f"CURRICULUM.SAMPLING.{key}"):
        pool_size(num_images=10, **args)
    with pytest.raises(ValueError, match=f"CURRICULUM.SAMPLING.{key}"):
        CurriculumSampler(np.zeros(10), 4, args["start_fraction"], args["ramp_iters"], args["schedule"], seed=0)


# ------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------

N_IMAGES = 20
BATCH = 4
# Scores with ties (broken by index) so that the easiest-first order is not the identity.
DIFFICULTY = np.array([0.5, 0.1, 0.9, 0.1, 0.0, 0.7, 0.3, 0.3, 0.8, 0.2,
                       0.6, 0.0, 0.4, 0.95, 0.15, 0.3, 0.55, 0.05, 0.65, 0.85])
EASIEST_FIRST = sorted(range(N_IMAGES), key=lambda i: (DIFFICULTY[i], i))
# START_FRACTION 0.25, RAMP_ITERS 10, linear: ceil(20 * (0.25 + 0.75 * t / 10)) = ceil(5 + 1.5 t).
EXPECTED_POOL_SIZES = [5, 7, 8, 10, 11, 13, 14, 16, 17, 19, 20, 20, 20]


def _sampler(**kwargs):
    args = {"difficulty": DIFFICULTY, "batch_size": BATCH, "start_fraction": 0.25, "ramp_iters": 10,
            "schedule": "linear", "seed": 7, **kwargs}
    return CurriculumSampler(**args)


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def _batches(stream, batch_size=BATCH):
    return [stream[i:i + batch_size] for i in range(0, len(stream), batch_size)]


def test_sorted_indices_and_pools():
    sampler = _sampler()
    assert sampler.sorted_indices.tolist() == EASIEST_FIRST
    assert sampler.batch_size == BATCH and sampler.start_iter == 0
    for t, size in enumerate(EXPECTED_POOL_SIZES):
        assert sampler.pool_at(t).tolist() == EASIEST_FIRST[:size]


def test_stream_draws_from_scheduled_pools():
    n_iters = len(EXPECTED_POOL_SIZES)
    stream = _take(_sampler(), n_iters * BATCH)
    assert all(isinstance(i, int) for i in stream)
    for t, batch in enumerate(_batches(stream)):
        assert set(batch) <= set(EASIEST_FIRST[:EXPECTED_POOL_SIZES[t]]), (t, batch)
        # A fresh permutation every iteration while the pool grows: no repeats inside a batch.
        assert len(set(batch)) == BATCH
    # The ramp does reach the hardest images.
    assert EASIEST_FIRST[-1] in stream


def test_permutations_without_repeats():
    # 8 images, START_FRACTION 0.5, RAMP_ITERS 100: pool 4 at iteration 0, then 5 for iterations
    # 1..25 (ceil(4 + 4 t / 100)). A new permutation starts with iteration 1 (size change); then
    # every block of 5 draws is a permutation of the 5-image pool.
    difficulty = np.arange(8, dtype=float)[::-1]  # easiest first: 7, 6, 5, ...
    sampler = CurriculumSampler(difficulty, 2, 0.5, 100, seed=3)
    stream = _take(sampler, 2 + 25 * 2)
    assert set(stream[:2]) <= {7, 6, 5, 4} and len(set(stream[:2])) == 2
    blocks = [stream[i:i + 5] for i in range(2, len(stream), 5)]
    assert len(blocks) == 10
    for block in blocks:
        assert sorted(block) == [3, 4, 5, 6, 7]
    # Shuffled, not in a fixed order.
    assert len({tuple(block) for block in blocks}) > 1


def test_full_pool_is_plain_epoch_shuffle():
    stream = _take(_sampler(start_fraction=1.0), 3 * N_IMAGES)
    for epoch in range(3):
        assert sorted(stream[epoch * N_IMAGES:(epoch + 1) * N_IMAGES]) == list(range(N_IMAGES))


def test_start_iter_uses_pool_of_resumed_iteration():
    k = 5
    sampler = _sampler(start_iter=k)
    assert sampler.start_iter == k
    stream = _take(sampler, 4 * BATCH)
    for j, batch in enumerate(_batches(stream)):
        assert set(batch) <= set(EASIEST_FIRST[:EXPECTED_POOL_SIZES[k + j]])
    # Resumed at the end of the ramp: the first 20 draws are one permutation of all images
    # (a sampler ignoring start_iter would draw from the 5 easiest).
    assert sorted(_take(_sampler(start_iter=10), N_IMAGES)) == list(range(N_IMAGES))


def test_deterministic_per_seed():
    assert _take(_sampler(seed=11), 100) == _take(_sampler(seed=11), 100)
    assert _take(_sampler(seed=11), 100) != _take(_sampler(seed=12), 100)
    # Iterating a sampler twice restarts the same stream (each loader worker iterates its own copy).
    sampler = _sampler(seed=11)
    assert _take(sampler, 50) == _take(sampler, 50)


@pytest.mark.parametrize("kwargs", [{"difficulty": []}, {"difficulty": [0.1, float("nan")]},
                                    {"difficulty": np.zeros((2, 2))}, {"batch_size": 0},
                                    {"start_iter": -1}])
def test_sampler_validation(kwargs):
    with pytest.raises(ValueError):
        _sampler(**kwargs)


def _patch_world(monkeypatch, rank, world_size):
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    monkeypatch.setattr(comm, "get_world_size", lambda: world_size)


def test_ranks_get_disjoint_interleaved_shards(monkeypatch):
    n_positions = 15 * BATCH
    single = _take(_sampler(), n_positions)
    shards = []
    for rank in range(2):
        _patch_world(monkeypatch, rank, 2)
        shards.append(_take(_sampler(), n_positions // 2))
    assert shards[0] != shards[1]
    # Each global batch: 2 images per rank, disjoint, all from that iteration's pool.
    for t in range(15):
        parts = [set(shard[t * 2:(t + 1) * 2]) for shard in shards]
        assert not parts[0] & parts[1], t
        assert parts[0] | parts[1] <= set(EASIEST_FIRST[:EXPECTED_POOL_SIZES[min(t, 12)]])
    # The shards interleave to the single-rank stream.
    assert [i for pair in zip(*shards) for i in pair] == single


def test_detectron2_loader_with_workers_keeps_pools():
    dataset = [{"id": i, "width": 32, "height": 32} for i in range(N_IMAGES)]
    sampler = _sampler()
    loader = build_detection_train_loader(dataset=dataset, mapper=lambda d: d, sampler=sampler, total_batch_size=BATCH,
                                          aspect_ratio_grouping=False, num_workers=2, collate_fn=lambda x: x)
    n_iters = len(EXPECTED_POOL_SIZES)
    batches = [[d["id"] for d in batch] for batch in itertools.islice(loader, n_iters)]
    for t, batch in enumerate(batches):
        assert set(batch) <= set(sampler.pool_at(t).tolist()), (t, batch)
    # Worker sharding by chunks of the batch size: batch t is exactly positions [4t, 4t + 4).
    assert batches == _batches(_take(sampler, n_iters * BATCH))


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_build_curriculum_sampler_from_cfg():
    cfg = get_cfg()
    add_dinodet2_config(cfg)
    cfg.SOLVER.IMS_PER_BATCH = 2
    c = cfg.CURRICULUM.SAMPLING
    c.START_FRACTION, c.RAMP_ITERS, c.SCHEDULE = 0.4, 20, "sqrt"
    c.DIFFICULTY_WEIGHTS, c.SMALL_AREA = (2.0, 0.5, 3.0), 100.5
    data = _handcrafted_dataset()
    handler = _ListHandler()
    logger = logging.getLogger("dinodet2.data.curriculum_sampler")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        sampler = build_curriculum_sampler(cfg, data, start_iter=5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    # Terms as in the handcrafted terms (SMALL_AREA 100.5 keeps image 0's boxes small).
    scores = HANDCRAFTED_TERMS @ np.array([2.0, 0.5, 3.0])
    assert sampler.sorted_indices.tolist() == sorted(range(5), key=lambda i: (scores[i], i)) == [2, 3, 4, 1, 0]
    assert sampler.batch_size == 2 and sampler.start_iter == 5
    # sqrt at 5 / 20: 0.4 + 0.6 * 0.5 = 0.7 -> ceil(3.5) = 4 images.
    assert sampler.pool_at(5).tolist() == [2, 3, 4, 1]
    assert all(i in (2, 3, 4, 1) for i in _take(sampler, 2))
    assert len(handler.messages) == 1
    message = handler.messages[0]
    assert "5 images" in message and "pool at iteration 5: 4 images" in message and "sqrt" in message
