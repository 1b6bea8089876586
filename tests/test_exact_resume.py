"""Exact resume: a run interrupted (an exception at chosen iterations, like a kill) and resumed with
--resume reproduces the uninterrupted run's loss at every iteration and its final weights; the
training stream behind it is a pure function of (seed, iteration) for every sampler."""
import itertools

import numpy as np
import pytest
import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.engine import HookBase

from dinodet2.data.train_stream import SeededMapDataset, TrainStream, aspect_ratio_groups, derive_seed


class _Interrupt(Exception):
    pass


class _InterruptAt(HookBase):
    """Raises after the step of ``iteration`` (after its checkpoint, like a kill a moment later)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise _Interrupt(self.iteration)


def _cfg(tiny_cfg, tmp_path, name, out, **extra):
    from dinodet2.data import register_shapes_dataset

    register_shapes_dataset(name, str(tmp_path / "data"), "train", num_images=8, seed=3, min_size=96, max_size=160)
    tiny_cfg.merge_from_list([
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 12,
        "SOLVER.CHECKPOINT_PERIOD", 3, "OUTPUT_DIR", str(out), "SEED", 7,
        "INPUT.MIN_SIZE_TRAIN", (84, 112), "INPUT.MAX_SIZE_TRAIN", 160, "INPUT.RANDOM_FLIP", "horizontal",
        # randomness on every side: photometric + Mosaic (data), denoising queries (model)
        "INPUT.AUG.PHOTOMETRIC.ENABLED", True, "INPUT.AUG.MOSAIC.ENABLED", True, "INPUT.AUG.MOSAIC.PROB", 0.5,
        "INPUT.AUG.MOSAIC.SIZE", 112, "INPUT.AUG.STRONG_OFF_LAST_ITERS", 4,
        "MODEL.DETR.TWO_STAGE", True, "MODEL.DETR.CLASS_LOSS", "focal", "MODEL.DETR.DN.ENABLED", True, "MODEL.DETR.DN.NUM_QUERIES", 6,
        "MODEL.DETR.DROPOUT", 0.1,
    ])
    for key, value in extra.items():
        tiny_cfg.merge_from_list([key.replace("__", "."), value])
    return tiny_cfg


def _train(cfg, resume, interrupt_at=None):
    from detectron2.utils.env import seed_all_rng

    from dinodet2.engine import Trainer

    seed_all_rng(cfg.SEED)  # as train_net's default_setup does before the model is built
    trainer = Trainer(cfg)
    if interrupt_at is not None:
        trainer.register_hooks([_InterruptAt(interrupt_at)])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except _Interrupt:
        return None
    return trainer


def _losses(trainer):
    history = trainer.storage.history("total_loss").values()
    return {int(it): value for value, it in history}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interrupted_twice_and_resumed_matches_the_uninterrupted_run(tiny_cfg, tmp_path, num_workers):
    base = _cfg(tiny_cfg, tmp_path, f"shapes_resume_{num_workers}", tmp_path / "straight",
                DATALOADER__NUM_WORKERS=num_workers)
    straight = _train(base, resume=False)

    cfg = base.clone()
    cfg.OUTPUT_DIR = str(tmp_path / "interrupted")
    assert _train(cfg, resume=False, interrupt_at=4) is None   # checkpoint after iteration 2 -> redo 3, 4
    assert _train(cfg, resume=True, interrupt_at=9) is None    # resumes at 3; checkpoint after 8
    resumed = _train(cfg, resume=True)                         # resumes at 9 (after the strong-aug switch at 8)
    assert resumed.start_iter == 9

    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == list(range(12)) == sorted(expected)
    # CPU kernels are deterministic for a fixed thread count: equal to float32 rounding of the logs.
    for it in range(12):
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-7), it
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_train_stream_resumes_at_any_batch_with_aspect_grouping():
    groups = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1])
    for world_size in (1, 2):
        for rank in range(world_size):
            def stream(start):
                sampler = TrainingSampler(9, seed=5)
                sampler._rank, sampler._world_size = rank, world_size  # what comm gives a rank
                return list(itertools.islice(TrainStream(sampler, 3, groups, start_iter=start, rank=rank,
                                                         world_size=world_size), 3 * 20))
            full = stream(0) + []
            for start in (1, 4, 7):
                assert stream(start)[: 3 * (20 - start)] == full[3 * start:]
            # every batch is one orientation, positions are this rank's share of the global stream
            for b in range(20):
                batch = full[3 * b: 3 * b + 3]
                assert len({groups[i] for _, i in batch}) == 1
                assert all(pos % world_size == rank for pos, _ in batch)


def test_train_stream_replays_repeat_factor_and_curriculum_samplers():
    from dinodet2.data.curriculum_sampler import CurriculumSampler

    samplers = [
        lambda: RepeatFactorTrainingSampler(torch.tensor([1.0, 2.5, 1.0, 0.5, 3.0]), seed=11),
        lambda: CurriculumSampler([0.1, 0.9, 0.5, 0.3, 0.7], batch_size=2, start_fraction=0.4, ramp_iters=6, seed=11),
    ]
    for make in samplers:
        full = list(itertools.islice(TrainStream(make(), 2, None, rank=0, world_size=1), 40))
        resumed = list(itertools.islice(TrainStream(make(), 2, None, start_iter=5, rank=0, world_size=1), 30))
        assert resumed == full[10:]


def test_seeded_map_dataset_is_a_function_of_the_position():
    draws = SeededMapDataset(list(range(10)), lambda x: (x, float(np.random.rand()), float(torch.rand(1))), seed=3)
    a, b = draws[(4, 2)], draws[(4, 2)]
    assert a == b and draws[(5, 2)] != a
    state = np.random.get_state()[1].copy()
    draws[(6, 1)]
    assert (np.random.get_state()[1] == state).all()  # the caller's generator is untouched

    # an unreadable image is replaced by the same other image every time
    flaky = SeededMapDataset(list(range(10)), lambda x: None if x == 3 else x, seed=3)
    assert flaky[(9, 3)] == flaky[(9, 3)] != 3
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_aspect_ratio_groups_follow_detectron2():
    assert aspect_ratio_groups([{"width": 10, "height": 5}, {"width": 5, "height": 5},
                                {"width": 4, "height": 9}]).tolist() == [0, 1, 1]
