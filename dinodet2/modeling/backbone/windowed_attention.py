"""Windowed self-attention for chosen DINOv2 blocks (as in ViTDet and RF-DETR), without forking HF.

A windowed block sees the patch-token grid split into ``n x n`` non-overlapping windows. The
unchanged HF block runs on a re-arranged sequence ``[B * n*n, P + (h/n)*(w/n), C]`` (``P`` prefix
tokens: CLS + registers, each window with its own copy, then the window's patch tokens in row-major
order); after it, each prefix token is averaged over the image's windows. :func:`partition_windows`
and :func:`merge_windows` are these two steps for a sequence whose patch grid is in row-major order.

The backbone itself avoids moving every token twice per windowed block: it puts the patch tokens in
*window order* once (:func:`to_window_order`: window by window, each window row-major), where a
window batch is a view (:func:`split_windows` / :func:`join_windows` only copy the prefix tokens
in), keeps that order through global blocks (attention does not depend on token order), averages
only the prefix tokens between consecutive windowed blocks (:func:`average_window_prefix`), and
restores the grid for the feature maps it returns (:func:`window_order_to_maps`). The result is the
one of partitioning and merging around every windowed block. Since the blocks are untouched,
parameter names, checkpoints and LoRA injection / merging are the same as without windows; with
``n = 1`` every step is an exact copy.

Attention cost of a windowed block drops from ``(h*w)^2`` to ``(h*w)^2 / n^2`` token pairs; the
linear layers (and the MLP) cost the same. HF's drop-path (stochastic depth) draws per sequence, so in
a windowed block it drops each window's residual branch independently, not the whole image's.
"""
from typing import Iterable, Optional, Sequence, Set

import torch

__all__ = [
    "average_window_prefix", "check_grid_divisible", "join_windows", "merge_windows", "partition_windows",
    "resolve_window_blocks", "split_windows", "to_window_order", "validate_num_windows", "window_order_to_maps",
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


def to_window_order(hidden: torch.Tensor, prefix: int, grid: Sequence[int], num_windows: int) -> torch.Tensor:
    """``[B, prefix + h*w, C]`` with the patch grid in row-major order -> the same tokens with the
    patches in window order (window by window in row-major order of the windows, each window's
    patches row-major)."""
    batch, _, channels = hidden.shape
    h, w = grid
    n = num_windows
    patches = hidden[:, prefix:].reshape(batch, n, h // n, n, w // n, channels).permute(0, 1, 3, 2, 4, 5)
    return torch.cat([hidden[:, :prefix], patches.reshape(batch, h * w, channels)], dim=1)


def split_windows(hidden: torch.Tensor, prefix: int, num_windows: int) -> torch.Tensor:
    """``[B, prefix + h*w, C]`` in window order -> ``[B * n*n, prefix + h*w / n^2, C]``, every window
    with a copy of the ``prefix`` tokens (the patches are a view; only the result is a new tensor)."""
    batch, tokens, channels = hidden.shape
    windows = num_windows * num_windows
    patches = hidden[:, prefix:].reshape(batch * windows, (tokens - prefix) // windows, channels)
    prefix_tokens = hidden[:, :prefix].unsqueeze(1).expand(batch, windows, prefix, channels)
    return torch.cat([prefix_tokens.reshape(batch * windows, prefix, channels), patches], dim=1)


def join_windows(windows: torch.Tensor, prefix: int, num_windows: int) -> torch.Tensor:
    """Inverse of :func:`split_windows`: ``[B * n*n, prefix + t, C]`` -> ``[B, prefix + n*n*t, C]`` in
    window order, each prefix token averaged over the image's windows."""
    count, tokens, channels = windows.shape
    per_image = num_windows * num_windows
    batch = count // per_image
    prefix_tokens = windows[:, :prefix].reshape(batch, per_image, prefix, channels).mean(dim=1)
    patches = windows[:, prefix:].reshape(batch, per_image * (tokens - prefix), channels)
    return torch.cat([prefix_tokens, patches], dim=1)


def average_window_prefix(windows: torch.Tensor, prefix: int, num_windows: int) -> torch.Tensor:
    """``split_windows(join_windows(windows))`` without re-arranging the patches: every window's prefix
    tokens replaced by their average over the image's windows."""
    count, _, channels = windows.shape
    per_image = num_windows * num_windows
    prefix_tokens = windows[:, :prefix].reshape(count // per_image, per_image, prefix, channels)
    prefix_tokens = prefix_tokens.mean(dim=1, keepdim=True).expand(-1, per_image, -1, -1)
    return torch.cat([prefix_tokens.reshape(count, prefix, channels), windows[:, prefix:]], dim=1)


def window_order_to_maps(patches: torch.Tensor, batch: int, grid: Sequence[int], num_windows: int) -> torch.Tensor:
    """Patch tokens in window order (``[B, h*w, C]``, or the ``[B * n*n, h*w / n^2, C]`` window batch)
    -> contiguous ``[B, C, h, w]`` feature maps."""
    h, w = grid
    n = num_windows
    channels = patches.shape[-1]
    maps = patches.reshape(batch, n, n, h // n, w // n, channels).permute(0, 5, 1, 3, 2, 4)
    return maps.reshape(batch, channels, h, w).contiguous()
