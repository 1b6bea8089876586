"""What a checkpoint must hold, beyond weights, optimizer and scheduler, for ``--resume`` to continue
exactly like an uninterrupted run.

* The run's seed (``SEED``, or the random one drawn when ``SEED < 0``): the training data stream
  and its augmentations are a function of it (:mod:`dinodet2.data.train_stream`).
* The model-side randomness (denoising noise, dropout, drop-path): every step starts from
  generators seeded from ``(seed, rank, iteration)``, so it does not depend on what ran before.
* The recent history of the logged scalars: Detectron2 logs the median of the last 20 values of
  each loss; without the history, the first logged values after a resume would be medians over
  fewer iterations.
"""
import logging
import random
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import HistoryBuffer

from ..data.train_stream import derive_seed

__all__ = ["ExactResumeHook", "resolve_run_seed", "seed_step_rngs"]

logger = logging.getLogger(__name__)

# Values per logged scalar kept in the checkpoint (Detectron2's writers smooth over 20).
HISTORY_KEPT = 200


def resolve_run_seed(cfg) -> int:
    """``cfg.SEED``, or for ``SEED < 0`` a random seed shared by all ranks (a collective call)."""
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())


def seed_step_rngs(seed: int, rank: int, iteration: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python generators for one training step."""
    step_seed = derive_seed(seed, rank, iteration)
    torch.manual_seed(step_seed)
    np.random.seed(step_seed)
    random.seed(step_seed)


class ExactResumeHook(HookBase):
    """Seeds every step from ``(seed, rank, iteration)`` and carries the run seed and the scalar
    history through checkpoints (``state_dict`` is stored by Detectron2 under the trainer's hooks).

    Args:
        get_seed / set_seed: read and replace the trainer's run seed (restored from a checkpoint
            before ``before_train``, where the data loader is rebuilt with it).
    """

    def __init__(self, get_seed, set_seed):
        self._get_seed = get_seed
        self._set_seed = set_seed
        self._pending_history: Optional[Dict] = None

    def before_train(self):
        if self._pending_history:
            storage = self.trainer.storage
            for name, saved in self._pending_history.items():
                buffer = HistoryBuffer()
                for value, iteration in saved["data"]:
                    buffer.update(value, iteration)
                buffer._count, buffer._global_avg = saved["count"], saved["global_avg"]
                storage._history[name] = buffer
                storage._smoothing_hints[name] = saved["smoothing_hint"]
            logger.info("Restored the history of %d logged scalars from the checkpoint.", len(self._pending_history))
        self._pending_history = None

    def before_step(self):
        seed_step_rngs(self._get_seed(), comm.get_rank(), self.trainer.iter)

    def state_dict(self):
        storage = getattr(self.trainer, "storage", None)
        history = {}
        if storage is not None:
            hints = storage.smoothing_hints()
            for name, buffer in storage.histories().items():
                history[name] = {"data": [[float(v), float(i)] for v, i in buffer.values()[-HISTORY_KEPT:]],
                                 "count": int(buffer._count), "global_avg": float(buffer._global_avg),
                                 "smoothing_hint": bool(hints.get(name, True))}
        return {"seed": int(self._get_seed()), "history": history}

    def load_state_dict(self, state):
        seed = int(state["seed"])
        if seed != self._get_seed():
            logger.info("Resuming with the run's seed %d from the checkpoint (the config gives %d).",
                        seed, self._get_seed())
        self._set_seed(seed)
        self._pending_history = state.get("history") or None
