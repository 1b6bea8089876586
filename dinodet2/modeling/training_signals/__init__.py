"""Training signals: auxiliary losses computed beside the detection losses during training only,
from what one training forward of the detector produced (:class:`SignalInputs`). Each is a module
``SignalInputs -> {loss name: loss}``; the detector holds them in ``DETR.training_signals`` and
leaves them out of inference and of merged / exported weights (:meth:`DETR.inference_state_dict`).

* :class:`TokenAlignment` (``MODEL.TOKEN_ALIGNMENT``): tokens pulled towards a frozen DINOv2's.
"""
from typing import Sequence

import torch.nn as nn

from .frozen_dinov2 import FrozenDinov2Tokens, adapters_disabled, find_dinov2_backbone
from .signal_inputs import SignalInputs
from .token_alignment import ALIGNMENT_LOSSES, ALIGNMENT_SOURCES, TokenAlignment

__all__ = ["ALIGNMENT_LOSSES", "ALIGNMENT_SOURCES", "FrozenDinov2Tokens", "SignalInputs", "TokenAlignment",
           "adapters_disabled", "build_training_signals", "find_dinov2_backbone"]


def build_training_signals(cfg, backbone: nn.Module, level_strides: Sequence[float]) -> nn.ModuleDict:
    """The training signals the config switches on (an empty ``ModuleDict`` when none is), for a
    detector whose transformer levels have ``level_strides``. Call before weights are loaded."""
    signals = nn.ModuleDict()
    c = cfg.MODEL.TOKEN_ALIGNMENT
    if c.ENABLED:
        target = FrozenDinov2Tokens.from_backbone(backbone, block=c.TEACHER_BLOCK, teacher=c.TEACHER,
                                                  local_files_only=cfg.MODEL.DINOV2.LOCAL_FILES_ONLY)
        level = c.LEVEL if c.LEVEL >= 0 else TokenAlignment.nearest_level(level_strides, target.patch_size)
        if level >= len(level_strides):
            raise ValueError(f"MODEL.TOKEN_ALIGNMENT.LEVEL={c.LEVEL}, but the transformer has {len(level_strides)} "
                             f"levels (strides {list(level_strides)}); use -1 for the one nearest the patch size.")
        signals["token_alignment"] = TokenAlignment(target, cfg.MODEL.DETR.HIDDEN_DIM, level, source=c.SOURCE,
                                                    loss=c.LOSS, weight=c.WEIGHT)
    return signals
