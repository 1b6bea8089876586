"""LoRA / DoRA injection: a plan (:mod:`.rules`) -> a ``peft`` config -> adapters in the model."""
import logging
import re
from collections import OrderedDict
from typing import Dict

import torch.nn as nn

from .rules import LoraSpec, plan_lora

logger = logging.getLogger(__name__)


def lora_config_for(plan: "OrderedDict[str, Dict]", spec: LoraSpec, config_cls=None, **extra):
    """A ``peft`` config (``LoraConfig`` unless ``config_cls``) with exact per-module patterns."""
    from peft import LoraConfig

    config_cls = config_cls or LoraConfig
    rank_pattern = {re.escape(n): p["rank"] for n, p in plan.items() if p["rank"] != spec.rank}
    alpha_pattern = {re.escape(n): p["alpha"] for n, p in plan.items() if p["alpha"] != spec.alpha}
    kwargs = dict(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(plan),
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if spec.use_dora:
        kwargs["use_dora"] = True
    kwargs.update(extra)
    return config_cls(**kwargs)


def inject_lora(model: nn.Module, spec: LoraSpec) -> "OrderedDict[str, Dict]":
    """Inject LoRA (or DoRA) adapters into ``model`` in place (``peft.inject_adapter_in_model``).

    Module names keep their place in the model; ``peft`` wraps each target ``nn.Linear`` so its
    weight becomes ``<name>.base_layer.weight`` and adds ``<name>.lora_A/B.default.weight`` (and
    ``lora_magnitude_vector`` for DoRA). Returns the plan (module -> block, family, rank, alpha).
    """
    from peft import inject_adapter_in_model

    if spec.rank <= 0:
        raise ValueError(f"MODEL.LORA.RANK must be a positive integer, got {spec.rank}.")
    plan = plan_lora(model, spec)
    inject_adapter_in_model(lora_config_for(plan, spec), model)
    ranks = sorted({p["rank"] for p in plan.values()})
    logger.info("%s injected into %d modules of DINOv2 (blocks %s, families %s, ranks %s)",
                "DoRA" if spec.use_dora else "LoRA", len(plan), sorted({p["layer"] for p in plan.values()}),
                sorted({p["family"] for p in plan.values()}), ranks)
    return plan
