"""Which weights of a checkpoint fit the model built from the current config, decided before
loading: the basis of fine-tuning a checkpoint trained with another ``MODEL.DETR.NUM_CLASSES``
(:meth:`.checkpoint.Dinodet2Checkpointer._load_model`).

* Class-dependent weights (the model's ``class_dependent_parameter_names()``: class heads, the
  denoising label embedding) of another shape are dropped from the checkpoint; the model keeps its
  fresh initialisation and one warning lists them.
* A backbone that does not match (a ``backbone.*`` weight of another shape, or, when the checkpoint
  holds backbone weights at all, backbone weights missing from it or unknown to the model; fresh
  LoRA adapters are the one allowed gap) is refused: its features would be meaningless.
* Any other weight of another shape (e.g. another ``MODEL.DETR.NUM_QUERIES``) is dropped and
  re-initialised too, named in a second warning.
* When the load restores a training state (``--resume``) every shape mismatch is refused: the
  optimizer state would not fit and the training would not continue the one in OUTPUT_DIR.
"""
import logging
from typing import Dict, List, Sequence, Set

import torch

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
_LORA = ".lora_"
_SHOWN = 10  # keys named in a message before "... (N in all)"


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOWN else shown


def class_dependent_names(model: torch.nn.Module) -> Set[str]:
    """The model's class-dependent state-dict names (its ``class_dependent_parameter_names()``,
    else those of the modules :func:`..modeling.classification.mark_class_dependent` marked)."""
    if hasattr(model, "class_dependent_parameter_names"):
        return set(model.class_dependent_parameter_names())
    from ..modeling.classification import class_dependent_parameter_names
    return set(class_dependent_parameter_names(model))


def _shape_text(state: Dict[str, torch.Tensor], key: str) -> str:
    return "x".join(str(d) for d in state[key].shape) or "scalar"


def drop_incompatible_weights(checkpoint_state: Dict[str, torch.Tensor], model: torch.nn.Module, *,
                              resuming: bool) -> List[str]:
    """Remove from ``checkpoint_state`` (in place) the weights that do not fit ``model`` and return
    their names (the model keeps its own initialisation of them), warning once per kind; raise
    ``ValueError`` for a mismatching backbone, or for any mismatch when ``resuming``."""
    own = model.state_dict()
    mismatched = [k for k, v in checkpoint_state.items()  # tensors, or numpy arrays of a .pkl
                  if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if any(k.startswith(BACKBONE_PREFIX) for k in checkpoint_state):
        missing = [k for k in own if k.startswith(BACKBONE_PREFIX) and k not in checkpoint_state and _LORA not in k]
        unexpected = [k for k in checkpoint_state if k.startswith(BACKBONE_PREFIX) and k not in own]
    else:
        missing, unexpected = [], []
    backbone = [f"{k} ({_shape_text(checkpoint_state, k)} in the checkpoint, {_shape_text(own, k)} in the model)"
                for k in mismatched if k.startswith(BACKBONE_PREFIX)]
    backbone += [f"{k} (missing from the checkpoint)" for k in missing]
    backbone += [f"{k} (not in the model)" for k in unexpected]
    if backbone:
        raise ValueError(
            f"The checkpoint's backbone does not match the one the config builds: {len(backbone)} backbone weights "
            f"differ: {_listing(backbone)}. Set MODEL.DINOV2.NAME (or, with RANDOM_INIT, HIDDEN_SIZE / NUM_LAYERS / "
            "NUM_HEADS / MLP_RATIO), MODEL.DINOV2.PATCH_SIZE, PRETRAIN_IMAGE_SIZE and NUM_REGISTER_TOKENS, and the "
            "neck's MODEL.SFP.* (its weights are under 'backbone.stages'), to the values the checkpoint was "
            "trained with (a trainable-only checkpoint stores its config under 'config').")
    if not mismatched:
        return []
    described = [f"{k} ({_shape_text(checkpoint_state, k)} -> {_shape_text(own, k)})" for k in mismatched]
    if resuming:
        raise ValueError(
            f"Cannot resume: {len(mismatched)} weights of the checkpoint have other shapes than the model's: "
            f"{_listing(described)}. --resume continues the training in OUTPUT_DIR with the config it was started "
            "with; to fine-tune these weights with another config (e.g. MODEL.DETR.NUM_CLASSES) start a new "
            "training with MODEL.WEIGHTS set to the checkpoint and without --resume.")
    per_class = class_dependent_names(model)
    class_keys = [d for k, d in zip(mismatched, described) if k in per_class]
    other_keys = [d for k, d in zip(mismatched, described) if k not in per_class]
    if class_keys:
        logger.warning(
            "The checkpoint was trained with another number of classes than MODEL.DETR.NUM_CLASSES=%s: its %d "
            "class-dependent weights are not loaded and stay freshly initialised (fine-tuning to a new class "
            "set): %s", getattr(model, "num_classes", "?"), len(class_keys), ", ".join(class_keys))
    if other_keys:
        logger.warning(
            "%d weights of the checkpoint have other shapes than the model's (another MODEL.DETR.* size, e.g. "
            "NUM_QUERIES, HIDDEN_DIM, DIM_FEEDFORWARD?): they are not loaded and stay freshly initialised: %s",
            len(other_keys), _listing(other_keys))
    for key in mismatched:
        del checkpoint_state[key]
    return mismatched
