"""The decoder's cached key/value side: each layer's projection of the encoder memory.

A decoder layer's cross-attention projects the memory (standard attention: keys
``(memory + pos) W_k`` and values ``memory W_v``; deformable attention: ``value_proj(memory)``)
before any query reads it. The projection depends on the memory and the layer only, so
:class:`DecoderMemory` computes it once per layer per forward and hands the same tensors to every
query that layer sees: the matching and the denoising queries (one group each, decoded together)
and, with progressive decoding (:mod:`.query_pruning`), the shrinking set of active queries.

Where caching cannot apply: across layers (each layer has its own projection weights), across
images (the memory differs), and in the encoder (its memory changes after every layer).
"""
from typing import Dict, Optional

import torch
import torch.nn as nn

__all__ = ["DecoderMemory"]


class DecoderMemory:
    """The encoder memory of one batch and its per-layer projections, each computed on first use.

    ``projected(i, layer)`` returns layer ``i``'s ``layer.project_memory(memory, pos, mask)``;
    ``num_projections`` counts how many were computed (at most one per layer).
    """

    def __init__(self, memory: torch.Tensor, pos: Optional[torch.Tensor], padding_mask: Optional[torch.Tensor]):
        self.memory = memory
        self.pos = pos
        self.padding_mask = padding_mask
        self._projected: Dict[int, object] = {}

    def projected(self, index: int, layer: nn.Module):
        if index not in self._projected:
            self._projected[index] = layer.project_memory(self.memory, self.pos, self.padding_mask)
        return self._projected[index]

    @property
    def num_projections(self) -> int:
        return len(self._projected)
