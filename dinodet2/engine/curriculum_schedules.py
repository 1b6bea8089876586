"""Curriculum schedules of the model: query ramp-up and staged matching (``CURRICULUM.QUERIES`` /
``CURRICULUM.MATCHING`` in :mod:`dinodet2.config`), applied by :class:`CurriculumHook`.

* Query ramp-up: the decoder uses :func:`num_queries_at` matching queries, growing linearly from
  ``START_QUERIES`` at iteration 0 to ``MODEL.DETR.NUM_QUERIES`` at ``RAMP_ITERS``
  (:meth:`dinodet2.modeling.meta_arch.DETR.set_num_active_queries`).
* Staged matching: the Hungarian matcher uses ``STAGES[i]`` until iteration ``STEPS[i]``
  (exclusive), then the full cost (:func:`matching_stage_at`,
  :attr:`dinodet2.modeling.matcher.HungarianMatcher.stage`).

The schedules are pure functions of the iteration, so a resumed run continues exactly.
"""
import logging
from typing import Optional, Sequence, Tuple

from detectron2.engine import HookBase

from ..modeling.matcher import MATCHING_STAGES

__all__ = [
    "CurriculumHook",
    "check_matching_schedule",
    "check_query_schedule",
    "matching_stage_at",
    "num_queries_at",
]

logger = logging.getLogger(__name__)


def check_query_schedule(start: int, full: int, ramp_iters: int) -> None:
    """Raise a ``ValueError`` naming the config key if the query ramp-up is invalid."""
    if not 1 <= start <= full:
        raise ValueError(f"CURRICULUM.QUERIES.START_QUERIES must be in [1, MODEL.DETR.NUM_QUERIES={full}], "
                         f"got {start}.")
    if ramp_iters < 0:
        raise ValueError(f"CURRICULUM.QUERIES.RAMP_ITERS must be >= 0, got {ramp_iters}.")


def num_queries_at(iteration: int, start: int, full: int, ramp_iters: int) -> int:
    """Active queries at ``iteration``: ``start`` at iteration 0 growing linearly to ``full`` at
    ``ramp_iters`` (rounded half up, clamped to ``[start, full]``; ``ramp_iters`` 0: ``full``)."""
    if iteration >= ramp_iters:
        return full
    if iteration <= 0:
        return start
    # round(start + (full - start) * iteration / ramp_iters), half up, in exact integer arithmetic
    return start + (2 * (full - start) * iteration + ramp_iters) // (2 * ramp_iters)


def check_matching_schedule(stages: Sequence[str], steps: Sequence[int]) -> None:
    """Raise a ``ValueError`` naming the config keys if the staged matching schedule is invalid."""
    if len(stages) != len(steps):
        raise ValueError(f"CURRICULUM.MATCHING.STAGES ({len(stages)} entries) and CURRICULUM.MATCHING.STEPS "
                         f"({len(steps)} entries) must have the same length: {list(stages)} vs {list(steps)}.")
    invalid = [stage for stage in stages if stage not in MATCHING_STAGES]
    if invalid:
        raise ValueError(f"CURRICULUM.MATCHING.STAGES must be names from {MATCHING_STAGES}, got {invalid}.")
    if any(step <= 0 for step in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"CURRICULUM.MATCHING.STEPS must be > 0 and strictly increasing, got {list(steps)}.")


def matching_stage_at(iteration: int, stages: Sequence[str], steps: Sequence[int]) -> str:
    """Matching stage at ``iteration``: ``stages[i]`` for the first ``i`` with
    ``iteration < steps[i]``, ``"full"`` from ``steps[-1]`` on."""
    for stage, step in zip(stages, steps):
        if iteration < step:
            return stage
    return "full"


class CurriculumHook(HookBase):
    """Applies the query ramp-up and the staged matching before every training step.

    ``before_step`` sets the model's active queries and its matcher's stage for
    ``trainer.iter`` and records them as ``curriculum/num_queries`` and
    ``curriculum/matching_stage`` (index in :data:`MATCHING_STAGES`: l1 = 0, boxes = 1, full = 2).
    ``after_train`` restores all queries and the full matching cost, so evaluation after training
    and the saved model behave normally. The model's state is not checkpointed: it is a function
    of the iteration, so resuming reproduces it.

    Args:
        model: a :class:`~dinodet2.modeling.meta_arch.DETR`, possibly wrapped in
            (Distributed)DataParallel.
        query_schedule: ``(start, full, ramp_iters)`` of :func:`num_queries_at`, or ``None``.
        matching_schedule: ``(stages, steps)`` of :func:`matching_stage_at`, or ``None``.
    """

    def __init__(self, model, query_schedule: Optional[Tuple[int, int, int]] = None,
                 matching_schedule: Optional[Tuple[Sequence[str], Sequence[int]]] = None):
        if query_schedule is None and matching_schedule is None:
            raise ValueError("CurriculumHook needs a query schedule, a matching schedule or both.")
        self.model = model.module if hasattr(model, "module") else model
        if query_schedule is not None:
            check_query_schedule(*query_schedule)
            if not hasattr(self.model, "set_num_active_queries"):
                raise ValueError(f"CURRICULUM.QUERIES needs a DETR model, got {type(self.model).__name__}.")
        if matching_schedule is not None:
            check_matching_schedule(*matching_schedule)
            if not hasattr(getattr(getattr(self.model, "criterion", None), "matcher", None), "stage"):
                raise ValueError(f"CURRICULUM.MATCHING needs a DETR model with a HungarianMatcher, "
                                 f"got {type(self.model).__name__}.")
        self.query_schedule = query_schedule
        self.matching_schedule = matching_schedule

    @classmethod
    def from_config(cls, cfg, model) -> Optional["CurriculumHook"]:
        """The hook for ``cfg.CURRICULUM``, or ``None`` if neither schedule is enabled."""
        queries, matching = cfg.CURRICULUM.QUERIES, cfg.CURRICULUM.MATCHING
        query_schedule = None
        if queries.ENABLED:
            query_schedule = (queries.START_QUERIES, cfg.MODEL.DETR.NUM_QUERIES, queries.RAMP_ITERS)
        matching_schedule = (list(matching.STAGES), list(matching.STEPS)) if matching.ENABLED else None
        if query_schedule is None and matching_schedule is None:
            return None
        logger.info("Curriculum: query ramp-up (start, full, ramp_iters) %s, staged matching (stages, steps) %s",
                    query_schedule, matching_schedule)
        return cls(model, query_schedule, matching_schedule)

    def before_step(self):
        iteration, storage = self.trainer.iter, self.trainer.storage
        if self.query_schedule is not None:
            num_queries = num_queries_at(iteration, *self.query_schedule)
            self.model.set_num_active_queries(num_queries)
            storage.put_scalar("curriculum/num_queries", num_queries, smoothing_hint=False)
        if self.matching_schedule is not None:
            stage = matching_stage_at(iteration, *self.matching_schedule)
            self.model.criterion.matcher.stage = stage
            storage.put_scalar("curriculum/matching_stage", MATCHING_STAGES.index(stage), smoothing_hint=False)

    def after_train(self):
        if self.query_schedule is not None:
            self.model.set_num_active_queries(None)
        if self.matching_schedule is not None:
            self.model.criterion.matcher.stage = "full"
