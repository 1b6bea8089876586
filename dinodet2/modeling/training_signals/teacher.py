"""The frozen teacher of knowledge distillation: any dinodet2 detector, built from its own config and
weights (typically a larger DINOv2 and / or more decoder layers), run in the same training step
under ``no_grad`` on the same input images.

It is held outside the student's module tree (never in ``state_dict()``, checkpoints, the optimizer
or DDP), always in eval mode, and it reads the raw input images itself, so its own pixel statistics,
padding and decoding settings apply.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..transformer.multilevel_tokens import MultiLevelTokens

__all__ = ["FrozenTeacher", "TeacherOutputs"]


@dataclass
class TeacherOutputs:
    """What the teacher produced for a batch: its predictions (``pred_logits`` ``[B, Q, K]``,
    ``pred_boxes`` ``[B, Q, 4]``, optionally ``query_padding``), its multi-level tokens and its encoder
    output ``[B, N, C]``."""

    outputs: Dict
    tokens: MultiLevelTokens
    memory: torch.Tensor


class FrozenTeacher:
    """Callable: the student's ``batched_inputs`` -> :class:`TeacherOutputs` (see the module docstring).
    Deliberately not an ``nn.Module``.

    The teacher's config is read when the student is built (its width and classes size the student's
    distillation heads); the teacher model is built and its weights loaded at the first training step,
    so building the student for evaluation, merging or export never needs the teacher's files."""

    def __init__(self, cfg, weights: str):
        self.cfg = cfg
        self.weights = weights
        self._model: Optional[nn.Module] = None

    @classmethod
    def from_files(cls, config_file: str, weights: str, device: str, opts=()) -> "FrozenTeacher":
        """The teacher ``config_file`` describes (plus ``opts``), with ``weights`` (loaded by dinodet2's
        checkpointer at first use: trainable-only, LoRA and EMA checkpoints all load)."""
        from ...config import load_dinodet2_config

        for key, path in (("TEACHER_CONFIG", config_file), ("TEACHER_WEIGHTS", weights)):
            if not path:
                raise ValueError(f"MODEL.DISTILL.ENABLED needs MODEL.DISTILL.{key}: the teacher's "
                                 f"{'config file' if key == 'TEACHER_CONFIG' else 'trained weights'}.")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"MODEL.DISTILL.TEACHER_CONFIG={config_file!r} does not exist.")
        cfg = load_dinodet2_config(config_file, list(opts) + [
            "MODEL.DEVICE", device, "MODEL.DISTILL.ENABLED", "False", "MODEL.TOKEN_ALIGNMENT.ENABLED", "False",
            "MODEL.COMPILE.ENABLED", "False"])
        return cls(cfg, weights)

    @property
    def num_classes(self) -> int:
        return self.cfg.MODEL.DETR.NUM_CLASSES

    @property
    def hidden_dim(self) -> int:
        return self.cfg.MODEL.DETR.HIDDEN_DIM

    @property
    def model(self) -> nn.Module:
        """The frozen teacher, built and loaded on first use."""
        if self._model is None:
            from detectron2.modeling import build_model

            from ...engine.checkpoint import Dinodet2Checkpointer

            model = build_model(self.cfg)
            Dinodet2Checkpointer(model).load(self.weights)  # a missing / unreadable file raises, path named
            model.requires_grad_(False)
            self._model = model.eval()
        return self._model

    def level_strides(self) -> List[float]:
        shapes = self.model.backbone.output_shape()
        return [shapes[f].stride for f in self.model.in_features]

    def __call__(self, batched_inputs: List[Dict]) -> TeacherOutputs:
        model = self.model
        if model.training:
            model.eval()
        with torch.no_grad():
            images, mask = model.preprocess_image(batched_inputs)
            outputs, tokens, memory = model._run_transformer(images, mask)
        return TeacherOutputs(outputs, tokens, memory)
