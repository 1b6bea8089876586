"""LoRA adapters for DINOv2 through ``peft``: which layers, which module families, which ranks.

* :mod:`.names`: module families (``MODEL.LORA.TARGET_MODULES``), block indices, LoRA parameters.
* :mod:`.rules`: ``MODEL.LORA`` settings (:class:`LoraSpec`) -> blocks and per-module rank / alpha.
* :mod:`.injection`: the plan -> a ``peft`` config -> LoRA / DoRA adapters injected in place.
* :mod:`.adalora`: AdaLoRA injection, its tuner, orthogonality loss and rank allocation.
* :mod:`.merge`: merging adapters into plain linear layers for deployment.

Parameter counts are reported by :mod:`dinodet2.param_report`.
"""
from .adalora import (
    adalora_orthogonal_loss,
    adalora_orthogonal_regularization,
    adalora_rank_allocation,
    find_adalora_tuner,
    inject_adalora,
)
from .injection import inject_lora
from .merge import merge_lora_
from .names import LORA_MODULE_FAMILIES, family_of, is_lora_parameter, layer_index_of, resolve_lora_target_modules
from .rules import LoraSpec

__all__ = [
    "LORA_MODULE_FAMILIES", "LoraSpec", "adalora_orthogonal_loss", "adalora_orthogonal_regularization",
    "adalora_rank_allocation", "family_of", "find_adalora_tuner", "inject_adalora", "inject_lora",
    "is_lora_parameter", "layer_index_of", "merge_lora_", "resolve_lora_target_modules",
]
