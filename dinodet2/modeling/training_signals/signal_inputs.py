"""What a training signal (an auxiliary loss beside the detection losses) may read from one
training forward of :class:`~dinodet2.modeling.meta_arch.detr.DETR`."""
from dataclasses import dataclass
from typing import Dict, List

import torch
from detectron2.structures import ImageList

from ..transformer.multilevel_tokens import MultiLevelTokens

__all__ = ["SignalInputs"]


@dataclass
class SignalInputs:
    """Attributes:
        images: the normalised, padded input batch (``images.tensor`` ``[B, 3, H, W]``).
        tokens: the multi-level tokens the transformer encoded (the neck's levels after the input
            projection, with masks and level sizes).
        memory: the encoder's output ``[B, N, C]``, the same token order as ``tokens.src``.
        outputs: the detector's predictions (``pred_logits``, ``pred_boxes``, ``aux_outputs``, ...).
        targets: per image ``{"labels", "boxes"}`` (normalised cxcywh), as the criterion gets them.
        batched_inputs: the model's input dicts (raw images: what a teacher model reads).
    """

    images: ImageList
    tokens: MultiLevelTokens
    memory: torch.Tensor
    outputs: Dict
    targets: List[Dict[str, torch.Tensor]]
    batched_inputs: List[Dict]
