"""Decoder queries: each kind is a module that owns its parameters and returns one
:class:`QueryInit` (content, positional part, reference, proposals).

* :class:`LearnedQueries` (the seed): DETR's learned positional queries and zero content. With a
  deformable decoder a linear layer (``reference_points``) predicts a 2-D reference point from
  each positional query, as in Deformable DETR. The positional part is fixed for every layer.
* :class:`AnchorQueries`: DAB-DETR's learned 4-D anchor boxes and learned content queries; every
  decoder layer's positional query is generated from its current reference box (sine embedding +
  MLP, :meth:`ReferenceBoxQueries.position`).
* :class:`TwoStageQueries`: every encoder token predicts a class and a box relative to its anchor
  (the ``*_enc`` losses); the top-``k`` become the reference boxes. Content queries are learned
  (DINO's mixed query selection) or the selected tokens' features (detached).

Fewer active queries (the curriculum's query ramp-up): only the first ``k`` learned queries /
anchors / content queries are used (two-stage: the top-``k`` proposals); parameters are sliced,
so they all stay in the autograd graph.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..classification import Classification
from .adaptive_queries import AdaptiveQueryCount
from .box_encoding import box_sine_embedding, inverse_sigmoid
from .multilevel_tokens import MultiLevelTokens
from .scale_aware import PROPOSAL_HEAD_KINDS, LevelHeads

__all__ = ["AnchorQueries", "LearnedQueries", "QUERY_TYPES", "QueryInit", "ReferenceBoxQueries", "TwoStageQueries",
           "build_queries"]

QUERY_TYPES = ("learned", "anchor", "two_stage")


@dataclass
class QueryInit:
    """What the decoder starts from.

    Attributes:
        content: ``[B, Q, C]`` content queries.
        reference: ``[B, Q, 2]`` points or ``[B, Q, 4]`` boxes (normalised), or None (the seed:
            boxes are predicted without a reference).
        proposals: two-stage token proposals ``{"pred_logits", "pred_boxes"}`` (``*_enc`` losses) or None.
        padding: ``[B, Q]`` True on padding queries (an adaptive query count per image), or None.
    """

    content: torch.Tensor
    reference: Optional[torch.Tensor]
    proposals: Optional[Dict[str, torch.Tensor]] = None
    padding: Optional[torch.Tensor] = None


class Queries(nn.Module):
    """Base of the query kinds: ``initial(tokens, memory, k)`` and ``position(reference)``."""

    #: whether the queries carry 4-D reference boxes (what denoising queries need)
    uses_reference_boxes = False

    def __init__(self, num_queries: int, d_model: int):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"MODEL.DETR.NUM_QUERIES must be >= 1, got {num_queries}.")
        self.num_queries = num_queries
        self.d_model = d_model

    def check_active(self, k: Optional[int]) -> int:
        if k is None:
            return self.num_queries
        if not 1 <= k <= self.num_queries:
            raise ValueError(f"The number of active queries must be in [1, MODEL.DETR.NUM_QUERIES={self.num_queries}] "
                             f"(or None for all), got {k}.")
        return k

    def initial(self, tokens: MultiLevelTokens, memory: torch.Tensor, k: Optional[int] = None) -> QueryInit:
        raise NotImplementedError

    def position(self, reference: Optional[torch.Tensor], batch: int, k: int) -> torch.Tensor:
        """Positional queries ``[B, k', C]`` of a decoder layer whose queries are at ``reference``."""
        raise NotImplementedError


class LearnedQueries(Queries):
    """DETR's learned positional queries (see the module docstring)."""

    def __init__(self, num_queries: int, d_model: int, point_reference: bool = False):
        super().__init__(num_queries, d_model)
        self.query_pos = nn.Parameter(torch.empty(num_queries, d_model))
        nn.init.normal_(self.query_pos)
        self.reference_points = nn.Linear(d_model, 2) if point_reference else None
        if self.reference_points is not None:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)

    def no_weight_decay(self):
        return {"query_pos"}

    def lr_roles(self):
        if self.reference_points is None:
            return {}
        return {f"reference_points.{n}": "deformable" for n, _ in self.reference_points.named_parameters()}

    def initial(self, tokens, memory, k=None):
        k = self.check_active(k)
        query_pos = self.position(None, memory.shape[0], k)
        reference = self.reference_points(query_pos).sigmoid() if self.reference_points is not None else None
        return QueryInit(torch.zeros_like(query_pos), reference)

    def position(self, reference, batch, k):
        return self.query_pos[:k].unsqueeze(0).expand(batch, -1, -1)


class ReferenceBoxQueries(Queries):
    """Queries at reference boxes: a layer's positional query is an MLP of the box's sine embedding."""

    uses_reference_boxes = True

    def __init__(self, num_queries: int, d_model: int, learned_content: bool = True):
        super().__init__(num_queries, d_model)
        self.ref_point_head = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.content = nn.Parameter(torch.zeros(num_queries, d_model)) if learned_content else None

    def no_weight_decay(self):
        return {"content"} if self.content is not None else set()

    def position(self, reference, batch, k):
        return self.ref_point_head(box_sine_embedding(reference, self.d_model // 2))

    def learned_content(self, batch: int, k: int) -> torch.Tensor:
        return self.content[:k].unsqueeze(0).expand(batch, -1, -1)


class AnchorQueries(ReferenceBoxQueries):
    """DAB-DETR's learned anchor boxes (see the module docstring)."""

    def __init__(self, num_queries: int, d_model: int):
        super().__init__(num_queries, d_model)
        # Stored before the sigmoid: centres spread uniformly, size 0.1.
        anchors = torch.cat([torch.rand(num_queries, 2), torch.full((num_queries, 2), 0.1)], 1)
        self.anchor_boxes = nn.Parameter(inverse_sigmoid(anchors))

    def no_weight_decay(self):
        return super().no_weight_decay() | {"anchor_boxes"}

    def initial(self, tokens, memory, k=None):
        k = self.check_active(k)
        batch = memory.shape[0]
        reference = self.anchor_boxes[:k].sigmoid().unsqueeze(0).expand(batch, -1, -1)
        return QueryInit(self.learned_content(batch, k), reference)


class TwoStageQueries(ReferenceBoxQueries):
    """Encoder-token proposals as reference boxes (see the module docstring).

    Args:
        classification: how the proposals' class logits are read; must be a sigmoid reading
            (proposals are ranked by their best class probability).
        mixed_selection: learned content queries (DINO) instead of the selected tokens' features.
        adaptive_count: in inference, keep a per-image number of proposals
            (:class:`~.adaptive_queries.AdaptiveQueryCount`) instead of the fixed top-``k``.
        num_levels: with a number, every feature level gets its own class and box head
            (:class:`~.scale_aware.LevelHeads`, ``MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS "per_level"``);
            None: one head shared by all levels.
        excluded_levels: levels whose tokens never become proposals (``MODEL.DETR.DECODER_ONLY_LEVELS``).
    """

    def __init__(self, num_queries: int, d_model: int, classification: Classification, mixed_selection: bool = True,
                 adaptive_count: Optional[AdaptiveQueryCount] = None, num_levels: Optional[int] = None,
                 excluded_levels: Sequence[int] = ()):
        if not classification.sigmoid:
            raise ValueError("MODEL.DETR.TWO_STAGE=True selects proposals by sigmoid scores and needs "
                             "MODEL.DETR.CLASS_LOSS='focal' or 'varifocal'.")
        super().__init__(num_queries, d_model, learned_content=mixed_selection)
        self.classification = classification
        self.adaptive_count = adaptive_count
        self.excluded_levels = tuple(excluded_levels)
        self.token_proj = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        if num_levels is None:
            self.class_head, self.box_head = classification.head(d_model), _proposal_box_head(d_model)
        else:
            self.class_head = LevelHeads([classification.head(d_model) for _ in range(num_levels)])
            self.box_head = LevelHeads([_proposal_box_head(d_model) for _ in range(num_levels)])

    def _run_head(self, head: nn.Module, feat: torch.Tensor, tokens: MultiLevelTokens) -> torch.Tensor:
        return head(feat, tokens.spatial_shapes.level_sizes) if isinstance(head, LevelHeads) else head(feat)

    def propose(self, tokens: MultiLevelTokens, memory: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Class logits and boxes of every token; padding tokens get a score of -inf for selection."""
        anchors, valid = tokens.anchors
        allowed = tokens.token_mask_without(self.excluded_levels)
        if allowed is not None:  # decoder-only levels: no proposals (background, never selected)
            valid = valid & allowed
        feat = self.token_proj(memory)
        # padding tokens: background
        logits = self._run_head(self.class_head, feat, tokens).masked_fill(~valid[..., None], -1e4)
        boxes = (self._run_head(self.box_head, feat, tokens) + inverse_sigmoid(anchors.to(feat.dtype))).sigmoid()
        scores = self.classification.selection_scores(logits).masked_fill(~valid, float("-inf"))
        return {"pred_logits": logits, "pred_boxes": boxes, "scores": scores, "features": feat}

    def initial(self, tokens, memory, k=None):
        k = min(self.check_active(k), memory.shape[1])
        proposals = self.propose(tokens, memory)
        padding = None
        if self.adaptive_count is not None and not self.training:
            top, padding = self.adaptive_count.select(proposals["scores"], k)
            k = top.shape[1]
        else:
            top = proposals["scores"].topk(k, dim=1).indices  # [B, k]
        reference = torch.gather(proposals["pred_boxes"].detach(), 1, top[..., None].expand(-1, -1, 4))
        if self.content is not None:
            content = self.learned_content(memory.shape[0], k)
        else:
            feats = proposals["features"]
            content = torch.gather(feats, 1, top[..., None].expand(-1, -1, feats.shape[-1])).detach()
        return QueryInit(content, reference, {"pred_logits": proposals["pred_logits"],
                                              "pred_boxes": proposals["pred_boxes"]}, padding)


def _proposal_box_head(d_model: int) -> nn.Sequential:
    """A proposal box head: 3-layer MLP, the last layer zero-initialised (boxes start at the anchors)."""
    head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU(),
                         nn.Linear(d_model, 4))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def build_queries(cfg, classification: Classification, num_levels: Optional[int] = None) -> Queries:
    """The query kind ``MODEL.DETR`` selects: TWO_STAGE, else ANCHOR_QUERIES, else learned.
    ``num_levels``: the transformer's feature levels (for per-level proposal heads)."""
    c = cfg.MODEL.DETR
    kind = c.SCALE_AWARE.PROPOSAL_HEADS
    if kind not in PROPOSAL_HEAD_KINDS:
        raise ValueError(f"MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS={kind!r} must be one of {PROPOSAL_HEAD_KINDS}.")
    if kind == "per_level" and not c.TWO_STAGE:
        raise ValueError("MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS 'per_level' gives the two-stage proposals per-level "
                         "heads and needs MODEL.DETR.TWO_STAGE True.")
    if kind == "per_level" and num_levels is None:
        raise ValueError("per-level proposal heads need the number of feature levels")
    if c.TWO_STAGE:
        return TwoStageQueries(c.NUM_QUERIES, c.HIDDEN_DIM, classification, c.MIXED_QUERY_SELECTION,
                               AdaptiveQueryCount.from_config(cfg), num_levels if kind == "per_level" else None,
                               excluded_levels=c.DECODER_ONLY_LEVELS)
    if c.ADAPTIVE_QUERIES.ENABLED:
        AdaptiveQueryCount.from_config(cfg)  # raises: the count needs two-stage proposals
    if c.ANCHOR_QUERIES:
        return AnchorQueries(c.NUM_QUERIES, c.HIDDEN_DIM)
    return LearnedQueries(c.NUM_QUERIES, c.HIDDEN_DIM, point_reference=c.DEFORMABLE.DECODER)
