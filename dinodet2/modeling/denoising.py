"""Denoising training queries (DN-DETR, Li et al. 2022; contrastive denoising from DINO, Zhang et al. 2023).

During training, noised copies of the ground-truth boxes are fed to the decoder as extra
queries that must reconstruct their original box and class. Their assignment to targets is
known, so they give the decoder a stable, matching-free training signal that speeds up
convergence. With contrastive denoising every group holds, for each object, a *positive*
query (small noise: reconstruct the object) and a *negative* one (larger noise: predict
"no object"), which teaches the model to reject near-duplicates.

Layout of the ``P = num_groups * group_size`` denoising queries, placed *before* the matching
queries: group ``g`` occupies ``[g * group_size, (g + 1) * group_size)``; inside a group the
first ``max_objects`` queries are positives (object ``j`` at offset ``j``), the next
``max_objects`` (contrastive only) negatives. Images with fewer objects leave padding queries
(zero content) that are trained as "no object".

The self-attention mask keeps information from flowing where it would leak the answer: the
matching queries may not see any denoising query, and a denoising group may not see another
group (it may see the matching queries).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torchvision.ops import box_convert

from .classification import mark_class_dependent

__all__ = ["DenoisingQueries", "DenoisingGenerator", "denoising_attention_mask"]


def denoising_attention_mask(num_groups: int, group_size: int, num_matching: int,
                             device: Optional[torch.device] = None) -> torch.Tensor:
    """``[T, T]`` bool self-attention mask, ``T = num_groups * group_size + num_matching``.

    ``True`` at ``(i, j)`` means query ``i`` may not attend to query ``j`` (PyTorch's
    ``nn.MultiheadAttention`` ``attn_mask`` convention).
    """
    num_dn = num_groups * group_size
    total = num_dn + num_matching
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True  # matching queries never see denoising queries
    group = torch.arange(num_dn, device=device) // group_size
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]  # groups are blind to each other
    return mask


@dataclass
class DenoisingQueries:
    """One batch of denoising queries (see the module docstring for the layout)."""

    queries: torch.Tensor  # [B, P, C] content (label embeddings; zeros for padding)
    boxes: torch.Tensor  # [B, P, 4] noised normalised cxcywh reference boxes
    num_groups: int
    max_objects: int
    contrastive: bool
    num_objects: List[int]  # objects per image

    @property
    def group_size(self) -> int:
        return self.max_objects * (2 if self.contrastive else 1)

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.group_size

    def attention_mask(self, total_queries: int) -> torch.Tensor:
        return denoising_attention_mask(self.num_groups, self.group_size, total_queries - self.num_queries,
                                        self.queries.device)

    def match_indices(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image ``(query_idx, target_idx)``: every positive query and its object."""
        indices = []
        for n in self.num_objects:
            objects = torch.arange(n, dtype=torch.int64)
            offsets = torch.arange(self.num_groups, dtype=torch.int64)[:, None] * self.group_size
            indices.append(((offsets + objects).flatten(), objects.repeat(self.num_groups)))
        return indices


class DenoisingGenerator(nn.Module):
    """Builds :class:`DenoisingQueries` from the training targets.

    Args:
        num_classes: number of object classes (the label embedding table size).
        d_model: query width.
        num_queries: budget of denoising queries per image; the number of groups is
            ``max(1, num_queries // group_size)`` with ``group_size`` = (2 x, if contrastive) the
            largest number of objects in an image of the batch.
        label_noise_ratio: a query's label is replaced by a random class with probability
            ``label_noise_ratio / 2`` (as in DINO).
        box_noise_scale: box corners move by up to ``box_noise_scale * (w/2, h/2)`` for
            positives; negatives move by between 1x and 2x that.
        contrastive: add negative queries (DINO's contrastive denoising).
    """

    def __init__(self, num_classes: int, d_model: int, num_queries: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0, contrastive: bool = True):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"MODEL.DETR.DN.NUM_QUERIES must be >= 1, got {num_queries}.")
        if not 0.0 <= label_noise_ratio <= 1.0:
            raise ValueError(f"MODEL.DETR.DN.LABEL_NOISE_RATIO must be in [0, 1], got {label_noise_ratio}.")
        if box_noise_scale < 0:
            raise ValueError(f"MODEL.DETR.DN.BOX_NOISE_SCALE must be >= 0, got {box_noise_scale}.")
        self.num_classes = num_classes
        self.num_dn_queries = num_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.contrastive = contrastive
        self.label_embed = mark_class_dependent(nn.Embedding(num_classes, d_model))

    @classmethod
    def from_config(cls, cfg) -> Optional["DenoisingGenerator"]:
        """The generator ``MODEL.DETR.DN`` describes, or None when denoising is off."""
        c = cfg.MODEL.DETR
        if not c.DN.ENABLED:
            return None
        return cls(c.NUM_CLASSES, c.HIDDEN_DIM, num_queries=c.DN.NUM_QUERIES, label_noise_ratio=c.DN.LABEL_NOISE_RATIO,
                   box_noise_scale=c.DN.BOX_NOISE_SCALE, contrastive=c.DN.CONTRASTIVE)

    def extra_repr(self) -> str:
        return (f"num_queries={self.num_dn_queries}, label_noise_ratio={self.label_noise_ratio}, "
                f"box_noise_scale={self.box_noise_scale}, contrastive={self.contrastive}")

    def forward(self, targets: List[Dict[str, torch.Tensor]]) -> Optional[DenoisingQueries]:
        """``None`` when no image of the batch has an object."""
        counts = [len(t["labels"]) for t in targets]
        max_n = max(counts, default=0)
        if max_n == 0:
            return None
        device = self.label_embed.weight.device
        batch = len(targets)
        parts = 2 if self.contrastive else 1
        groups = max(1, self.num_dn_queries // (parts * max_n))

        labels = torch.zeros(batch, max_n, dtype=torch.int64, device=device)
        boxes = torch.zeros(batch, max_n, 4, device=device)
        valid = torch.zeros(batch, max_n, dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            n = counts[i]
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = t["boxes"].to(device).float()
            valid[i, :n] = True
        # [B, groups, parts, max_n]: group-major, positives then negatives.
        shape = (batch, groups, parts, max_n)
        labels = labels[:, None, None].expand(shape).clone()
        boxes = boxes[:, None, None].expand(*shape, 4).clone()
        valid = valid[:, None, None].expand(shape)

        if self.label_noise_ratio > 0:
            flip = torch.rand(shape, device=device) < self.label_noise_ratio * 0.5
            labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        if self.box_noise_scale > 0:
            xyxy = box_convert(boxes, "cxcywh", "xyxy")
            half_wh = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2
            magnitude = torch.rand_like(xyxy)
            if self.contrastive:
                magnitude[:, :, 1] += 1.0  # negatives: between 1x and 2x the positive noise
            sign = torch.randint_like(xyxy, 2) * 2.0 - 1.0
            xyxy = (xyxy + sign * magnitude * half_wh * self.box_noise_scale).clamp(0.0, 1.0)
            boxes = box_convert(xyxy, "xyxy", "cxcywh")
            boxes[..., 2:] = boxes[..., 2:].abs().clamp(min=1e-3)  # corners may cross for negatives

        queries = self.label_embed(labels) * valid[..., None].to(self.label_embed.weight.dtype)
        boxes = torch.where(valid[..., None], boxes, torch.zeros_like(boxes))
        return DenoisingQueries(
            queries=queries.flatten(1, 3), boxes=boxes.flatten(1, 3), num_groups=groups, max_objects=max_n,
            contrastive=self.contrastive, num_objects=counts,
        )
