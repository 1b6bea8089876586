"""The multi-level image tokens the transformer works on, built once per batch."""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .token_geometry import token_anchors, valid_ratios

__all__ = ["MultiLevelTokens"]


@dataclass
class MultiLevelTokens:
    """Flattened tokens of every feature level, with what attention and box geometry need.

    Attributes:
        src: ``[B, N, C]`` token features (all levels, flattened row-major, level after level).
        pos: ``[B, N, C]`` their positional (+ level) embeddings.
        level_masks: per level ``[B, h, w]`` padding masks (True = padding).
        mask: ``[B, N]`` flattened padding mask, or None when the batch has no padding (attention
            can then take PyTorch's fused path).
        spatial_shapes: ``[L, 2]`` int64 ``(h, w)`` of every level (as Python ints: ``spatial_shapes.level_sizes``).
        ratios: ``[B, L, 2]`` per level the ``(w, h)`` fraction of the padded map covered by the
            image (:func:`~.token_geometry.valid_ratios`).
    """

    src: torch.Tensor
    pos: torch.Tensor
    level_masks: List[torch.Tensor]
    mask: Optional[torch.Tensor]
    spatial_shapes: torch.Tensor
    ratios: torch.Tensor
    _anchors: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    @classmethod
    def from_levels(cls, srcs: List[torch.Tensor], poss: List[torch.Tensor],
                    level_masks: List[torch.Tensor]) -> "MultiLevelTokens":
        """From per-level ``[B, C, h, w]`` features and positions and ``[B, h, w]`` masks."""
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) for p in poss], 1)
        mask = torch.cat([m.flatten(1) for m in level_masks], 1)
        # Python ints in eager; symbolic sizes (not int()-specialised) when exported with a dynamic size
        level_sizes = tuple((m.shape[-2], m.shape[-1]) for m in level_masks)
        shapes = torch.tensor(level_sizes, dtype=torch.int64, device=src.device)
        shapes.level_sizes = level_sizes  # read by _level_sizes
        # No padding: drop the mask (attention's fused path). Exported graphs (torch.export) keep it:
        # whether an input has padding is data, not a property of the graph.
        exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)  # torch >= 2.5
        keep = (exporting is not None and exporting()) or bool(mask.any())
        return cls(src, pos, level_masks, mask if keep else None, shapes,
                   valid_ratios(level_masks).to(src.dtype))

    @property
    def anchors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every token's anchor box ``[B, N, 4]`` and whether it lies inside its image ``[B, N]``
        (:func:`~.token_geometry.token_anchors`), computed once, on first use."""
        if self._anchors is None:
            self._anchors = token_anchors(self.level_masks)
        return self._anchors

    def token_mask_without(self, levels: Sequence[int]) -> Optional[torch.Tensor]:
        """``[N]`` bool, False on the tokens of ``levels`` (level indices); None when ``levels`` is empty."""
        if not levels:
            return None
        return torch.cat([torch.full((h * w,), level not in levels, dtype=torch.bool, device=self.src.device)
                          for level, (h, w) in enumerate(self.spatial_shapes.level_sizes)])

    def with_src(self, src: torch.Tensor) -> "MultiLevelTokens":
        """The same tokens with new features (e.g. the encoder's output)."""
        return MultiLevelTokens(src, self.pos, self.level_masks, self.mask, self.spatial_shapes, self.ratios,
                                self._anchors)
