"""Merging adapters into their base layers for deployment (``tools/merge_lora.py``)."""
import torch.nn as nn


def merge_lora_(model: nn.Module) -> int:
    """Merge every LoRA / DoRA / AdaLoRA adapter of ``model`` into its base linear layer and
    replace the ``peft`` wrapper by that plain ``nn.Linear``, in place.

    Afterwards ``model.state_dict()`` has the plain names (``...q_proj.weight``) and loads into a
    model built with ``MODEL.LORA.ENABLED False``; inference costs exactly the unadapted model.
    Returns the number of merged layers.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(safe_merge=True)  # raises if a merged weight is not finite
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.get_base_layer())
        merged += 1
    return merged
