"""A DetectionCheckpointer that understands peft's LoRA parameter names."""
import logging
from typing import Dict

from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _strip_prefix_if_present

logger = logging.getLogger(__name__)

_BASE_LAYER = ".base_layer."


def remap_lora_keys(checkpoint_state: Dict, model_keys) -> Dict:
    """Rename checkpoint keys so that plain and LoRA-wrapped linear layers load into each other.

    peft wraps an adapted ``nn.Linear`` so ``x.q_proj.weight`` becomes ``x.q_proj.base_layer.weight``.
    A checkpoint written without adapters (or with adapters merged) therefore loads into a model
    with LoRA, and the base weights of a LoRA checkpoint load into a model without LoRA. In the
    second case the adapter deltas would be lost, so that is refused with a clear message.
    """
    model_keys = set(model_keys)
    out = {}
    dropped_lora = []
    for key, value in checkpoint_state.items():
        if key in model_keys:
            out[key] = value
            continue
        if _BASE_LAYER in key and key.replace(_BASE_LAYER, ".") in model_keys:
            out[key.replace(_BASE_LAYER, ".")] = value
            continue
        prefix, _, leaf = key.rpartition(".")
        wrapped = f"{prefix}{_BASE_LAYER}{leaf}" if prefix else key
        if wrapped in model_keys:
            out[wrapped] = value
            continue
        if ".lora_" in key:
            dropped_lora.append(key)
        out[key] = value
    if dropped_lora and not any(".lora_" in k for k in model_keys):
        raise ValueError(
            f"The checkpoint contains {len(dropped_lora)} LoRA adapter tensors (e.g. '{dropped_lora[0]}') "
            "but the model was built with MODEL.LORA.ENABLED=False, so the adapters would be silently "
            "ignored. Build the model with the same MODEL.LORA.* settings used for training."
        )
    return out


class Dinodet2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` + LoRA key remapping. Saves exactly what ``state_dict()`` holds."""

    def _load_model(self, checkpoint):
        if isinstance(checkpoint.get("model"), dict) and not checkpoint.get("matching_heuristics", False):
            _strip_prefix_if_present(checkpoint["model"], "module.")  # checkpoints of DDP-wrapped models
            checkpoint["model"] = remap_lora_keys(checkpoint["model"], self.model.state_dict().keys())
        return super()._load_model(checkpoint)
