"""Easy-to-hard curriculum sampling (``CURRICULUM.SAMPLING``).

Difficulty score
----------------
Every training image gets a score from its non-crowd annotations (boxes in ``XYXY_ABS``)::

    score = w_count   * n / n_max
          + w_small   * (number of boxes with area < SMALL_AREA) / n
          + w_overlap * mean over boxes of (highest IoU with another box of the image)

where ``n`` is the image's number of boxes, ``n_max`` the largest ``n`` over the dataset and
``(w_count, w_small, w_overlap) = DIFFICULTY_WEIGHTS``. The overlap term is 0 for images with fewer
than two boxes; images without boxes score 0.

Schedule
--------
At iteration ``t`` the sampler draws from the easiest ``ceil(f(t) * N)`` of the ``N`` images
(at least 1), images ranked by (score, dataset index). With ``s = START_FRACTION`` and
``T = RAMP_ITERS``, ``f(t) = 1`` for ``t >= T`` and otherwise::

    linear: f(t) = s + (1 - s) * t / T
    sqrt:   f(t) = s + (1 - s) * sqrt(t / T)    (competence-based curriculum, Platanios et al. 2019)

Sampling
--------
:class:`CurriculumSampler` is an infinite index stream in the manner of Detectron2's
``TrainingSampler``: one global stream, identical on every rank, whose position ``q`` belongs to
iteration ``start_iter + q // batch_size`` (``batch_size`` = ``SOLVER.IMS_PER_BATCH``). Indices
are drawn without replacement from a random permutation of the current pool; a new permutation is
drawn when it is used up or when the pool size changes. Rank ``r`` of ``W`` yields positions
``r, r + W, r + 2W, ...``, so the ranks' shares of a global batch are disjoint and all belong to
that batch's iteration. The stream depends only on the constructor arguments, so the copies that
Detectron2's ``ToIterableDataset`` iterates in every data-loader worker agree.
"""
import itertools
import logging
import math
from numbers import Integral, Real
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler
from torchvision.ops import box_iou

from detectron2.structures import BoxMode
from detectron2.utils import comm

__all__ = [
    "CurriculumSampler",
    "SCHEDULES",
    "build_curriculum_sampler",
    "difficulty_scores",
    "pool_fraction",
    "pool_size",
]

logger = logging.getLogger(__name__)

SCHEDULES = ("linear", "sqrt")


def _is_int(value) -> bool:
    """Whether ``value`` is an integer (bools excluded)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_weights(weights: Sequence[float]) -> np.ndarray:
    """Return ``weights`` as a float64 array of 3 non-negative numbers, not all 0, else raise."""
    values = tuple(weights) if isinstance(weights, (list, tuple, np.ndarray)) else ()
    if (
        len(values) != 3
        or not all(isinstance(w, Real) and not isinstance(w, bool) for w in values)
        or not all(math.isfinite(w) and w >= 0 for w in values)
        or sum(values) <= 0
    ):
        raise ValueError(
            "CURRICULUM.SAMPLING.DIFFICULTY_WEIGHTS must be 3 finite non-negative numbers "
            f"(count, small, overlap), not all 0, got {weights!r}."
        )
    return np.asarray(values, dtype=np.float64)


def _image_boxes(record: dict) -> torch.Tensor:
    """The non-crowd boxes of a Detectron2 dataset dict as a float64 ``[n, 4]`` XYXY_ABS tensor."""
    boxes = [
        BoxMode.convert(list(anno["bbox"]), anno["bbox_mode"], BoxMode.XYXY_ABS)
        for anno in record.get("annotations", [])
        if not anno.get("iscrowd", 0)
    ]
    return torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)


def difficulty_scores(
    dataset_dicts: Sequence[dict],
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    small_area: float = 1024.0,
) -> np.ndarray:
    """Difficulty score of every image (see the module docstring for the formula).

    Args:
        dataset_dicts: Detectron2 dataset dicts; each may have ``annotations`` with ``bbox``,
            ``bbox_mode`` and optionally ``iscrowd`` (crowd annotations are ignored).
        weights: ``(w_count, w_small, w_overlap)``, ``CURRICULUM.SAMPLING.DIFFICULTY_WEIGHTS``.
        small_area: boxes with an area (pixels) below this are small,
            ``CURRICULUM.SAMPLING.SMALL_AREA``.

    Returns:
        np.ndarray: float64 ``[len(dataset_dicts)]``, higher is harder.
    """
    w = _check_weights(weights)
    if not (isinstance(small_area, Real) and math.isfinite(small_area) and small_area >= 0):
        raise ValueError(f"CURRICULUM.SAMPLING.SMALL_AREA must be a finite number >= 0, got {small_area!r}.")
    # Per image: [number of boxes, fraction of small boxes, mean highest IoU with another box].
    terms = np.zeros((len(dataset_dicts), 3), dtype=np.float64)
    for i, record in enumerate(dataset_dicts):
        boxes = _image_boxes(record)
        n = boxes.shape[0]
        if n == 0:
            continue
        sizes = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
        terms[i, 0] = n
        terms[i, 1] = (sizes.prod(dim=1) < small_area).double().mean().item()
        if n >= 2:
            iou = box_iou(boxes, boxes).fill_diagonal_(0.0)
            terms[i, 2] = iou.max(dim=1).values.mean().item()
    max_count = terms[:, 0].max(initial=0.0)
    if max_count > 0:
        terms[:, 0] /= max_count
    return terms @ w


def pool_fraction(iteration: int, start_fraction: float, ramp_iters: int, schedule: str = "linear") -> float:
    """Fraction of the dataset (easiest first) that iteration ``iteration`` samples from.

    ``start_fraction`` at iteration 0, growing by ``schedule`` (``"linear"`` or ``"sqrt"``) to 1.0
    at ``ramp_iters`` and staying there; ``ramp_iters == 0`` means 1.0 from the start.

    Raises:
        ValueError: for an invalid ``CURRICULUM.SAMPLING`` value or a negative iteration.
    """
    if not (isinstance(start_fraction, Real) and 0.0 < start_fraction <= 1.0):
        raise ValueError(f"CURRICULUM.SAMPLING.START_FRACTION must be in (0, 1], got {start_fraction!r}.")
    if not (_is_int(ramp_iters) and ramp_iters >= 0):
        raise ValueError(f"CURRICULUM.SAMPLING.RAMP_ITERS must be an integer >= 0, got {ramp_iters!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"CURRICULUM.SAMPLING.SCHEDULE must be one of {SCHEDULES}, got {schedule!r}.")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}.")
    if iteration >= ramp_iters:
        return 1.0
    progress = iteration / ramp_iters
    if schedule == "sqrt":
        progress = math.sqrt(progress)
    return start_fraction + (1.0 - start_fraction) * progress


def pool_size(
    iteration: int, num_images: int, start_fraction: float, ramp_iters: int, schedule: str = "linear"
) -> int:
    """Number of images (easiest first) that iteration ``iteration`` samples from:
    ``ceil(pool_fraction(...) * num_images)``, clamped to ``[1, num_images]``."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    fraction = pool_fraction(iteration, start_fraction, ramp_iters, schedule)
    # The tolerance keeps float noise (e.g. a fraction of 0.3000000000000001) from adding an image.
    return min(num_images, max(1, math.ceil(fraction * num_images - 1e-9)))


class CurriculumSampler(Sampler):
    """Infinite easy-to-hard index stream (see the module docstring), a drop-in replacement for
    Detectron2's ``TrainingSampler`` in ``build_detection_train_loader(..., sampler=)``.

    Attributes:
        sorted_indices (np.ndarray): dataset indices sorted by (difficulty, index), easiest first.
        start_iter (int): the iteration of the stream's first global batch.
        batch_size (int): the global batch size (over all ranks).
    """

    def __init__(
        self,
        difficulty: Sequence[float],
        batch_size: int,
        start_fraction: float,
        ramp_iters: int,
        schedule: str = "linear",
        start_iter: int = 0,
        seed: Optional[int] = None,
    ):
        """
        Args:
            difficulty: per-image difficulty scores, e.g. from :func:`difficulty_scores`.
            batch_size: the global batch size, ``SOLVER.IMS_PER_BATCH``.
            start_fraction, ramp_iters, schedule: the pool schedule, see :func:`pool_fraction`.
            start_iter: the iteration the first global batch is for (the resumed iteration).
            seed: the seed of the shuffles; must be the same on all ranks. ``None``: a random seed
                shared by all ranks (``comm.shared_random_seed``, a collective call).
        """
        difficulty = np.asarray(difficulty, dtype=np.float64)
        if difficulty.ndim != 1 or difficulty.size == 0 or not np.isfinite(difficulty).all():
            raise ValueError("difficulty must be a non-empty 1-D array of finite scores.")
        if not (_is_int(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size (SOLVER.IMS_PER_BATCH) must be a positive integer, got {batch_size!r}.")
        if not (_is_int(start_iter) and start_iter >= 0):
            raise ValueError(f"start_iter must be an integer >= 0, got {start_iter!r}.")
        pool_fraction(start_iter, start_fraction, ramp_iters, schedule)  # validates the schedule
        self.sorted_indices = np.argsort(difficulty, kind="stable")
        self.batch_size = int(batch_size)
        self.start_iter = int(start_iter)
        self._start_fraction = start_fraction
        self._ramp_iters = ramp_iters
        self._schedule = schedule
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        # Read here, not in __iter__, like TrainingSampler: the sampler is pickled into the data
        # loader's workers, where torch.distributed may not be initialised (spawn / forkserver).
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def pool_size_at(self, iteration: int) -> int:
        """Number of images in the pool of ``iteration``."""
        return pool_size(iteration, len(self.sorted_indices), self._start_fraction, self._ramp_iters, self._schedule)

    def pool_at(self, iteration: int) -> np.ndarray:
        """Dataset indices of the pool of ``iteration`` (its easiest images, easiest first)."""
        return self.sorted_indices[: self.pool_size_at(iteration)].copy()

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self) -> Iterator[int]:
        """The global stream: ``batch_size`` dataset indices per iteration, from ``start_iter`` on."""
        generator = torch.Generator()
        generator.manual_seed(self._seed)
        permutation: List[int] = []
        position = 0
        current_size = 0
        for iteration in itertools.count(self.start_iter):
            size = self.pool_size_at(iteration)
            for _ in range(self.batch_size):
                if position == len(permutation) or size != current_size:
                    pool = torch.from_numpy(self.sorted_indices[:size])
                    permutation = pool[torch.randperm(size, generator=generator)].tolist()
                    position, current_size = 0, size
                yield permutation[position]
                position += 1


def build_curriculum_sampler(cfg, dataset_dicts: Sequence[dict], start_iter: int = 0,
                             seed: Optional[int] = None) -> CurriculumSampler:
    """A :class:`CurriculumSampler` for ``dataset_dicts`` from ``cfg.CURRICULUM.SAMPLING`` and
    ``cfg.SOLVER.IMS_PER_BATCH`` (``seed``, or one shared by all ranks if None; call it on every rank).

    ``dataset_dicts`` must be the very list (same order) the training loader indexes.
    """
    c = cfg.CURRICULUM.SAMPLING
    scores = difficulty_scores(dataset_dicts, tuple(c.DIFFICULTY_WEIGHTS), c.SMALL_AREA)
    sampler = CurriculumSampler(scores, cfg.SOLVER.IMS_PER_BATCH, c.START_FRACTION, c.RAMP_ITERS,
                                c.SCHEDULE, start_iter=start_iter, seed=seed)
    logger.info(
        "Curriculum sampling over %d images: difficulty min %.3f / median %.3f / mean %.3f / max %.3f "
        "(%d scoring 0); pool at iteration %d: %d images, growing (%s) to all by iteration %d.",
        len(scores), scores.min(), np.median(scores), scores.mean(), scores.max(), int((scores == 0).sum()),
        start_iter, sampler.pool_size_at(start_iter), c.SCHEDULE, c.RAMP_ITERS,
    )
    return sampler
