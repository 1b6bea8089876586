"""AdaLoRA: adaptive rank allocation (``peft``'s ``AdaLoraModel`` and its ``RankAllocator``).

:func:`inject_adalora` keeps the tuner on the model outside the module tree; :func:`find_adalora_tuner`
finds it again, for the budget hook (:class:`dinodet2.engine.hooks.AdaLoraBudgetHook`), the
orthogonality loss (:func:`adalora_orthogonal_loss`, the backbone's ``extra_losses``) and the rank
allocation report (:func:`adalora_rank_allocation`).
"""
import logging
from collections import OrderedDict
from typing import Dict

import torch
import torch.nn as nn

from .rules import LoraSpec, plan_lora

logger = logging.getLogger(__name__)

ADALORA_ATTRIBUTE = "adalora_tuner"


def inject_adalora(model: nn.Module, spec: LoraSpec, *, init_r: int, target_r: int, total_step: int,
                   tinit: int = 0, tfinal: int = 0, delta_t: int = 10, beta1: float = 0.85, beta2: float = 0.85,
                   orth_reg_weight: float = 0.5) -> "OrderedDict[str, Dict]":
    """Inject AdaLoRA adapters (SVD-form ``lora_A``, ``lora_E``, ``lora_B``) into ``model`` in place.

    Every targeted module starts at rank ``init_r``; the rank allocator then prunes singular
    values by importance so that the average rank reaches ``target_r`` after
    ``total_step - tfinal`` steps. ``peft``'s tuner object, which owns the allocator, is kept on
    ``model`` (as a plain attribute, outside the module tree and the state dict); it must be told
    every training step (:class:`dinodet2.engine.hooks.AdaLoraBudgetHook`).
    """
    from peft import AdaLoraConfig
    from peft.tuners.adalora import AdaLoraModel

    if spec.rank_pattern or spec.alpha_pattern or spec.use_dora:
        raise ValueError("MODEL.LORA.ADALORA.ENABLED decides ranks itself: leave MODEL.LORA.RANK_PATTERN, "
                         "ALPHA_PATTERN empty and USE_DORA False.")
    if not 0 < target_r <= init_r:
        raise ValueError(f"MODEL.LORA.ADALORA needs 0 < TARGET_R <= INIT_R, got TARGET_R={target_r}, INIT_R={init_r}.")
    if tinit + tfinal >= total_step:
        raise ValueError(f"MODEL.LORA.ADALORA: TINIT ({tinit}) + TFINAL ({tfinal}) must be smaller than "
                         f"SOLVER.MAX_ITER ({total_step}) to leave a budgeting phase.")
    plan = plan_lora(model, spec)
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                           beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight, total_step=total_step,
                           lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(plan))
    tuner = AdaLoraModel(model, config, "default")
    model.__dict__[ADALORA_ATTRIBUTE] = tuner  # not a submodule: no state-dict entries
    for p in plan.values():
        p["rank"] = init_r
    logger.info("AdaLoRA injected into %d modules (init_r=%d -> target_r=%d over %d steps)", len(plan), init_r,
                target_r, total_step)
    return plan


def find_adalora_tuner(model: nn.Module):
    """The AdaLoRA tuner attached by :func:`inject_adalora` anywhere inside ``model``, or None."""
    for module in model.modules():
        tuner = module.__dict__.get(ADALORA_ATTRIBUTE)
        if tuner is not None:
            return tuner
    return None


def adalora_orthogonal_regularization(tuner):
    """AdaLoRA's orthogonality penalty on ``P`` (``lora_A``) and ``Q`` (``lora_B``), as ``peft``
    adds it to a transformers model's loss: mean over matrices of ``||P P^T - I||_F``."""
    total, count = None, 0
    for name, param in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and param.requires_grad and param.numel():
            cov = param @ param.T if "lora_A" in name else param.T @ param
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            term = torch.linalg.matrix_norm(cov - eye)
            total = term if total is None else total + term
            count += 1
    return None if total is None else total / count


def adalora_orthogonal_loss(tuner) -> Dict[str, torch.Tensor]:
    """``{"loss_adalora_orth": ORTH_REG_WEIGHT * regularization}`` for an AdaLoRA ``tuner`` whose
    weight is positive and that has adapters to regularise; ``{}`` otherwise (also for ``None``)."""
    if tuner is None:
        return {}
    weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
    regularization = adalora_orthogonal_regularization(tuner) if weight > 0 else None
    return {} if regularization is None else {"loss_adalora_orth": weight * regularization}


def adalora_rank_allocation(model: nn.Module) -> "OrderedDict[str, int]":
    """Current rank of every AdaLoRA module (names relative to the ViT): the number of singular
    values the rank allocator keeps (its mask in ``rank_pattern``; ``INIT_R`` before the first
    pruning)."""
    tuner = find_adalora_tuner(model)
    if tuner is None:
        return OrderedDict()
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern or {}
    suffix = f".lora_E.{tuner.trainable_adapter_name}"
    ranks = OrderedDict()
    for name, param in tuner.model.named_parameters():
        if name.endswith(suffix):
            mask = pattern.get(name, pattern.get(name.replace(f".{tuner.trainable_adapter_name}", "")))
            ranks[name[: -len(suffix)]] = int(sum(bool(v) for v in mask)) if mask is not None else param.shape[0]
    return ranks
