"""Geometry of the multi-level image tokens: token anchors and valid ratios.

Two-stage query selection (Deformable DETR, DINO) lets every image token propose a box relative
to its own anchor (the token's centre, a size that doubles per pyramid level); the top-scoring
proposals become the decoder's reference boxes. Deformable attention needs, per level, the
fraction of the (padded) feature map an image really covers (``valid_ratios``) to turn
coordinates normalised by the image into coordinates normalised by the map.

All boxes are ``(cx, cy, w, h)`` normalised by each image's own unpadded extent, like the
targets.
"""
from typing import List, Tuple

import torch

__all__ = ["token_anchors", "valid_ratios", "to_level_coordinates"]


def token_anchors(level_masks: List[torch.Tensor], base_size: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor box of every token and whether the token lies inside its image.

    ``level_masks``: per level ``[B, h, w]`` padding masks (True = padding). Centres are
    normalised by each image's own valid extent on that level, like the targets; sizes are
    ``base_size * 2**level``. Returns anchors ``[B, N, 4]`` (cxcywh) and ``valid`` ``[B, N]``.
    """
    anchors, valid = [], []
    for lvl, mask in enumerate(level_masks):
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).float()  # [B]
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).float()
        ys = torch.arange(h, dtype=torch.float32, device=mask.device) + 0.5
        xs = torch.arange(w, dtype=torch.float32, device=mask.device) + 0.5
        cy = (ys[None, :, None] / valid_h[:, None, None]).expand(-1, h, w)
        cx = (xs[None, None, :] / valid_w[:, None, None]).expand(-1, h, w)
        size = torch.full_like(cx, base_size * 2.0 ** lvl)
        anchors.append(torch.stack([cx, cy, size, size], dim=-1).flatten(1, 2))
        valid.append((~mask).flatten(1))
    return torch.cat(anchors, 1), torch.cat(valid, 1)


def valid_ratios(level_masks: List[torch.Tensor]) -> torch.Tensor:
    """``[B, L, 2]``: per level the ``(w, h)`` fraction of the padded map covered by the image."""
    ratios = []
    for mask in level_masks:
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def to_level_coordinates(reference: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Image-normalised points ``[B, Q, 2]`` or boxes ``[B, Q, 4]`` -> per level ``[B, Q, L, D]``.

    Multiplying by the valid ratio maps "fraction of the image" to "fraction of the padded
    feature map", the coordinates the deformable attention samples in.
    """
    if reference.shape[-1] == 4:
        ratios = torch.cat([ratios, ratios], -1)
    return reference[:, :, None, :] * ratios[:, None, :, :].to(reference.dtype)
