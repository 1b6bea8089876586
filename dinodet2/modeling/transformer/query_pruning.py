"""Progressive query pruning and early termination of the decoder (inference).

After each decoder layer every active query is scored (its best class probability, read by the
model's own class head) and:

* **dropped** when the score is below ``drop_score``: it cannot become a detection, so the
  following layers skip it;
* **frozen** when the score reaches ``freeze_score`` and its box moved by at most
  ``freeze_box_delta`` (largest change of a normalised cx/cy/w/h) in that layer: it is confident
  and settled, and its prediction is final.

Dropped and frozen queries keep their last state and box, so the model's output has every query
and post-processing is unchanged; they also stay keys (not queries) of the later layers'
self-attention, with the content they left with, because DETR's self-attention is where queries
suppress each other's duplicates. The active queries of every image are packed to the front and
the batch is cut to the largest active count (a padding mask covers the rest), so later layers
really run on fewer queries; the decoder stops when no query is active. Pruning starts after
layer ``start_layer`` (1-based) and never applies in training.

With ``drop_score`` 0 and ``freeze_score`` above 1 nothing ever leaves, and the detections equal
the full decoder's exactly. See ``MODEL.DETR.QUERY_PRUNING``.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

__all__ = ["DecodingStats", "QueryPruning"]


class QueryPruning:
    """When a query leaves the decoder (see the module docstring)."""

    def __init__(self, drop_score: float = 0.0, freeze_score: float = 1.01, freeze_box_delta: float = 0.0,
                 start_layer: int = 1):
        if not 0.0 <= drop_score <= 1.0:
            raise ValueError(f"MODEL.DETR.QUERY_PRUNING.DROP_SCORE is a probability in [0, 1], got {drop_score}.")
        if freeze_score < 0.0:
            raise ValueError(f"MODEL.DETR.QUERY_PRUNING.FREEZE_SCORE must be >= 0 (above 1: never freeze), "
                             f"got {freeze_score}.")
        if freeze_box_delta < 0.0:
            raise ValueError(f"MODEL.DETR.QUERY_PRUNING.FREEZE_BOX_DELTA must be >= 0, got {freeze_box_delta}.")
        if start_layer < 1:
            raise ValueError(f"MODEL.DETR.QUERY_PRUNING.START_LAYER must be >= 1, got {start_layer}.")
        self.drop_score = float(drop_score)
        self.freeze_score = float(freeze_score)
        self.freeze_box_delta = float(freeze_box_delta)
        self.start_layer = int(start_layer)

    @classmethod
    def from_config(cls, cfg) -> Optional["QueryPruning"]:
        """The pruning ``MODEL.DETR.QUERY_PRUNING`` describes, or None when it is off."""
        c = cfg.MODEL.DETR.QUERY_PRUNING
        if not c.ENABLED:
            return None
        return cls(c.DROP_SCORE, c.FREEZE_SCORE, c.FREEZE_BOX_DELTA, c.START_LAYER)

    def applies_after(self, layer_number: int) -> bool:
        """Whether queries may leave after the ``layer_number``-th layer (1-based)."""
        return layer_number >= self.start_layer

    def leaving(self, scores: torch.Tensor, box: torch.Tensor, previous_box: Optional[torch.Tensor]) -> torch.Tensor:
        """``[B, Q]`` True for the queries that leave after this layer (dropped or frozen).

        ``previous_box``: the box (or 2-D reference point: only the centre is compared) before
        this layer; None (no reference) counts as moving, so nothing freezes."""
        drop = scores < self.drop_score
        if previous_box is None:
            return drop
        moved = (box[..., :previous_box.shape[-1]] - previous_box).abs().amax(-1)
        freeze = (scores >= self.freeze_score) & (moved <= self.freeze_box_delta)
        return drop | freeze

    def __repr__(self) -> str:
        return (f"QueryPruning(drop_score={self.drop_score}, freeze_score={self.freeze_score}, "
                f"freeze_box_delta={self.freeze_box_delta}, start_layer={self.start_layer})")


@dataclass
class DecodingStats:
    """What one decoder pass cost: ``queries_per_layer[l]`` is the mean number of (real, active)
    queries per image that layer ``l`` ran on; ``layers_run`` how many layers ran."""

    num_layers: int
    queries_per_layer: List[float] = field(default_factory=list)

    @property
    def layers_run(self) -> int:
        return len(self.queries_per_layer)

    @property
    def initial_queries(self) -> float:
        return self.queries_per_layer[0] if self.queries_per_layer else 0.0


class ActiveQueries:
    """Bookkeeping of progressive decoding: which original query each slot of the packed batch
    holds, which slots are real, and every query's last state and box."""

    def __init__(self, content: torch.Tensor, padding: Optional[torch.Tensor]):
        batch, num_queries, dim = content.shape
        self.index = torch.arange(num_queries, device=content.device).expand(batch, -1)
        self.valid = torch.ones(batch, num_queries, dtype=torch.bool, device=content.device) if padding is None \
            else ~padding
        self.final_state = content.new_zeros(batch, num_queries, dim)
        self.final_box = content.new_zeros(batch, num_queries, 4)
        # every query's content and positional query as a self-attention key of the later layers
        self.key_content = content.new_zeros(batch, num_queries, dim)
        self.key_pos = content.new_zeros(batch, num_queries, dim)
        self.key_padding = padding
        self.packed = False  # whether a query has left (from then on the keys are kept apart)

    @property
    def padding(self) -> Optional[torch.Tensor]:
        return None if bool(self.valid.all()) else ~self.valid

    def _write(self, pairs) -> None:
        """Scatter ``[B, slots, *]`` values of the real slots into ``[B, Q, *]`` per-query buffers."""
        for buffer, value in pairs:
            index = self.index[..., None].expand(-1, -1, value.shape[-1])
            kept = torch.where(self.valid[..., None], value.to(buffer.dtype), buffer.gather(1, index))
            buffer.scatter_(1, index, kept)

    def record(self, state: torch.Tensor, box: torch.Tensor) -> None:
        """Store the real slots' current predictions as their queries' last ones."""
        self._write(((self.final_state, state), (self.final_box, box)))

    def record_keys(self, content: torch.Tensor, query_pos: torch.Tensor) -> None:
        """Store the real slots' content and positional query as their self-attention keys."""
        self._write(((self.key_content, content), (self.key_pos, query_pos)))

    def self_attention_keys(self, content: torch.Tensor, query_pos: torch.Tensor):
        """The keys of a layer after queries left: every (non-padding) query, the active ones with
        their current content, the others with what they left with. DETR's self-attention is where
        queries suppress each other's duplicates, so a query that is final still takes part."""
        self.record_keys(content, query_pos)
        return self.key_content, self.key_pos, self.key_padding

    def keep(self, still_active: torch.Tensor, *tensors: Optional[torch.Tensor]
             ) -> Tuple[bool, Tuple[Optional[torch.Tensor], ...]]:
        """Pack the slots that stay active to the front and cut the batch to the largest count.

        Returns whether any query is left and the gathered ``tensors`` (``[B, Q, *]``; None stays
        None). When no slot leaves, nothing is gathered (the tensors come back unchanged).
        """
        active = self.valid & still_active
        if not bool(active.any()):
            return False, tensors
        if bool((active == self.valid).all()):
            return True, tensors
        count = int(active.sum(1).max())
        order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :count]

        def take(t):
            return None if t is None else t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand(
                -1, -1, *t.shape[2:]))

        self.index = self.index.gather(1, order)
        self.valid = active.gather(1, order)
        self.packed = True
        return True, tuple(take(t) for t in tensors)
