"""Standard DETR encoder / decoder layers (multi-head attention over all tokens).

``dropout`` applies to the residual branches, ``attention_dropout`` to the attention weights and
``activation_dropout`` inside the FFN (the original DETR used 0.1 for all three; HF transformers'
DETR and Deformable DETR default to 0.1 / 0 / 0). Dropout on attention weights forces PyTorch's
unfused attention path, which on CPU makes a training step of a 6-layer encoder over ~1000 tokens
several times slower, and the FFN's hidden activations are the largest tensors of a layer, so both
are separate keys (``MODEL.DETR.ATTENTION_DROPOUT`` / ``ACTIVATION_DROPOUT``, default 0).
"""
import copy
from typing import Optional

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

    def attention(self, x, pos, key_padding_mask, reference_points, spatial_shapes):
        """Standard self-attention over every token (references are not used)."""
        q = k = _with_pos(x, pos)
        return self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0]

    def forward(self, src, pos=None, key_padding_mask=None, *, reference_points=None, spatial_shapes=None):
        x = self.norm1(src) if self.normalize_before else src
        src = src + self.dropout1(self.attention(x, pos, key_padding_mask, reference_points, spatial_shapes))
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

    def cross_attention(self, x, memory, query_pos, pos, memory_key_padding_mask, reference_points,
                        spatial_shapes):
        """Standard cross-attention to every image token (references are not used)."""
        return self.cross_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                               key_padding_mask=memory_key_padding_mask, need_weights=False)[0]

    def forward(self, tgt, memory, query_pos=None, pos=None, memory_key_padding_mask=None,
                self_attn_mask=None, reference_points=None, spatial_shapes=None):
        """``self_attn_mask``: ``[Q, Q]`` bool, True where query i may not attend to query j
        (denoising groups); ``reference_points``: per-level references for deformable layers."""
        def self_attn(x):
            q = k = _with_pos(x, query_pos)
            return self.self_attn(q, k, x, attn_mask=self_attn_mask, need_weights=False)[0]

        def cross_attn(x):
            return self.cross_attention(x, memory, query_pos, pos, memory_key_padding_mask,
                                        reference_points, spatial_shapes)

        tgt = self._block(0, tgt, self_attn)
        tgt = self._block(1, tgt, cross_attn)
        return self._block(2, tgt, self.ffn)
