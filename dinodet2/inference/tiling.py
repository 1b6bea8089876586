"""The tile grid of sliced inference, and which of a tile's boxes are cut copies of an object that a
neighbouring tile sees more of."""
from dataclasses import dataclass
from typing import List, Tuple

import torch

__all__ = ["TileGrid", "overlap_pixels", "tile_starts"]


def overlap_pixels(overlap: float, tile_size: int) -> int:
    """``overlap`` < 1: a fraction of ``tile_size``; >= 1: pixels (rounded down)."""
    return int(overlap * tile_size) if overlap < 1 else int(overlap)


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Starts of the tiles along one axis of ``length`` pixels: every ``tile - overlap`` pixels, the
    last one aligned to the border (``length - tile``), so the tiles cover ``[0, length)`` exactly and
    none leaves the image. An axis no longer than a tile has one tile, ``[0, length)``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    count = -(-(length - tile) // step) + 1  # ceil((length - tile) / step) + 1
    return [min(i * step, length - tile) for i in range(count)]


@dataclass(frozen=True)
class TileGrid:
    """Rows x columns of tiles over an ``height`` x ``width`` image; tile ``k`` is row
    ``k // len(xs)``, column ``k % len(xs)``; each is ``tile_h`` x ``tile_w`` (at most the image)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: Tuple[int, ...]
    xs: Tuple[int, ...]

    @classmethod
    def over(cls, height: int, width: int, tile_size: int, overlap: int) -> "TileGrid":
        tile_h, tile_w = min(tile_size, height), min(tile_size, width)
        return cls(height, width, tile_h, tile_w, tuple(tile_starts(height, tile_size, overlap)),
                   tuple(tile_starts(width, tile_size, overlap)))

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def tiles(self) -> List[Tuple[int, int, int, int]]:
        """``(x0, y0, x1, y1)`` of every tile, row-major (end exclusive)."""
        return [(x, y, x + self.tile_w, y + self.tile_h) for y in self.ys for x in self.xs]

    def cut_by_inner_edge(self, boxes: torch.Tensor, tile_index: int, margin: float) -> torch.Tensor:
        """Which ``boxes`` (``[N, 4]`` XYXY in image coordinates) of tile ``tile_index`` are cut
        copies that a neighbouring tile sees more of: the box reaches (within ``margin`` px) an
        edge of the tile that is not an image border, and lies inside the neighbour across that
        edge, not reaching that neighbour's near edge. That neighbour sees every pixel of the object
        this tile sees plus those beyond the edge, so dropping the copy loses nothing: with an
        overlap at least as large as an object, some tile holds it whole. A box cut in every tile
        that sees it (an object larger than the overlap) is kept in each (the merge, or the full-image
        pass, has to deal with it)."""
        row, col = divmod(tile_index, len(self.xs))
        x0, y0 = self.xs[col], self.ys[row]
        x1, y1 = x0 + self.tile_w, y0 + self.tile_h
        bx0, by0, bx1, by1 = boxes.unbind(-1)
        cut = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
        if col + 1 < len(self.xs):  # right edge; the neighbour starts at xs[col + 1]
            cut |= (bx1 >= x1 - margin) & (bx0 > self.xs[col + 1] + margin)
        if col > 0:  # left edge; the neighbour ends at xs[col - 1] + tile_w
            cut |= (bx0 <= x0 + margin) & (bx1 < self.xs[col - 1] + self.tile_w - margin)
        if row + 1 < len(self.ys):
            cut |= (by1 >= y1 - margin) & (by0 > self.ys[row + 1] + margin)
        if row > 0:
            cut |= (by0 <= y0 + margin) & (by1 < self.ys[row - 1] + self.tile_h - margin)
        return cut
