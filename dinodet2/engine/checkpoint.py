"""A DetectionCheckpointer that understands peft's LoRA parameter names and can write small
trainable-only ("adapter") checkpoints."""
import logging
import os
from typing import Any, Dict

import torch
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


TRAINABLE_ONLY = "trainable_only"


def trainable_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters that train (LoRA, unfrozen backbone weights, neck, decoder, heads) and
    every buffer: what differs from the pretrained backbone after fine-tuning."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


class Dinodet2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` + LoRA key remapping + optional trainable-only checkpoints.

    With ``trainable_only=True`` (``SOLVER.CHECKPOINT_TRAINABLE_ONLY``) ``save`` writes only
    :func:`trainable_state_dict` (megabytes for a LoRA-tuned dinov2-base detector instead of
    hundreds), marked ``"dinodet2_format": "trainable_only"`` and with the config that rebuilds
    the model (``"config"``: the YAML dump, when the checkpointer was given ``cfg``). Loading such a
    checkpoint fills the missing, frozen weights from the model itself, i.e. from the pretrained
    DINOv2 the config loads, and refuses it if a missing weight is one that trains. A randomly
    initialised DINOv2 (``MODEL.DINOV2.RANDOM_INIT``) cannot be rebuilt, so for it checkpoints
    stay complete.
    """

    def __init__(self, model, save_dir: str = "", *, trainable_only: bool = False, cfg=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        if trainable_only and cfg is not None and cfg.MODEL.DINOV2.RANDOM_INIT:
            logger.warning("SOLVER.CHECKPOINT_TRAINABLE_ONLY is ignored: with MODEL.DINOV2.RANDOM_INIT the frozen "
                           "backbone weights are random and could not be rebuilt, so checkpoints stay complete.")
            trainable_only = False
        self.trainable_only = trainable_only
        self.cfg = cfg

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.trainable_only:
            return super().save(name, **kwargs)
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": trainable_state_dict(self.model), "dinodet2_format": TRAINABLE_ONLY}
        if self.cfg is not None:
            data["config"] = self.cfg.dump()
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving trainable-only checkpoint (%d tensors) to %s", len(data["model"]), save_file)
        with self.path_manager.open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def _load_model(self, checkpoint):
        if isinstance(checkpoint.get("model"), dict) and not checkpoint.get("matching_heuristics", False):
            _strip_prefix_if_present(checkpoint["model"], "module.")  # checkpoints of DDP-wrapped models
            checkpoint["model"] = remap_lora_keys(checkpoint["model"], self.model.state_dict().keys())
            if checkpoint.get("dinodet2_format") == TRAINABLE_ONLY:
                checkpoint["model"] = self._complete_trainable_only(checkpoint["model"])
        return super()._load_model(checkpoint)

    def _complete_trainable_only(self, state: Dict) -> Dict:
        """Fill a trainable-only checkpoint with the model's own (pretrained, frozen) weights."""
        own = self.model.state_dict()
        trains = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = [k for k in own if k not in state]
        bad = [k for k in missing if k in trains]
        if bad:
            raise ValueError(
                f"This trainable-only checkpoint lacks {len(bad)} weights that train in the model built from "
                f"the current config (e.g. '{bad[0]}'); it was saved with different MODEL.LORA / "
                "MODEL.DINOV2.FREEZE / UNFREEZE_* settings. Use the config stored in the checkpoint "
                "(torch.load(path)['config']).")
        logger.info("Trainable-only checkpoint: %d frozen weights come from the pretrained backbone (%s).",
                    len(missing), "MODEL.DINOV2.NAME")
        return {**{k: own[k] for k in missing}, **state}
