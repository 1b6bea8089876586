"""AdamW with parameter groups for DINOv2-LoRA + DETR (Detectron2's YACS builder only makes SGD)."""
import itertools
from typing import Any, Dict, List, Type

import torch
import torch.nn as nn
from detectron2.solver import build_optimizer as build_d2_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from ..modeling.backbone.lora import is_lora_parameter

# Parameters whose local name is one of these are embeddings: no weight decay.
EMBEDDING_PARAM_NAMES = ("query_embed", "level_embed", "position_embeddings", "cls_token",
                         "register_tokens", "mask_token")


def lr_factor_for(name: str, cfg) -> float:
    """LR multiplier of a parameter from its full name."""
    if not name.startswith("backbone.") or ".stages." in name:  # neck stages train at the base LR
        return 1.0
    return cfg.SOLVER.LORA_LR_MULTIPLIER if is_lora_parameter(name) else cfg.SOLVER.BACKBONE_LR_MULTIPLIER


def build_param_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    """Parameter groups: LR multipliers for LoRA / unfrozen backbone, no decay on norms, biases, embeddings."""
    embed_wd = {"weight_decay": cfg.SOLVER.WEIGHT_DECAY_EMBED}
    overrides = {}
    for name, _ in model.named_parameters():
        leaf = name.rpartition(".")[2]
        if leaf in EMBEDDING_PARAM_NAMES:
            overrides[leaf] = embed_wd
    return get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=lambda name: lr_factor_for(name, cfg),
        overrides=overrides,
    )


def _with_full_model_clipping(optim_cls: Type[torch.optim.Optimizer], max_norm: float, norm_type: float):
    """Optimizer subclass that clips the global gradient norm of all its parameters in ``step``."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = f"{optim_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER``: "ADAMW" (parameter groups above) or "SGD" (Detectron2's builder).

    ``SOLVER.CLIP_GRADIENTS``: CLIP_TYPE "full_model" clips the global norm over all parameters
    (DETR's recipe); "value" / "norm" use Detectron2's per-parameter clipping.
    """
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        return build_d2_optimizer(cfg, model)
    if name != "ADAMW":
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got '{cfg.SOLVER.OPTIMIZER}'.")
    params = build_param_groups(cfg, model)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    optim_cls = torch.optim.AdamW
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    return optim_cls(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS),
                     weight_decay=cfg.SOLVER.WEIGHT_DECAY)
