"""Iteration-dependent data loading: TrainDataSchedule says when multi-image augmentations go off
and builds the mapper in that state; TrainLoaderScheduleHook rebuilds the loader at the switch-off
and on resume (keeping the curriculum sampler's stage); the Trainer wires the curriculum and
augmentation schedules end to end; the augmentation grid tool writes a PNG."""
import importlib.util

import numpy as np
import pytest
from detectron2.utils.events import EventStorage
from PIL import Image

from conftest import REPO_ROOT

from dinodet2.data import TrainDataSchedule
from dinodet2.engine.hooks import TrainLoaderScheduleHook


class _FakeSimpleTrainer:
    def __init__(self):
        self.resets = []

    def reset_data_loader(self, builder):
        self.resets.append(builder())


class _FakeTrainer:
    def __init__(self, start_iter):
        self.iter = start_iter
        self._trainer = _FakeSimpleTrainer()
        self.storage = EventStorage(start_iter)


def _run(hook, start_iter, max_iter):
    trainer = _FakeTrainer(start_iter)
    hook.trainer = trainer
    with trainer.storage:
        hook.before_train()
        for it in range(start_iter, max_iter):
            trainer.iter = it
            trainer.storage.iter = it
            hook.before_step()
    histories = trainer.storage.histories()
    strong = [v for v, _ in histories["data/strong_augmentation"].values()] if "data/strong_augmentation" in histories else []
    return trainer._trainer.resets, strong


def _hook(strong_off_iter):
    """The hook with a loader builder that returns the iteration it builds for."""
    return TrainLoaderScheduleHook(lambda start: start, TrainDataSchedule(strong_off_iter))


def test_strong_augmentation_goes_off_at_the_scheduled_iteration():
    resets, strong = _run(_hook(6), 0, 8)
    assert resets == [6]
    assert strong == [1.0] * 6 + [0.0] * 2


@pytest.mark.parametrize("start_iter, expected", [
    (3, [3, 6]),       # resumed: the stream restarts at the resumed batch, switches off at 6
    (7, [7]),          # resumed after the switch: the loader built for 7 is already off
    (0, [6]),          # fresh run: the loader built in __init__ is right until 6
])
def test_resume_rebuilds_the_loader_where_its_state_changes(start_iter, expected):
    resets, _ = _run(_hook(6), start_iter, 8)
    assert resets == expected


def test_switch_off_at_iteration_zero_needs_no_rebuild():
    resets, strong = _run(_hook(0), 0, 3)
    assert resets == [] and strong == [0.0] * 3


def test_schedule_from_config(tiny_cfg):
    assert TrainDataSchedule.from_config(tiny_cfg).strong_off_iter is None
    tiny_cfg.INPUT.AUG.STRONG_OFF_LAST_ITERS = 15
    assert TrainDataSchedule.from_config(tiny_cfg).strong_off_iter is None  # no multi-image augmentation on
    tiny_cfg.INPUT.AUG.MIXUP.ENABLED = True
    tiny_cfg.SOLVER.MAX_ITER = 100
    schedule = TrainDataSchedule.from_config(tiny_cfg)
    assert schedule.strong_off_iter == 85
    assert schedule.strong_augmentation_at(84) and not schedule.strong_augmentation_at(85)
    tiny_cfg.INPUT.AUG.STRONG_OFF_LAST_ITERS = 150  # longer than the run: off from the start
    assert TrainDataSchedule.from_config(tiny_cfg).strong_off_iter == 0
    tiny_cfg.INPUT.AUG.STRONG_OFF_LAST_ITERS = -1
    with pytest.raises(ValueError, match="STRONG_OFF_LAST_ITERS"):
        TrainDataSchedule.from_config(tiny_cfg)


def test_schedule_builds_the_mapper_in_the_state_of_its_start_iteration(tiny_cfg):
    tiny_cfg.merge_from_list(["INPUT.AUG.MOSAIC.ENABLED", True, "INPUT.AUG.STRONG_OFF_LAST_ITERS", 4,
                              "SOLVER.MAX_ITER", 10])
    dataset = [{"file_name": "unused.png", "height": 8, "width": 8, "annotations": []}]
    schedule = TrainDataSchedule.from_config(tiny_cfg)
    assert schedule.build_mapper(tiny_cfg, dataset, 5).multi_image is not None
    assert schedule.build_mapper(tiny_cfg, dataset, 6).multi_image is None
    assert TrainDataSchedule(None).build_mapper(tiny_cfg, dataset, 10 ** 6).multi_image is not None


def _schedule_cfg(tiny_cfg, tmp_path, name):
    from dinodet2.data import register_shapes_dataset

    register_shapes_dataset(name, str(tmp_path / "data"), "train", num_images=6, seed=0)
    tiny_cfg.merge_from_list([
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 6,
        "SOLVER.CHECKPOINT_PERIOD", 3, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "out"),
        "INPUT.MIN_SIZE_TRAIN", (112,), "INPUT.MAX_SIZE_TRAIN", 160,
        "INPUT.AUG.MOSAIC.ENABLED", True, "INPUT.AUG.MOSAIC.PROB", 1.0, "INPUT.AUG.MOSAIC.SIZE", 112,
        "INPUT.AUG.STRONG_OFF_LAST_ITERS", 2,
        "CURRICULUM.SAMPLING.ENABLED", True, "CURRICULUM.SAMPLING.START_FRACTION", 0.5,
        "CURRICULUM.SAMPLING.RAMP_ITERS", 4,
        "CURRICULUM.QUERIES.ENABLED", True, "CURRICULUM.QUERIES.START_QUERIES", 4, "CURRICULUM.QUERIES.RAMP_ITERS", 4,
        "CURRICULUM.MATCHING.ENABLED", True, "CURRICULUM.MATCHING.STAGES", ["l1", "boxes"],
        "CURRICULUM.MATCHING.STEPS", [2, 4],
    ])
    return tiny_cfg


def test_trainer_applies_every_schedule_and_resumes_them(tiny_cfg, tmp_path):
    from dinodet2.engine import Trainer

    cfg = _schedule_cfg(tiny_cfg, tmp_path, "shapes_schedule6")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    def history(name):
        return [v for v, _ in sorted(trainer.storage.history(name).values(), key=lambda p: p[1])]

    assert history("data/strong_augmentation") == [1, 1, 1, 1, 0, 0]
    assert history("curriculum/num_queries") == [4, 6, 7, 9, 10, 10]  # 4 -> 10 over 4 iterations
    assert history("curriculum/matching_stage") == [0, 0, 1, 1, 2, 2]  # l1, boxes, full
    model = trainer.model
    assert model.num_active_queries == 10 and model.criterion.matcher.stage == "full"  # restored

    # Resume from the iteration-3 checkpoint: the schedules continue where they were.
    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.SOLVER.MAX_ITER = 6
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000002.pth")
    resumed = Trainer(cfg2)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    # The checkpoint carries the logged history, so the resumed run's history is the whole run's.
    strong = [v for v, _ in sorted(resumed.storage.history("data/strong_augmentation").values(), key=lambda p: p[1])]
    assert strong == [1, 1, 1, 1, 0, 0]
    queries = [v for v, _ in sorted(resumed.storage.history("curriculum/num_queries").values(), key=lambda p: p[1])]
    assert queries == [4, 6, 7, 9, 10, 10]


def test_augmentation_grid_tool_writes_a_png(tmp_path):
    from dinodet2.data import register_shapes_dataset

    spec = importlib.util.spec_from_file_location("visualize_augmentations",
                                                  REPO_ROOT / "tools" / "visualize_augmentations.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    register_shapes_dataset("shapes_grid4", str(tmp_path / "data"), "train", num_images=4, seed=0)
    out = tmp_path / "grid.png"
    tool.main(["--config-file", str(REPO_ROOT / "configs/Demo/detr_shapes_tiny.yaml"), "--output", str(out), "--num-images", "4",
               "--cols", "2", "DATASETS.TRAIN", "('shapes_grid4',)", "INPUT.AUG.MOSAIC.ENABLED", "True",
               "INPUT.AUG.MOSAIC.PROB", "1.0", "INPUT.AUG.MIXUP.ENABLED", "True", "INPUT.AUG.MIXUP.LABEL_WEIGHTING",
               "True"])
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3 and grid.shape[0] > 100 and grid.shape[1] > 100
    assert grid.std() > 10  # not a blank canvas


def test_no_strong_augmentation_scalar_without_a_switch_off():
    resets, strong = _run(_hook(None), 2, 4)
    assert resets == [2] and strong == []
