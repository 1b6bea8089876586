"""Windowed self-attention for chosen DINOv2 blocks (as in ViTDet and RF-DETR), without forking HF.

A windowed block sees the patch-token grid split into ``n x n`` non-overlapping windows. The
unchanged HF block runs on a re-arranged sequence: :func:`partition_windows` turns
``[B, P + h*w, C]`` (``P`` prefix tokens: CLS + registers, then the patch grid in row-major order)
into ``[B * n*n, P + (h/n)*(w/n), C]``, where every window gets its own copy of the prefix tokens;
:func:`merge_windows` puts the patch tokens back in row-major order and averages each prefix token
over the windows. Since the block itself is untouched, parameter names, checkpoints and LoRA
injection / merging are the same as without windows; with ``n = 1`` both steps are exact no-ops.

Attention cost of a windowed block drops from ``(h*w)^2`` to ``(h*w)^2 / n^2`` token pairs; the
linear layers (and the MLP) cost the same. HF's drop-path (stochastic depth) draws per sequence, so in
a windowed block it drops each window's residual branch independently, not the whole image's.
"""
from typing import Iterable, Optional, Sequence, Set

import torch

__all__ = [
    "check_grid_divisible", "merge_windows", "partition_windows", "resolve_window_blocks", "validate_num_windows",
]


def validate_num_windows(num_windows) -> int:
    """``MODEL.DINOV2.NUM_WINDOWS`` as an int >= 1, or a ValueError naming the key."""
    if isinstance(num_windows, bool) or not isinstance(num_windows, int) or num_windows < 1:
        raise ValueError(f"MODEL.DINOV2.NUM_WINDOWS must be an integer >= 1 (windows per side of the patch grid), "
                         f"got {num_windows!r}.")
    return num_windows


def resolve_window_blocks(indexes: Optional[Iterable[int]], depth: int) -> Set[int]:
    """Non-negative block indices of ``MODEL.DINOV2.WINDOW_BLOCK_INDEXES`` for a ``depth``-block ViT.

    Negative indices count from the end (as ``OUT_INDICES``); duplicates are merged. Anything that
    is not an integer in ``-depth..depth-1`` raises a ValueError naming the key.
    """
    resolved = set()
    for i in indexes or ():
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(f"MODEL.DINOV2.WINDOW_BLOCK_INDEXES contains {i!r}, but the model has {depth} blocks "
                             f"(valid: integers {-depth}..{depth - 1}; [] = no windowed attention).")
        resolved.add(i % depth)
    return resolved


def check_grid_divisible(height: int, width: int, patch_size: int, num_windows: int) -> None:
    """ValueError unless a ``height x width`` input gives a patch grid that ``num_windows`` divides."""
    h, w = height // patch_size, width // patch_size
    if h % num_windows or w % num_windows:
        multiple = patch_size * num_windows
        raise ValueError(
            f"DINOv2 input of size {height}x{width} gives a {h}x{w} patch grid, which MODEL.DINOV2.NUM_WINDOWS="
            f"{num_windows} windows per side do not divide: with windowed attention (MODEL.DINOV2."
            f"WINDOW_BLOCK_INDEXES) height and width must be multiples of {multiple} (patch size {patch_size} x "
            f"{num_windows} windows). Pad the input to a multiple of backbone.size_divisibility ({multiple}; "
            "Detectron2's ImageList does so), resize it, or change NUM_WINDOWS."
        )


def partition_windows(hidden: torch.Tensor, prefix: int, grid: Sequence[int], num_windows: int) -> torch.Tensor:
    """``[B, prefix + h*w, C]`` -> ``[B * n*n, prefix + (h/n)*(w/n), C]`` (windows in row-major order
    per image, each with a copy of the ``prefix`` tokens)."""
    batch, _, channels = hidden.shape
    h, w = grid
    n = num_windows
    patches = hidden[:, prefix:].reshape(batch, n, h // n, n, w // n, channels)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(batch * n * n, (h // n) * (w // n), channels)
    prefix_tokens = hidden[:, :prefix].unsqueeze(1).expand(batch, n * n, prefix, channels)
    return torch.cat([prefix_tokens.reshape(batch * n * n, prefix, channels), patches], dim=1)


def merge_windows(windows: torch.Tensor, prefix: int, grid: Sequence[int], num_windows: int) -> torch.Tensor:
    """Inverse of :func:`partition_windows`: patch tokens back in row-major order, each prefix token
    averaged over the image's windows. ``[B * n*n, prefix + (h/n)*(w/n), C]`` -> ``[B, prefix + h*w, C]``."""
    h, w = grid
    n = num_windows
    channels = windows.shape[-1]
    batch = windows.shape[0] // (n * n)
    prefix_tokens = windows[:, :prefix].reshape(batch, n * n, prefix, channels).mean(dim=1)
    patches = windows[:, prefix:].reshape(batch, n, n, h // n, w // n, channels)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(batch, h * w, channels)
    return torch.cat([prefix_tokens, patches], dim=1)
