"""Deformable DETR encoder and decoder layers (multi-scale deformable attention).

The encoder layer replaces self-attention over all tokens by deformable attention from every
token (reference point = its own centre, on every level) into the multi-level feature maps;
the decoder layer keeps query self-attention and replaces cross-attention by deformable
attention around each query's reference point or box. Both have the same call signature as
their standard counterparts in :mod:`.layers` so the transformer can mix them.
Deformable attention has no dropout on its attention weights (as in Deformable DETR), so
``attention_dropout`` only reaches the decoder's standard query self-attention.
"""
from .deformable_attention import MultiScaleDeformableAttention
from .layers import TransformerDecoderLayer, TransformerEncoderLayer, _with_pos

__all__ = ["DeformableTransformerEncoderLayer", "DeformableTransformerDecoderLayer"]


class DeformableTransformerEncoderLayer(TransformerEncoderLayer):
    """Deformable self-attention over the multi-level tokens, then an FFN (post- or pre-norm)."""

    def __init__(self, d_model: int, nhead: int, num_levels: int, num_points: int = 4,
                 dim_feedforward: int = 1024, dropout: float = 0.1, normalize_before: bool = False,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0):
        super().__init__(d_model, nhead, dim_feedforward, dropout, normalize_before, attention_dropout,
                         activation_dropout, self_attn=MultiScaleDeformableAttention(d_model, nhead, num_levels,
                                                                                     num_points))

    def attention(self, x, pos, key_padding_mask, reference_points, spatial_shapes, memory=None, memory_pos=None):
        """``reference_points``: ``[B, Q, L, 2]`` the centres of the tokens ``x`` in every level's
        coordinates; the value map is ``memory`` (all tokens, default ``x``)."""
        if reference_points is None:
            raise ValueError("deformable self-attention needs reference points")
        return self.self_attn(_with_pos(x, pos), reference_points, x if memory is None else memory, spatial_shapes,
                              key_padding_mask)


class DeformableTransformerDecoderLayer(TransformerDecoderLayer):
    """Query self-attention, deformable cross-attention around the reference, FFN."""

    def __init__(self, d_model: int, nhead: int, num_levels: int, num_points: int = 4,
                 dim_feedforward: int = 1024, dropout: float = 0.1, normalize_before: bool = False,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0):
        super().__init__(d_model, nhead, dim_feedforward, dropout, normalize_before, attention_dropout,
                         activation_dropout)
        self.cross_attn = MultiScaleDeformableAttention(d_model, nhead, num_levels, num_points)

    def project_memory(self, memory, pos, memory_key_padding_mask):
        """The deformable value projection (positions are not used on the value side)."""
        return self.cross_attn.project_value(memory, memory_key_padding_mask)

    def cross_attention(self, x, projected_memory, query_pos, reference_points, spatial_shapes):
        if reference_points is None:
            raise ValueError("deformable cross-attention needs reference points")
        return self.cross_attn.attend(_with_pos(x, query_pos), reference_points, projected_memory, spatial_shapes)
