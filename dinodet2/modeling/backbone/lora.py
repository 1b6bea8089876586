"""LoRA adapters for DINOv2 through ``peft``.

``MODEL.LORA.TARGET_MODULES`` names *module families* (``query``, ``key``, ``value``, ``attn_out``,
``fc1``, ``fc2``). They are resolved against the module names of the model that was actually built,
so the same config works with transformers 4.x (``attention.attention.query`` ...) and 5.x
(``attention.q_proj`` ...), and with the SwiGLU FFN of ``dinov2-giant`` (``mlp.weights_in/out``).
"""
import logging
from typing import Dict, List, Sequence

import torch.nn as nn

logger = logging.getLogger(__name__)

# Each family lists the module-name suffixes used for it by the supported transformers versions.
LORA_MODULE_FAMILIES: Dict[str, Sequence[str]] = {
    "query": ("attention.q_proj", "attention.attention.query"),
    "key": ("attention.k_proj", "attention.attention.key"),
    "value": ("attention.v_proj", "attention.attention.value"),
    "attn_out": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "mlp.weights_in"),
    "fc2": ("mlp.fc2", "mlp.weights_out"),
}


def resolve_lora_target_modules(model: nn.Module, families: Sequence[str]) -> List[str]:
    """Full names of the ``nn.Linear`` modules of ``model`` that belong to ``families``."""
    unknown = [f for f in families if f not in LORA_MODULE_FAMILIES]
    if unknown:
        raise ValueError(
            f"MODEL.LORA.TARGET_MODULES contains unknown module families {unknown}; "
            f"choose from {sorted(LORA_MODULE_FAMILIES)}."
        )
    if not families:
        raise ValueError("MODEL.LORA.TARGET_MODULES is empty; set MODEL.LORA.ENABLED=False instead.")
    suffixes = tuple(s for f in families for s in LORA_MODULE_FAMILIES[f])
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(suffixes)
    ]
    if not names:
        raise ValueError(
            f"No linear layers of the DINOv2 model match MODEL.LORA.TARGET_MODULES={list(families)} "
            f"(looked for names ending in {suffixes}). This transformers version may name them "
            "differently; please report it."
        )
    return names


def inject_lora(model: nn.Module, families: Sequence[str], rank: int, alpha: float,
                dropout: float) -> List[str]:
    """Inject LoRA adapters into ``model`` in place (``peft.inject_adapter_in_model``).

    Module names keep their place in the model; ``peft`` wraps each target ``nn.Linear`` so its
    weight becomes ``<name>.base_layer.weight`` and adds ``<name>.lora_A/B.default.weight``.
    Returns the list of adapted module names.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"MODEL.LORA.RANK must be a positive integer, got {rank}.")
    targets = resolve_lora_target_modules(model, families)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets)
    inject_adapter_in_model(config, model)
    logger.info("LoRA (r=%d, alpha=%s) injected into %d modules of DINOv2", rank, alpha, len(targets))
    return targets


def is_lora_parameter(name: str) -> bool:
    """True for parameters created by peft's LoRA layers."""
    return "lora_" in name
