"""Pure-PyTorch multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

No custom CUDA kernel: the sampling is done with one :func:`torch.nn.functional.grid_sample`
call per feature level, batched over ``batch * heads``. The sampling always runs in float32,
even for half-precision inputs (``grid_sample`` in fp16/bf16 loses too much precision in the
bilinear weights and is not implemented for every dtype/device), and the result is cast back
to the input dtype.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MultiScaleDeformableAttention", "ms_deform_attn_sampling"]


def _level_sizes(spatial_shapes: torch.Tensor) -> Tuple[Tuple[int, int], ...]:
    """``[L, 2]`` tensor of ``(h, w)`` -> tuple of Python ``(h, w)`` pairs. Tensors made by
    :meth:`~.multilevel_tokens.MultiLevelTokens.from_levels` carry them as ``level_sizes``: no
    device sync, and no data-dependent ``tolist()`` (a graph break) under ``torch.compile``."""
    sizes = getattr(spatial_shapes, "level_sizes", None)
    return sizes if sizes is not None else tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())


def ms_deform_attn_sampling(value: torch.Tensor, spatial_shapes: torch.Tensor,
                            sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample multi-level value maps and take the attention-weighted sum.

    Args:
        value: ``[B, S, H, Dh]``; ``S = sum_l h_l * w_l``, levels flattened one after the
            other, each row-major.
        spatial_shapes: ``[L, 2]`` integer tensor of per-level ``(h, w)``.
        sampling_locations: ``[B, Q, H, L, P, 2]`` normalised ``(x, y)``; 0 is the left/top
            edge and 1 the right/bottom edge of the level's map. Points outside ``[0, 1]``
            read zeros (``padding_mode="zeros"``).
        attention_weights: ``[B, Q, H, L, P]``, normally a softmax over ``L * P``.

    Returns:
        ``[B, Q, H * Dh]`` in ``value``'s dtype.
    """
    out_dtype = value.dtype
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = _level_sizes(spatial_shapes)
    if len(sizes) != num_levels:
        raise ValueError(f"spatial_shapes has {len(sizes)} levels, sampling_locations {num_levels}")
    if sum(h * w for h, w in sizes) != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} tokens, spatial_shapes sum to "
                         f"{sum(h * w for h, w in sizes)}")

    # Half inputs are computed in float32; float32/float64 keep their own precision.
    compute_dtype = torch.promote_types(out_dtype, torch.float32)
    with torch.autocast(device_type=value.device.type, enabled=False):
        value = value.to(compute_dtype)
        # grid_sample wants [-1, 1]; with align_corners=False -1/1 are the outer pixel edges.
        grids = 2.0 * sampling_locations.to(compute_dtype) - 1.0
        sampled = []
        for lvl, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in sizes], 1), sizes)):
            # [B, h*w, H, Dh] -> [B*H, Dh, h, w]
            value_l = value_l.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
            # [B, Q, H, P, 2] -> [B*H, Q, P, 2]
            grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(batch * heads, num_queries, num_points, 2)
            sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                         align_corners=False))  # [B*H, Dh, Q, P]
        stacked = torch.stack(sampled, dim=3).flatten(3)  # [B*H, Dh, Q, L*P]
        weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(
            batch * heads, 1, num_queries, num_levels * num_points)
        out = (stacked * weights).sum(-1)  # [B*H, Dh, Q]
        out = out.view(batch, heads * head_dim, num_queries).transpose(1, 2)
    return out.to(out_dtype).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR's ``MSDeformAttn``).

    Every query predicts, per head, ``num_levels * num_points`` sampling offsets around its
    reference point and softmax-normalised attention weights over those samples. The module
    returns only the attention output (after ``output_proj`` and dropout); residual and norm
    belong to the enclosing encoder/decoder layer.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self._reset_parameters()

    def lr_roles(self) -> Dict[str, str]:
        """The sampling-offset head trains at ``SOLVER.DEFORMABLE_LR_MULTIPLIER`` (x0.1 in Deformable
        DETR); see :mod:`dinodet2.modeling.param_roles`."""
        return {f"sampling_offsets.{n}": "deformable" for n, _ in self.sampling_offsets.named_parameters()}

    def _reset_parameters(self) -> None:
        """Deformable DETR init: offsets start on a per-head direction grid, uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(self._initial_offset_bias())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _initial_offset_bias(self) -> torch.Tensor:
        """Head ``m`` points along angle ``2*pi*m/H`` (max-norm 1), point ``p`` scaled by ``p+1``."""
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        return grid.flatten()

    def attention_probs(self, query: torch.Tensor) -> torch.Tensor:
        """``[B, Q, C]`` -> ``[B, Q, H, L, P]`` attention weights, softmax over ``L * P``."""
        batch, num_queries, _ = query.shape
        logits = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points)
        return logits.softmax(-1).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points)

    def sampling_locations(self, query: torch.Tensor, reference_points: torch.Tensor,
                           spatial_shapes: torch.Tensor) -> torch.Tensor:
        """Normalised sampling locations ``[B, Q, H, L, P, 2]``.

        ``reference_points`` ``[B, Q, L, 2]`` (xy): offsets are in pixels of each level.
        ``[B, Q, L, 4]`` (cxcywh): offsets are scaled by ``wh / 2 / num_points``.
        """
        batch, num_queries, _ = query.shape
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            # (w, h) per level, so offsets are measured in that level's pixels.
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
            return ref + offsets / normalizer
        if reference_points.shape[-1] == 4:
            return ref[..., :2] + offsets / self.num_points * ref[..., 2:] * 0.5
        raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")

    def project_value(self, value: torch.Tensor, value_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The memory side of the attention: ``value_proj`` of ``[B, S, C]`` values, padding zeroed,
        split into heads ``[B, S, H, Dh]``. It depends on the memory only, so a decoder computes it
        once per layer and reuses it for every query (:mod:`.decoder_memory`)."""
        batch, num_tokens, _ = value.shape
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        return value.view(batch, num_tokens, self.num_heads, self.head_dim)

    def attend(self, query: torch.Tensor, reference_points: torch.Tensor, projected_value: torch.Tensor,
               spatial_shapes: torch.Tensor) -> torch.Tensor:
        """The query side: attend from ``query`` ``[B, Q, C]`` into :meth:`project_value`'s output."""
        if spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {spatial_shapes.shape[0]}")
        locations = self.sampling_locations(query, reference_points, spatial_shapes)
        probs = self.attention_probs(query)
        out = ms_deform_attn_sampling(projected_value, spatial_shapes, locations, probs)
        return self.dropout(self.output_proj(out))

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: torch.Tensor,
                value_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend from ``query`` ``[B, Q, C]`` to the flattened multi-level ``value`` ``[B, S, C]``.

        Args:
            reference_points: ``[B, Q, L, 2]`` normalised xy or ``[B, Q, L, 4]`` normalised cxcywh.
            spatial_shapes: ``[L, 2]`` integer ``(h, w)`` of each level, in ``value`` order.
            value_padding_mask: ``[B, S]`` bool, ``True`` on padding (those values are zeroed).

        Returns:
            ``[B, Q, C]``.
        """
        return self.attend(query, reference_points, self.project_value(value, value_padding_mask), spatial_shapes)
