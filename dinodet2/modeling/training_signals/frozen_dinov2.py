"""Token features of a frozen DINOv2, the target of token feature alignment.

Where the target comes from (:meth:`FrozenDinov2Tokens.from_backbone`):

* ``adapters_off``: the detector's own ViT has LoRA adapters on frozen pretrained weights. The
  target is that ViT with its adapters switched off for the call: the pretrained model, at the cost
  of one more ViT forward without gradients, and no weights in memory twice.
* ``frozen_copy``: the ViT trains (full or partial fine-tuning). A frozen copy of it, taken when the
  model is built (so: the weights ``MODEL.DINOV2.NAME`` loads, before any fine-tuning), runs beside it.
* ``teacher``: another DINOv2 (``MODEL.TOKEN_ALIGNMENT.TEACHER``, a Hub id or a local
  ``save_pretrained`` directory; e.g. a larger one), loaded frozen.

The target model is never part of the detector's module tree: it is not in ``state_dict()``, not in
checkpoints, not seen by the optimizer or DDP, and not in merged or exported models. It is moved to
the input's device and dtype on first use and always runs in eval mode (no drop-path) under
``no_grad``.
"""
import contextlib
import copy
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone.dinov2 import Dinov2Backbone, load_dinov2_model
from ..backbone.lora import is_lora_parameter

__all__ = ["FrozenDinov2Tokens", "adapters_disabled", "find_dinov2_backbone"]

TARGET_SOURCES = ("adapters_off", "frozen_copy", "teacher")


def find_dinov2_backbone(backbone: nn.Module) -> Dinov2Backbone:
    """The :class:`Dinov2Backbone` of a detector backbone (itself, or the ViT under the pyramid)."""
    for module in backbone.modules():
        if isinstance(module, Dinov2Backbone):
            return module
    raise ValueError(f"{type(backbone).__name__} has no DINOv2 ViT (Dinov2Backbone); token alignment needs "
                     "MODEL.BACKBONE.NAME build_dinov2_backbone or build_dinov2_sfp_backbone.")


def _adapter_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Every peft adapter (LoRA, DoRA, AdaLoRA) inside ``module`` is bypassed for the ``with`` body:
    its layers compute their base layer only. Unlike peft's ``enable_adapters``, no ``requires_grad``
    flag is touched, so what trains is unchanged afterwards."""
    layers = _adapter_layers(module)
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


class FrozenDinov2Tokens:
    """Callable: a normalised image batch ``[B, 3, H, W]`` -> the frozen DINOv2's patch tokens of one
    block, ``[B, D, H / p, W / p]`` (after DINOv2's final LayerNorm; ``p`` its patch size), without
    gradients. Inputs that are not multiples of ``p`` are zero-padded at the bottom / right.

    Deliberately not an ``nn.Module``: whatever holds it does not register the frozen model."""

    def __init__(self, vit: Dinov2Backbone, block: int, source: str):
        if source not in TARGET_SOURCES:
            raise ValueError(f"unknown target source {source!r}; expected one of {TARGET_SOURCES}")
        depth = len(vit.vit.encoder.layer)
        if not -depth <= block < depth:
            raise ValueError(f"MODEL.TOKEN_ALIGNMENT.TEACHER_BLOCK={block} is outside the {depth} blocks of the "
                             f"target DINOv2 (valid: {-depth}..{depth - 1}).")
        self.vit = vit
        self.block = block % depth
        self.source = source
        if source != "adapters_off":
            self.vit.requires_grad_(False)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, block: int = -1, teacher: str = "",
                      local_files_only: bool = False) -> "FrozenDinov2Tokens":
        """The target for a detector with ``backbone`` (see the module docstring for the three sources).
        Call it when the model is built, before any weights are loaded into it."""
        own = find_dinov2_backbone(backbone)
        if teacher:
            vit = load_dinov2_model(teacher, local_files_only=local_files_only)
            return cls(Dinov2Backbone(vit, out_indices=(block,)), block, "teacher")
        base_trains = any(p.requires_grad for n, p in own.named_parameters() if not is_lora_parameter(n))
        if _adapter_layers(own.vit) and not base_trains:
            return cls(own, block, "adapters_off")
        frozen = copy.deepcopy(own)
        for layer in _adapter_layers(frozen.vit):  # the copy computes its pretrained base layers only
            layer._disable_adapters = True
        return cls(frozen, block, "frozen_copy")

    @property
    def patch_size(self) -> int:
        return self.vit.patch_size

    @property
    def dim(self) -> int:
        return self.vit.hidden_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -images.shape[-2] % p, -images.shape[-1] % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        if self.source != "adapters_off":
            ref = next(self.vit.parameters())
            if ref.device != images.device:
                self.vit.to(images.device)
        adapters = adapters_disabled(self.vit.vit) if self.source == "adapters_off" else contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(self.vit), adapters:
            return self.vit.features(images, (self.block,))[f"layer{self.block}"]
