"""Adaptive number of decoder queries per image (two-stage query selection at inference).

Two-stage selection ranks every encoder token's proposal by its best class probability and
keeps the top ``k``. An easy image (few, clear objects) needs far fewer queries than a crowded
one, so :class:`AdaptiveQueryCount` keeps, per image, the proposals whose score reaches
``score_threshold``, clamped to ``[min_queries, max_queries]``. Images of one batch may keep
different counts: the batch is cut to the largest count and the shorter images' tail queries
are padding (a ``[B, Q]`` mask), excluded from the decoder's self-attention and from the
detections; the decoder itself runs once for the whole batch.

Training keeps the fixed top-``k``: the count applies in inference only (the model is trained
with all ``k`` queries, and the losses have no notion of padded queries). With a threshold of 0
every image keeps ``k`` queries and the detections equal the fixed top-``k``'s exactly. See
``MODEL.DETR.ADAPTIVE_QUERIES``.
"""
from typing import Optional, Tuple

import torch

__all__ = ["AdaptiveQueryCount"]


class AdaptiveQueryCount:
    """Per-image number of queries from the proposal scores (see the module docstring).

    Args:
        score_threshold: a proposal is kept when its best class probability is ``>=`` this
            (0 keeps every proposal up to ``max_queries``: the fixed top-``k``).
        min_queries: every image keeps at least this many (>= 1).
        max_queries: at most this many (0: the query kind's number of queries).
    """

    def __init__(self, score_threshold: float, min_queries: int = 1, max_queries: int = 0):
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError("MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD is a probability in [0, 1], "
                             f"got {score_threshold}.")
        if min_queries < 1:
            raise ValueError(f"MODEL.DETR.ADAPTIVE_QUERIES.MIN_QUERIES must be >= 1, got {min_queries}.")
        if max_queries and max_queries < min_queries:
            raise ValueError(f"MODEL.DETR.ADAPTIVE_QUERIES.MAX_QUERIES={max_queries} is below MIN_QUERIES="
                             f"{min_queries} (0 means MODEL.DETR.NUM_QUERIES).")
        self.score_threshold = float(score_threshold)
        self.min_queries = int(min_queries)
        self.max_queries = int(max_queries)

    @classmethod
    def from_config(cls, cfg) -> Optional["AdaptiveQueryCount"]:
        """The count ``MODEL.DETR.ADAPTIVE_QUERIES`` describes, or None when it is off."""
        c = cfg.MODEL.DETR.ADAPTIVE_QUERIES
        if not c.ENABLED:
            return None
        if not cfg.MODEL.DETR.TWO_STAGE:
            raise ValueError("MODEL.DETR.ADAPTIVE_QUERIES.ENABLED needs MODEL.DETR.TWO_STAGE=True: the count "
                             "follows the encoder proposals' scores.")
        return cls(c.SCORE_THRESHOLD, c.MIN_QUERIES, c.MAX_QUERIES)

    def select(self, scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Indices ``[B, Q]`` of the kept proposals (best first) and the padding mask ``[B, Q]``
        (True = padding; None when every image keeps ``Q``).

        ``scores``: ``[B, N]`` proposal scores (-inf on padding tokens, never kept unless an
        image has fewer valid tokens than ``min_queries``); ``k``: the query kind's budget.
        """
        k = min(k, self.max_queries or k, scores.shape[1])
        top_scores, top = scores.topk(k, dim=1)  # sorted, best first
        low = min(self.min_queries, k)
        counts = (top_scores >= self.score_threshold).sum(1).clamp(min=low, max=k)
        kept = int(counts.max())  # one host sync: the batch's query count
        padding = torch.arange(kept, device=scores.device)[None] >= counts[:, None]
        return top[:, :kept], (padding if bool(padding.any()) else None)
