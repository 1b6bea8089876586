"""Standard DETR encoder / decoder layers (multi-head attention over all tokens).

``dropout`` applies to the residual branches, ``attention_dropout`` to the attention weights and
``activation_dropout`` inside the FFN (the original DETR used 0.1 for all three; HF transformers'
DETR and Deformable DETR default to 0.1 / 0 / 0). Dropout on attention weights forces PyTorch's
unfused attention path, which on CPU makes a training step of a 6-layer encoder over ~1000 tokens
several times slower, and the FFN's hidden activations are the largest tensors of a layer, so both
are separate keys (``MODEL.DETR.ATTENTION_DROPOUT`` / ``ACTIVATION_DROPOUT``, default 0).
"""
import copy
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> Linear (the transformer FFN)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class TransformerEncoderLayer(nn.Module):
    """Self-attention over image tokens; positions are added to queries and keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0, self_attn: Optional[nn.Module] = None):
        super().__init__()
        if self_attn is None:
            self_attn = nn.MultiheadAttention(d_model, nhead, dropout=attention_dropout, batch_first=True)
        self.self_attn = self_attn
        self.ffn = FeedForward(d_model, dim_feedforward, activation_dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def attention(self, x, pos, key_padding_mask, reference_points, spatial_shapes, memory=None, memory_pos=None):
        """Standard attention from ``x`` to every token of ``memory`` (default: ``x`` itself, self-attention;
        references are not used)."""
        q = _with_pos(x, pos)
        k = q if memory is None else _with_pos(memory, memory_pos)
        return self.self_attn(q, k, x if memory is None else memory, key_padding_mask=key_padding_mask,
                              need_weights=False)[0]

    def forward(self, src, pos=None, key_padding_mask=None, *, reference_points=None, spatial_shapes=None,
                memory=None, memory_pos=None):
        """Update the tokens ``src`` ``[B, Q, C]``. By default they attend to each other; with ``memory``
        ``[B, N, C]`` (and its positions ``memory_pos``) they are a subset of the tokens that attends to
        all of them (the sparse encoder, :mod:`.sparse_encoder`), and ``key_padding_mask`` ``[B, N]`` is
        ``memory``'s."""
        x = self.norm1(src) if self.normalize_before else src
        if memory is not None and self.normalize_before:
            memory = self.norm1(memory)  # keys / values are normalised like the queries
        src = src + self.dropout1(self.attention(x, pos, key_padding_mask, reference_points, spatial_shapes,
                                                 memory, memory_pos))
        if not self.normalize_before:
            src = self.norm1(src)
        x = self.norm2(src) if self.normalize_before else src
        src = src + self.dropout2(self.ffn(x))
        return src if self.normalize_before else self.norm2(src)


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to image tokens, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=attention_dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=attention_dropout, batch_first=True)
        self.ffn = FeedForward(d_model, dim_feedforward, activation_dropout)
        self.norms = clones(nn.LayerNorm(d_model), 3)
        self.dropouts = clones(nn.Dropout(dropout), 3)
        self.normalize_before = normalize_before

    def _block(self, i: int, x: torch.Tensor, fn) -> torch.Tensor:
        """Residual sub-block i with pre- or post-norm."""
        if self.normalize_before:
            return x + self.dropouts[i](fn(self.norms[i](x)))
        return self.norms[i](x + self.dropouts[i](fn(x)))

    def project_memory(self, memory: torch.Tensor, pos: Optional[torch.Tensor],
                       memory_key_padding_mask: Optional[torch.Tensor]) -> "ProjectedKeysValues":
        """The memory side of the cross-attention: keys ``(memory + pos) W_k`` and values
        ``memory W_v`` per head, computed once per layer and shared by every query
        (:mod:`.decoder_memory`). Uses ``cross_attn``'s own weights (state-dict keys unchanged)."""
        attn = self.cross_attn
        _, w_k, w_v = attn.in_proj_weight.chunk(3)
        _, b_k, b_v = attn.in_proj_bias.chunk(3)
        keys = _split_heads(F.linear(_with_pos(memory, pos), w_k, b_k), attn.num_heads)
        values = _split_heads(F.linear(memory, w_v, b_v), attn.num_heads)
        allowed = None if memory_key_padding_mask is None else ~memory_key_padding_mask[:, None, None, :]
        return ProjectedKeysValues(keys, values, allowed)

    def cross_attention(self, x, projected_memory, query_pos, reference_points, spatial_shapes):
        """Standard cross-attention to every image token (references are not used)."""
        attn = self.cross_attn
        w_q, _, _ = attn.in_proj_weight.chunk(3)
        b_q, _, _ = attn.in_proj_bias.chunk(3)
        queries = _split_heads(F.linear(_with_pos(x, query_pos), w_q, b_q), attn.num_heads)
        out = F.scaled_dot_product_attention(queries, projected_memory.keys, projected_memory.values,
                                             attn_mask=projected_memory.allowed,
                                             dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, tgt, memory=None, query_pos=None, pos=None, memory_key_padding_mask=None,
                self_attn_mask=None, reference_points=None, spatial_shapes=None, query_padding_mask=None,
                projected_memory=None, self_attn_keys=None):
        """``self_attn_mask``: ``[Q, Q]`` bool, True where query i may not attend to query j
        (denoising groups); ``query_padding_mask``: ``[B, Q]`` bool, True on padding queries (an
        adaptive query count), which no query attends to; ``reference_points``: per-level
        references for deformable layers; ``projected_memory``: this layer's
        :meth:`project_memory` output, computed here when not given; ``self_attn_keys``: the
        queries' self-attention attends to these ``(content, pos, padding)`` ``[B, K, *]`` instead
        of to the queries themselves (progressive decoding: queries that left stay keys)."""
        if projected_memory is None:
            projected_memory = self.project_memory(memory, pos, memory_key_padding_mask)

        def self_attn(x):
            q = k = _with_pos(x, query_pos)
            v, padding = x, query_padding_mask
            if self_attn_keys is not None:
                v, key_pos, padding = self_attn_keys
                v = self.norms[0](v) if self.normalize_before else v  # x arrives normed in pre-norm
                k = _with_pos(v, key_pos)
            return self.self_attn(q, k, v, attn_mask=self_attn_mask, key_padding_mask=padding,
                                  need_weights=False)[0]

        def cross_attn(x):
            return self.cross_attention(x, projected_memory, query_pos, reference_points, spatial_shapes)

        tgt = self._block(0, tgt, self_attn)
        tgt = self._block(1, tgt, cross_attn)
        return self._block(2, tgt, self.ffn)


class ProjectedKeysValues(NamedTuple):
    """Keys and values ``[B, H, S, Dh]`` of a standard cross-attention and the ``[B, 1, 1, S]``
    mask of the tokens that may be attended to (None: all)."""

    keys: torch.Tensor
    values: torch.Tensor
    allowed: Optional[torch.Tensor]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, C]`` -> ``[B, H, N, C / H]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)
