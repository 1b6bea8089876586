"""The training data schedule: what the training loader delivers from a given iteration on.

Two things about the training data change with the iteration:

* the curriculum sampler's pool (``CURRICULUM.SAMPLING``), a function of the position in the
  index stream, which :class:`~dinodet2.data.train_stream.TrainStream` replays up to the loader's
  first iteration: a loader built for iteration ``k`` is already in the right stage;
* the multi-image ("strong") augmentations (Mosaic, MixUp, CutMix, Copy-Paste), on until
  ``MAX_ITER - INPUT.AUG.STRONG_OFF_LAST_ITERS`` and off from there (YOLOX's "no-aug" epochs).

:class:`TrainDataSchedule` holds the second, read once from the config, and builds the mapper of a
loader that starts at a given iteration in that iteration's state. Data loading runs in worker
processes that see neither the trainer nor its iteration, so a change of state means a new loader
(:class:`dinodet2.engine.hooks.TrainLoaderScheduleHook` rebuilds it).
"""
import logging
from typing import Optional

from .mapper import DetrDatasetMapper
from .multi_image_pipeline import multi_image_enabled

__all__ = ["TrainDataSchedule"]

logger = logging.getLogger(__name__)


class TrainDataSchedule:
    """Which iteration switches the multi-image augmentations off (``strong_off_iter``; None:
    never, e.g. when none is enabled)."""

    def __init__(self, strong_off_iter: Optional[int] = None):
        self.strong_off_iter = strong_off_iter

    @classmethod
    def from_config(cls, cfg) -> "TrainDataSchedule":
        """From ``INPUT.AUG.STRONG_OFF_LAST_ITERS``, ``SOLVER.MAX_ITER`` and ``INPUT.AUG.*.ENABLED``."""
        last = int(cfg.INPUT.AUG.STRONG_OFF_LAST_ITERS)
        if last < 0:
            raise ValueError(f"INPUT.AUG.STRONG_OFF_LAST_ITERS must be >= 0, got {last}.")
        if last == 0 or not multi_image_enabled(cfg):
            return cls(None)
        return cls(max(cfg.SOLVER.MAX_ITER - last, 0))

    def strong_augmentation_at(self, iteration: int) -> bool:
        """Whether the multi-image augmentations are on at ``iteration``."""
        return self.strong_off_iter is None or iteration < self.strong_off_iter

    def build_mapper(self, cfg, dataset, start_iter: int) -> DetrDatasetMapper:
        """The training mapper of a loader starting at ``start_iter``, its multi-image augmentations
        (drawing from ``dataset``) on or off as the schedule says for that iteration."""
        strong = self.strong_augmentation_at(start_iter)
        if not strong:
            logger.info("Multi-image augmentations are off from iteration %d on.", start_iter)
        return DetrDatasetMapper(cfg, is_train=True, dataset_dicts=dataset, strong_augmentation=strong)

    def __repr__(self) -> str:
        return f"TrainDataSchedule(strong_off_iter={self.strong_off_iter})"
