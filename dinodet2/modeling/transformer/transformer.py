"""The DETR transformer: optional encoder over the multi-level tokens, query generation, decoder.

Every improvement is switchable on its own (see ``MODEL.DETR`` in :mod:`dinodet2.config`):

* encoder layers: standard self-attention or multi-scale deformable attention;
* decoder cross-attention: standard (every token) or deformable (around each query's reference);
* queries (``query_type``):

  - ``"learned"``: DETR's learned positional queries and zero content (the seed). With a
    deformable decoder a linear layer (``reference_points``) predicts a 2-D reference point
    from each positional query, as in Deformable DETR.
  - ``"anchor"``: DAB-DETR's learned 4-D anchor boxes; the positional query of every decoder
    layer is generated from the layer's current reference box (sine embedding + MLP); content
    queries are learned.
  - ``"two_stage"``: every encoder token predicts a class and a box relative to its anchor
    (``*_enc`` losses); the top-``num_queries`` become the reference boxes. Content queries are
    learned (DINO's mixed query selection) or the selected tokens' features (detached).

* box prediction relative to the reference (inverse-sigmoid space) and iterative refinement:
  each layer's box becomes the next layer's reference, detached; with ``look_forward_twice``
  (DINO) a layer's box is predicted from the previous layer's *undetached* box so the loss of
  layer ``l`` also trains layer ``l - 1``;
* denoising queries (:mod:`dinodet2.modeling.denoising`) prepended to the matching queries,
  kept apart by a self-attention mask;
* fewer active matching queries (``forward``'s ``num_queries``, the curriculum's query ramp-up):
  only the first ``k`` learned positional queries / anchors / content queries are used (two-stage:
  the top-``k`` proposals); the parameters are sliced, so they all stay in the autograd graph.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .box_encoding import box_sine_embedding, inverse_sigmoid
from .deformable_attention import MultiScaleDeformableAttention
from .deformable_layers import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .detr_transformer import TransformerDecoderLayer, TransformerEncoderLayer, _clones
from .query_selection import to_level_coordinates, token_anchors, valid_ratios

__all__ = ["DetrTransformer", "QUERY_TYPES"]

QUERY_TYPES = ("learned", "anchor", "two_stage")


class DetrTransformer(nn.Module):
    """Encoder + query generation + decoder (see the module docstring for the options).

    ``forward`` takes batch-first flattened multi-level tokens ``src``/``pos`` ``[B, N, C]``,
    their padding ``mask`` ``[B, N]`` (True = padding), the per-level masks ``[B, h, w]`` and
    ``spatial_shapes`` ``[L, 2]``, the shared box head, and (query type ``"learned"``) the
    learned positional queries ``[Q, C]``, and optionally the number ``k`` of matching queries to
    use (``None``: all ``num_queries``; denoising queries are not counted). It returns:

    * ``states``: decoder states of every layer ``[num_layers, B, Q', C]`` (after the shared
      final LayerNorm); ``Q'`` is the ``k`` matching queries (two-stage: at most the number of
      tokens) preceded by the denoising queries, if any;
    * ``boxes``: normalised cxcywh boxes of every layer ``[num_layers, B, Q', 4]``, or ``None``
      when the queries have no reference (seed DETR: boxes are ``sigmoid(box_head(states))``);
    * ``enc_outputs``: the two-stage token proposals (``pred_logits``, ``pred_boxes``) or ``None``.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 0,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0, *, num_queries: int = 100, query_type: str = "learned",
                 num_levels: int = 1, deformable_encoder: bool = False, deformable_decoder: bool = False,
                 num_points: int = 4, deformable_heads: Optional[int] = None, refine_boxes: bool = True,
                 look_forward_twice: bool = False, mixed_query_selection: bool = True,
                 num_logits: Optional[int] = None):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM={d_model} must be divisible by MODEL.DETR.NHEADS={nhead}.")
        deformable_heads = deformable_heads or nhead
        if (deformable_encoder or deformable_decoder) and d_model % deformable_heads:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM={d_model} must be divisible by "
                             f"MODEL.DETR.DEFORMABLE.NHEADS={deformable_heads}.")
        if num_decoder_layers < 1:
            raise ValueError("MODEL.DETR.DEC_LAYERS must be >= 1.")
        if query_type not in QUERY_TYPES:
            raise ValueError(f"query_type must be one of {QUERY_TYPES}, got {query_type!r}")
        if query_type == "two_stage" and not num_logits:
            raise ValueError("two-stage query selection needs num_logits (classes of the proposal head)")
        if look_forward_twice and not refine_boxes:
            raise ValueError("MODEL.DETR.LOOK_FORWARD_TWICE needs MODEL.DETR.ITERATIVE_REFINEMENT=True.")
        if num_points < 1:
            raise ValueError(f"MODEL.DETR.DEFORMABLE.NUM_POINTS must be >= 1, got {num_points}.")

        common = dict(dim_feedforward=dim_feedforward, dropout=dropout, normalize_before=normalize_before,
                      attention_dropout=attention_dropout, activation_dropout=activation_dropout)
        if deformable_encoder:
            enc = DeformableTransformerEncoderLayer(d_model, deformable_heads, num_levels, num_points, **common)
        else:
            enc = TransformerEncoderLayer(d_model, nhead, **common)
        if deformable_decoder:
            dec = DeformableTransformerDecoderLayer(d_model, deformable_heads, num_levels, num_points, **common)
        else:
            dec = TransformerDecoderLayer(d_model, nhead, **common)
        self.encoder_layers = _clones(enc, num_encoder_layers)
        self.encoder_norm = nn.LayerNorm(d_model) if normalize_before and num_encoder_layers else None
        self.decoder_layers = _clones(dec, num_decoder_layers)
        self.decoder_norm = nn.LayerNorm(d_model)
        self._reset_layer_parameters()

        self.d_model = d_model
        self.num_queries = num_queries
        self.query_type = query_type
        self.num_levels = num_levels
        self.deformable_encoder = deformable_encoder
        self.deformable_decoder = deformable_decoder
        self.refine_boxes = refine_boxes
        self.look_forward_twice = look_forward_twice
        self.mixed_query_selection = mixed_query_selection

        if query_type == "learned":
            if deformable_decoder:  # Deformable DETR: 2-D reference point from the positional query
                self.reference_points = nn.Linear(d_model, 2)
                nn.init.xavier_uniform_(self.reference_points.weight)
                nn.init.zeros_(self.reference_points.bias)
        else:
            self.ref_point_head = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
            if query_type == "anchor" or mixed_query_selection:
                self.content_queries = nn.Parameter(torch.zeros(num_queries, d_model))
        if query_type == "anchor":
            # DAB-DETR anchors, stored before the sigmoid: centres spread uniformly, size 0.1.
            anchors = torch.cat([torch.rand(num_queries, 2), torch.full((num_queries, 2), 0.1)], 1)
            self.anchor_boxes = nn.Parameter(inverse_sigmoid(anchors))
        if query_type == "two_stage":
            self.enc_output = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
            self.enc_class_embed = nn.Linear(d_model, num_logits)
            self.enc_bbox_embed = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model),
                                                nn.ReLU(), nn.Linear(d_model, 4))
            nn.init.constant_(self.enc_class_embed.bias, -math.log((1 - 0.01) / 0.01))
            nn.init.zeros_(self.enc_bbox_embed[-1].weight)
            nn.init.zeros_(self.enc_bbox_embed[-1].bias)

    def _reset_layer_parameters(self):
        """Xavier for the attention/FFN weights; deformable attention keeps its own init."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m._reset_parameters()

    @property
    def uses_reference_boxes(self) -> bool:
        """Whether queries carry reference boxes (needed by denoising queries)."""
        return self.query_type != "learned"

    # ------------------------------------------------------------------------------------------
    def encode(self, src, mask, pos, spatial_shapes=None, reference_points=None):
        """Run the (optional) encoder layers over the image tokens."""
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, pos=pos, key_padding_mask=mask, reference_points=reference_points,
                           spatial_shapes=spatial_shapes)
        if self.encoder_norm is not None:
            memory = self.encoder_norm(memory)
        return memory

    def propose(self, memory: torch.Tensor, level_masks: List[torch.Tensor],
                anchors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Class logits and boxes of every token; padding tokens get a score of -inf for selection.

        ``anchors``: :func:`token_anchors` of ``level_masks`` if already computed."""
        anchors, valid = anchors if anchors is not None else token_anchors(level_masks)
        feat = self.enc_output(memory)
        logits = self.enc_class_embed(feat).masked_fill(~valid[..., None], -1e4)  # padding: background
        boxes = (self.enc_bbox_embed(feat) + inverse_sigmoid(anchors.to(feat.dtype))).sigmoid()
        scores = logits.detach().float().sigmoid().amax(-1).masked_fill(~valid, float("-inf"))
        return {"pred_logits": logits, "pred_boxes": boxes, "scores": scores, "features": feat}

    def initial_queries(self, memory, level_masks, query_embed, anchors=None,
                        num_queries: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                                    Optional[torch.Tensor], Optional[Dict]]:
        """Content queries ``[B, Q, C]``, fixed positional queries (learned type only), initial
        references (``[B, Q, 2|4]`` or ``None``) and the two-stage proposals.

        ``num_queries``: use only the first ``Q = num_queries`` queries (``None``: all of them)."""
        if num_queries is None:
            num_queries = self.num_queries
        elif not 1 <= num_queries <= self.num_queries:
            raise ValueError(f"num_queries must be in [1, {self.num_queries}], got {num_queries}")
        batch = memory.shape[0]
        if self.query_type == "learned":
            if query_embed is None:
                raise ValueError("query_type 'learned' needs the learned positional queries (query_embed)")
            query_pos = query_embed[:num_queries].unsqueeze(0).expand(batch, -1, -1)
            reference = self.reference_points(query_pos).sigmoid() if self.deformable_decoder else None
            return torch.zeros_like(query_pos), query_pos, reference, None
        if self.query_type == "anchor":
            reference = self.anchor_boxes[:num_queries].sigmoid().unsqueeze(0).expand(batch, -1, -1)
            return self.content_queries[:num_queries].unsqueeze(0).expand(batch, -1, -1), None, reference, None
        proposals = self.propose(memory, level_masks, anchors)
        k = min(num_queries, memory.shape[1])
        top = proposals["scores"].topk(k, dim=1).indices  # [B, k]
        reference = torch.gather(proposals["pred_boxes"].detach(), 1, top[..., None].expand(-1, -1, 4))
        if self.mixed_query_selection:
            tgt = self.content_queries[:k].unsqueeze(0).expand(batch, -1, -1)
        else:
            feats = proposals["features"]
            tgt = torch.gather(feats, 1, top[..., None].expand(-1, -1, feats.shape[-1])).detach()
        enc_outputs = {"pred_logits": proposals["pred_logits"], "pred_boxes": proposals["pred_boxes"]}
        return tgt, None, reference, enc_outputs

    def forward(self, src, mask, pos, level_masks, spatial_shapes, box_head, query_embed=None, denoising=None,
                num_queries: Optional[int] = None):
        if mask is not None and not bool(mask.any()):
            mask = None  # no padding in this batch: attention can take PyTorch's fused (flash) path
        ratios = valid_ratios(level_masks).to(src.dtype)
        anchors, enc_refs = None, None
        if self.query_type == "two_stage" or (self.deformable_encoder and len(self.encoder_layers)):
            anchors = token_anchors(level_masks)  # computed once: encoder references and proposals
        if self.deformable_encoder and len(self.encoder_layers):
            enc_refs = to_level_coordinates(anchors[0][..., :2].to(src.dtype), ratios)
        memory = self.encode(src, mask, pos, spatial_shapes, enc_refs)

        tgt, query_pos, reference, enc_outputs = self.initial_queries(memory, level_masks, query_embed, anchors,
                                                                      num_queries)
        attn_mask = None
        if denoising is not None:
            if reference is None or reference.shape[-1] != 4:
                raise ValueError("denoising queries need reference-box queries (anchor or two-stage)")
            tgt = torch.cat([denoising.queries.to(tgt.dtype), tgt], 1)
            reference = torch.cat([denoising.boxes.to(reference.dtype), reference], 1)
            attn_mask = denoising.attention_mask(tgt.shape[1])

        states, boxes = [], []
        previous = reference  # the box a layer's prediction is relative to
        for layer in self.decoder_layers:
            if self.query_type != "learned":
                query_pos = self.ref_point_head(box_sine_embedding(reference, self.d_model // 2))
            level_refs = to_level_coordinates(reference, ratios) if self.deformable_decoder else None
            tgt = layer(tgt, memory, query_pos=query_pos, pos=pos, memory_key_padding_mask=mask,
                        self_attn_mask=attn_mask, reference_points=level_refs, spatial_shapes=spatial_shapes)
            state = self.decoder_norm(tgt)
            states.append(state)
            if reference is None:
                continue
            base = inverse_sigmoid(previous if self.look_forward_twice else reference)
            if base.shape[-1] == 2:  # point reference: the box head predicts the size directly
                base = F.pad(base, (0, 2))
            box = (box_head(state) + base).sigmoid()
            boxes.append(box)
            if self.refine_boxes:
                reference, previous = box.detach(), box
        return torch.stack(states), (torch.stack(boxes) if boxes else None), enc_outputs
