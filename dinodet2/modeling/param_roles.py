"""Parameters declare how the optimizer treats them (timm's ``no_weight_decay()`` convention,
extended to learning-rate roles), so renaming an attribute can never silently move a parameter to
another group.

A module may define

* ``no_weight_decay() -> Iterable[str]``: names, relative to the module, of parameters that are
  embeddings (object queries, anchors, level / position embeddings, class / register tokens): they
  get ``SOLVER.WEIGHT_DECAY_EMBED``;
* ``lr_roles() -> Dict[str, str]``: relative parameter name -> one of :data:`LR_ROLES`, whose
  ``SOLVER`` key multiplies the base learning rate.

Norm layers, ``nn.Embedding`` and biases are recognised by type / name in
:mod:`dinodet2.engine.optimizer` as in Detectron2. A declaration of an inner module overrides one
of an outer module for the same parameter.
"""
from typing import Dict, Set, Tuple

from torch import nn

__all__ = ["LR_ROLES", "declared_parameter_roles"]

#: learning-rate role -> the SOLVER key of its multiplier
LR_ROLES = {
    "backbone": "BACKBONE_LR_MULTIPLIER",      # pretrained backbone weights that train (unfrozen)
    "lora": "LORA_LR_MULTIPLIER",              # LoRA / DoRA / AdaLoRA adapter weights
    "deformable": "DEFORMABLE_LR_MULTIPLIER",  # deformable sampling offsets, reference-point projections
}


def declared_parameter_roles(model: nn.Module) -> Tuple[Set[str], Dict[str, str]]:
    """(full names of the parameters declared no-weight-decay, full name -> declared LR role)."""
    no_decay: Set[str] = set()
    roles: Dict[str, str] = {}
    own = dict(model.named_parameters())
    for prefix, module in model.named_modules():  # outer modules first: inner declarations win
        dot = f"{prefix}." if prefix else ""
        if hasattr(module, "no_weight_decay"):
            no_decay.update(dot + name for name in module.no_weight_decay())
        if hasattr(module, "lr_roles"):
            for name, role in module.lr_roles().items():
                if role not in LR_ROLES:
                    raise ValueError(f"{type(module).__name__}.lr_roles() gives '{name}' the unknown role '{role}'; "
                                     f"roles are {sorted(LR_ROLES)}.")
                roles[dot + name] = role
    unknown = sorted((no_decay | set(roles)) - set(own))
    if unknown:
        raise ValueError(f"Modules declare optimizer roles for parameters that do not exist: {unknown[:5]}.")
    return no_decay, roles
