"""The training data stream as a pure function of (seed, iteration), so that a resumed run sees
exactly the batches -- and the augmentations -- of an uninterrupted one.

Detectron2's training loader restarts its sampler's stream from the beginning on every start,
groups images by aspect ratio in the main process (a buffer that a checkpoint does not hold), and
draws augmentations from per-worker generators whose state depends on everything drawn before.
A run resumed at iteration ``k`` therefore replays the first batches of the run and never sees
others. Here:

* :class:`TrainStream` wraps any index sampler (Detectron2's ``TrainingSampler``,
  ``RepeatFactorTrainingSampler``, ``RandomSubsetTrainingSampler``, the weighted samplers, our
  :class:`~dinodet2.data.curriculum_sampler.CurriculumSampler`; all seeded explicitly). It tags every index
  with its position in the global stream, groups this rank's indices into batches of equal
  aspect-ratio orientation itself (Detectron2's ``AspectRatioGroupedDataset`` rule, ``width >
  height`` or not, from the dataset dicts) so that every ``batch_size`` consecutive tokens form one
  batch, and starts at batch ``start_iter`` by replaying the index stream (indices only, no images:
  cheap) up to there.
* :class:`SeededMapDataset` maps a ``(position, index)`` token with the Python, NumPy and torch
  global generators seeded from ``(seed, position)`` and restored afterwards, so a sample's
  augmentation does not depend on which worker maps it, how many workers there are, or what was
  mapped before. An unreadable image (the mapper returns None) is replaced by a random other image
  drawn from the same seed, also deterministically.

The loader (``build_batch_data_loader`` without aspect-ratio grouping) shards the token stream over
workers in chunks of one batch and returns the chunks in order, so batch ``i`` of the loader is
always tokens ``[i * batch_size, (i + 1) * batch_size)`` of the stream.
"""
import itertools
import logging
import random
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.samplers import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

__all__ = [
    "SeededMapDataset",
    "TrainStream",
    "aspect_ratio_groups",
    "build_index_sampler",
    "derive_seed",
    "seeded_global_rngs",
]

logger = logging.getLogger(__name__)

# A sample whose image cannot be read is replaced by a random other one this many times.
MAX_REPLACEMENTS = 100


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (NumPy's ``SeedSequence``): e.g. (run seed,
    stream position) for a sample, (run seed, rank, iteration) for a training step."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(1)[0])


@contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's ``random``, NumPy's global generator and torch's CPU generator with ``seed``
    for the block, and restore their previous states afterwards."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA generators are the model's
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def aspect_ratio_groups(dataset_dicts: Sequence[dict]) -> np.ndarray:
    """Detectron2's aspect-ratio buckets per image: 0 if ``width > height``, else 1."""
    return np.array([0 if d.get("width", 0) > d.get("height", 0) else 1 for d in dataset_dicts], dtype=np.uint8)


def build_index_sampler(cfg, dataset_dicts: Sequence[dict], seed: int) -> Sampler:
    """The index sampler ``DATALOADER.SAMPLER_TRAIN`` names (or the curriculum sampler with
    ``CURRICULUM.SAMPLING.ENABLED``), seeded with ``seed`` -- never with a fresh random seed, so
    that its stream can be replayed on resume. Call it on every rank."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if cfg.CURRICULUM.SAMPLING.ENABLED:
        if name != "TrainingSampler":
            raise ValueError("CURRICULUM.SAMPLING.ENABLED replaces the training sampler; it cannot be combined "
                             f"with DATALOADER.SAMPLER_TRAIN='{name}' (use 'TrainingSampler').")
        from .curriculum_sampler import build_curriculum_sampler

        return build_curriculum_sampler(cfg, dataset_dicts, seed=seed)
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        kwargs = {}
        if "REPEAT_SQRT" in cfg.DATALOADER:
            kwargs["sqrt"] = cfg.DATALOADER.REPEAT_SQRT
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, **kwargs)
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(len(dataset_dicts), cfg.DATALOADER.RANDOM_SUBSET_RATIO,
                                           seed_shuffle=seed, seed_subset=seed)
    if name in ("WeightedTrainingSampler", "WeightedCategoryTrainingSampler"):
        # Detectron2 builds these from DATASETS.TRAIN_REPEAT_FACTOR; they are RepeatFactorTrainingSamplers
        # whose seed is a fresh random one, replaced here by the run's seed.
        from detectron2.data import build_detection_train_loader

        sampler = build_detection_train_loader.from_config(cfg, mapper=lambda d: d, dataset=dataset_dicts)["sampler"]
        sampler._seed = int(seed)
        return sampler
    raise ValueError(f"Unknown DATALOADER.SAMPLER_TRAIN '{name}'. Use one of TrainingSampler, "
                     "RepeatFactorTrainingSampler, RandomSubsetTrainingSampler, WeightedTrainingSampler, "
                     "WeightedCategoryTrainingSampler.")


class TrainStream(Sampler):
    """This rank's infinite stream of ``(global position, dataset index)`` tokens, batch-aligned
    and starting at batch ``start_iter`` (see the module docstring).

    Args:
        sampler: an infinite index sampler whose ``__iter__`` yields this rank's share of a global
            stream, ``islice(global, rank, None, world_size)`` (every Detectron2 training sampler
            and :class:`~dinodet2.data.curriculum_sampler.CurriculumSampler` do).
        batch_size: images per batch on this rank (``SOLVER.IMS_PER_BATCH / world_size``).
        groups: per-image aspect-ratio bucket (:func:`aspect_ratio_groups`) to batch only images of
            one bucket together, or None for batches in stream order.
        start_iter: the first batch to yield.
        rank, world_size: this process's place in the global stream (default: ``comm``'s).
    """

    def __init__(self, sampler: Sampler, batch_size: int, groups: Optional[np.ndarray] = None,
                 start_iter: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}.")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.groups = None if groups is None else np.asarray(groups, dtype=np.uint8)
        self.start_iter = int(start_iter)
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)

    def _tagged(self) -> Iterator[Tuple[int, int]]:
        for j, index in enumerate(self.sampler):
            yield self.rank + self.world_size * j, int(index)

    def _grouped(self, tokens: Iterator[Tuple[int, int]]) -> Iterator[Tuple[int, int]]:
        buckets = [[], []]
        for token in tokens:
            bucket = buckets[self.groups[token[1]]]
            bucket.append(token)
            if len(bucket) == self.batch_size:
                yield from bucket
                bucket.clear()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        tokens = self._tagged()
        if self.groups is not None:
            tokens = self._grouped(tokens)
        return itertools.islice(tokens, self.start_iter * self.batch_size, None)


class SeededMapDataset(Dataset):
    """``mapper(dataset[index])`` for ``(position, index)`` tokens of a :class:`TrainStream`, with
    the global generators seeded from ``(seed, position)`` (see the module docstring)."""

    def __init__(self, dataset, mapper, seed: int):
        self.dataset = dataset
        self.mapper = mapper
        self.seed = int(seed)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, token: Tuple[int, int]):
        position, index = token
        for attempt in range(MAX_REPLACEMENTS + 1):
            with seeded_global_rngs(derive_seed(self.seed, position, attempt)):
                mapped = self.mapper(self.dataset[index])
            if mapped is not None:
                return mapped
            index = int(np.random.RandomState(derive_seed(self.seed, position, attempt, 1)).randint(len(self.dataset)))
        raise RuntimeError(f"{MAX_REPLACEMENTS + 1} images in a row could not be used (the mapper returned None, "
                           "see the warnings above). Check the dataset's image files.")
