"""Which DINOv2 modules and parameters a LoRA name refers to: module families, block indices,
adapter parameters.

``MODEL.LORA.TARGET_MODULES`` names *module families* (``query``, ``key``, ``value``, ``attn_out``,
``fc1``, ``fc2``). They are resolved against the module names of the model that was actually built,
so the same config works with transformers 4.x (``attention.attention.query`` ...) and 5.x
(``attention.q_proj`` ...), and with the SwiGLU FFN of ``dinov2-giant`` (``mlp.weights_in/out``).
"""
import re
from typing import Dict, List, Optional, Sequence

import torch.nn as nn

# Each family lists the module-name suffixes used for it by the supported transformers versions.
LORA_MODULE_FAMILIES: Dict[str, Sequence[str]] = {
    "query": ("attention.q_proj", "attention.attention.query"),
    "key": ("attention.k_proj", "attention.attention.key"),
    "value": ("attention.v_proj", "attention.attention.value"),
    "attn_out": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "mlp.weights_in"),
    "fc2": ("mlp.fc2", "mlp.weights_out"),
}

_LAYER_INDEX = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def family_of(name: str) -> Optional[str]:
    """The module family of a (module or parameter) name, or ``None``."""
    for family, suffixes in LORA_MODULE_FAMILIES.items():
        for suffix in suffixes:
            if name.endswith(suffix) or f"{suffix}." in name:
                return family
    return None


def layer_index_of(name: str) -> Optional[int]:
    """The transformer block index in a module name such as ``encoder.layer.3.attention.q_proj``."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks of ``model``, read from its module names."""
    indices = {layer_index_of(n) for n, _ in model.named_modules()} - {None}
    return max(indices) + 1 if indices else 0


def is_lora_parameter(name: str) -> bool:
    """True for parameters created by peft's LoRA / DoRA / AdaLoRA layers."""
    return "lora_" in name


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
