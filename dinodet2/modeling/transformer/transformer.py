"""The DETR transformer, built from its parts: an encoder over the multi-level tokens, the
decoder queries (:mod:`.queries`) and a decoder that refines boxes layer by layer.

Every improvement is a part or a setting of a part (see ``MODEL.DETR`` in :mod:`dinodet2.config`):

* encoder layers: standard self-attention or multi-scale deformable attention (:class:`DetrEncoder`);
* decoder cross-attention: standard (every token) or deformable (around each query's reference);
* queries: learned, anchor or two-stage (:func:`~.queries.build_queries`);
* boxes are predicted relative to the reference (inverse-sigmoid space; no reference: relative to
  0, the seed's ``sigmoid(box_head(state))``); with iterative refinement each layer's box becomes
  the next layer's reference, detached; with ``look_forward_twice`` (DINO) a layer's box is
  predicted from the previous layer's *undetached* box so the loss of layer ``l`` also trains
  layer ``l - 1`` (:class:`DetrDecoder`);
* denoising queries (:mod:`dinodet2.modeling.denoising`) are prepended to the matching queries,
  kept apart by a self-attention mask.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classification import Classification
from .box_encoding import inverse_sigmoid
from .deformable_attention import MultiScaleDeformableAttention
from .deformable_layers import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .layers import TransformerDecoderLayer, TransformerEncoderLayer, clones
from .multilevel_tokens import MultiLevelTokens
from .queries import Queries, build_queries
from .token_geometry import to_level_coordinates

__all__ = ["BoxHead", "DetrDecoder", "DetrEncoder", "DetrTransformer"]


def _reset_layer_parameters(module: nn.Module) -> None:
    """Xavier for the attention / FFN weights; deformable attention keeps its own init."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m._reset_parameters()


class BoxHead(nn.Module):
    """``num_layers`` linear layers with ReLU in between, the last one zero-initialised (DETR's box MLP)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DetrEncoder(nn.Module):
    """Encoder layers (standard or deformable) over the multi-level tokens, optional final norm."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.norm = norm if num_layers else None
        self.deformable = isinstance(layer, DeformableTransformerEncoderLayer)
        _reset_layer_parameters(self.layers)

    def forward(self, tokens: MultiLevelTokens) -> torch.Tensor:
        memory = tokens.src
        if not len(self.layers):
            return memory
        # Deformable layers sample around every token's own centre on every level.
        refs = to_level_coordinates(tokens.anchors[0][..., :2].to(memory.dtype), tokens.ratios) \
            if self.deformable else None
        for layer in self.layers:
            memory = layer(memory, pos=tokens.pos, key_padding_mask=tokens.mask, reference_points=refs,
                           spatial_shapes=tokens.spatial_shapes)
        return self.norm(memory) if self.norm is not None else memory


class DetrDecoder(nn.Module):
    """Decoder layers + shared final norm + the box head that predicts every layer's boxes.

    Args:
        layer: one decoder layer (standard or deformable), cloned ``num_layers`` times.
        box_head: predicts box deltas relative to the reference (inverse-sigmoid space).
        refine_boxes: each layer's box becomes the next layer's reference (detached).
        look_forward_twice: predict from the previous layer's undetached box (needs refine_boxes).
    """

    def __init__(self, layer: nn.Module, num_layers: int, d_model: int, box_head: nn.Module,
                 refine_boxes: bool = True, look_forward_twice: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError("MODEL.DETR.DEC_LAYERS must be >= 1.")
        if look_forward_twice and not refine_boxes:
            raise ValueError("MODEL.DETR.LOOK_FORWARD_TWICE needs MODEL.DETR.ITERATIVE_REFINEMENT=True.")
        self.layers = clones(layer, num_layers)
        _reset_layer_parameters(self.layers)
        self.norm = nn.LayerNorm(d_model)
        self.box_head = box_head
        self.deformable = isinstance(layer, DeformableTransformerDecoderLayer)
        self.refine_boxes = refine_boxes
        self.look_forward_twice = look_forward_twice

    def forward(self, tokens: MultiLevelTokens, memory: torch.Tensor, queries: Queries, content: torch.Tensor,
                reference: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """States ``[L, B, Q, C]`` (after the final norm) and boxes ``[L, B, Q, 4]`` of every layer."""
        batch, num_queries = content.shape[:2]
        states, boxes = [], []
        previous = reference  # the box a layer's prediction is relative to
        for layer in self.layers:
            query_pos = queries.position(reference, batch, num_queries)
            level_refs = to_level_coordinates(reference, tokens.ratios) if self.deformable else None
            content = layer(content, memory, query_pos=query_pos, pos=tokens.pos, memory_key_padding_mask=tokens.mask,
                            self_attn_mask=attn_mask, reference_points=level_refs,
                            spatial_shapes=tokens.spatial_shapes)
            state = self.norm(content)
            states.append(state)
            delta = self.box_head(state)
            base = previous if self.look_forward_twice else reference
            if base is not None:
                base = inverse_sigmoid(base)
                delta = delta + (F.pad(base, (0, 2)) if base.shape[-1] == 2 else base)  # a point: size from 0
            box = delta.sigmoid()
            boxes.append(box)
            if self.refine_boxes and reference is not None:
                reference, previous = box.detach(), box
        return torch.stack(states), torch.stack(boxes)


class DetrTransformer(nn.Module):
    """Encoder + queries + decoder (see the module docstring).

    ``forward(tokens, denoising=None, num_queries=None)`` returns:

    * ``states``: decoder states of every layer ``[num_layers, B, Q', C]``; ``Q'`` is the ``k``
      matching queries (two-stage: at most the number of tokens) preceded by the denoising queries;
    * ``boxes``: normalised cxcywh boxes of every layer ``[num_layers, B, Q', 4]``;
    * ``proposals``: the two-stage token proposals (``pred_logits``, ``pred_boxes``) or None.
    """

    def __init__(self, encoder: DetrEncoder, queries: Queries, decoder: DetrDecoder):
        super().__init__()
        self.encoder = encoder
        self.queries = queries
        self.decoder = decoder

    @classmethod
    def from_config(cls, cfg, classification: Classification, num_levels: int) -> "DetrTransformer":
        """The transformer ``MODEL.DETR`` describes, over ``num_levels`` feature levels."""
        c = cfg.MODEL.DETR
        if c.HIDDEN_DIM % c.NHEADS:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM={c.HIDDEN_DIM} must be divisible by MODEL.DETR.NHEADS={c.NHEADS}.")
        deformable_heads = c.DEFORMABLE.NHEADS or c.NHEADS
        if (c.DEFORMABLE.ENCODER or c.DEFORMABLE.DECODER) and c.HIDDEN_DIM % deformable_heads:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM={c.HIDDEN_DIM} must be divisible by "
                             f"MODEL.DETR.DEFORMABLE.NHEADS={deformable_heads}.")
        if c.DEFORMABLE.NUM_POINTS < 1:
            raise ValueError(f"MODEL.DETR.DEFORMABLE.NUM_POINTS must be >= 1, got {c.DEFORMABLE.NUM_POINTS}.")
        common = dict(dim_feedforward=c.DIM_FEEDFORWARD, dropout=c.DROPOUT, normalize_before=c.PRE_NORM,
                      attention_dropout=c.ATTENTION_DROPOUT, activation_dropout=c.ACTIVATION_DROPOUT)
        deformable = (c.HIDDEN_DIM, deformable_heads, num_levels, c.DEFORMABLE.NUM_POINTS)
        if c.DEFORMABLE.ENCODER:
            encoder_layer = DeformableTransformerEncoderLayer(*deformable, **common)
        else:
            encoder_layer = TransformerEncoderLayer(c.HIDDEN_DIM, c.NHEADS, **common)
        if c.DEFORMABLE.DECODER:
            decoder_layer = DeformableTransformerDecoderLayer(*deformable, **common)
        else:
            decoder_layer = TransformerDecoderLayer(c.HIDDEN_DIM, c.NHEADS, **common)
        encoder = DetrEncoder(encoder_layer, c.ENC_LAYERS, nn.LayerNorm(c.HIDDEN_DIM) if c.PRE_NORM else None)
        decoder = DetrDecoder(decoder_layer, c.DEC_LAYERS, c.HIDDEN_DIM, BoxHead(c.HIDDEN_DIM, c.HIDDEN_DIM, 4, 3),
                              refine_boxes=c.ITERATIVE_REFINEMENT, look_forward_twice=c.LOOK_FORWARD_TWICE)
        return cls(encoder, build_queries(cfg, classification), decoder)

    def forward(self, tokens: MultiLevelTokens, denoising=None, num_queries: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        memory = self.encoder(tokens)
        init = self.queries.initial(tokens, memory, num_queries)
        content, reference, attn_mask = init.content, init.reference, None
        if denoising is not None:
            content = torch.cat([denoising.queries.to(content.dtype), content], 1)
            reference = torch.cat([denoising.boxes.to(reference.dtype), reference], 1)
            attn_mask = denoising.attention_mask(content.shape[1])
        states, boxes = self.decoder(tokens, memory, self.queries, content, reference, attn_mask)
        return states, boxes, init.proposals
