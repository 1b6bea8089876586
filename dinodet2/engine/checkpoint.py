"""Dinodet2's checkpointer: Detectron2's ``DetectionCheckpointer`` that understands peft's LoRA
parameter names, can write small trainable-only ("adapter") checkpoints, reads weights files
without executing code (:mod:`.weights_file`), writes checkpoints atomically (:mod:`.atomic_file`),
refuses to write non-finite weights, resumes from the newest readable checkpoint and can publish
other weights than the training ones (the EMA's) as a checkpoint's model."""
import logging
import math
import os
import re
from typing import Any, BinaryIO, Callable, Dict, List, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _strip_prefix_if_present

from .atomic_file import remove_interrupted_writes, write_atomically
from .weights_compatibility import drop_incompatible_weights
from .weights_file import WeightsFileError, read_checkpoint_file, require_weights_file

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
# Checkpoint key of the model's own (training) weights of the entries that "model" replaces with
# published ones (Dinodet2Checkpointer.publish_weights).
TRAINING_WEIGHTS = "training_weights"


def trainable_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters that train (LoRA, unfrozen backbone weights, neck, decoder, heads) and
    every buffer: what differs from the pretrained backbone after fine-tuning."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def find_non_finite_tensors(data: Any, prefix: str = "") -> List[str]:
    """Keys of the floating-point tensors in ``data`` (nested dicts / lists / tuples, e.g. a
    checkpoint) that hold a NaN or an infinity, as ``model/<name>`` or ``optimizer/state/3/exp_avg``."""
    found = []
    if isinstance(data, torch.Tensor):
        if (data.is_floating_point() or data.is_complex()) and not bool(torch.isfinite(data).all()):
            found.append(prefix)
    elif isinstance(data, dict):
        for key, value in data.items():
            found += find_non_finite_tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            found += find_non_finite_tensors(value, f"{prefix}/{index}" if prefix else str(index))
    return found


# Checkpoint key of the class names (``thing_classes`` of the first training dataset), written by
# Dinodet2Checkpointer.save when it knows the config, so that predictions on new images can be
# named without registering the training dataset again.
CLASS_NAMES = "thing_classes"


def training_class_names(cfg) -> Optional[List[str]]:
    """``thing_classes`` of ``cfg.DATASETS.TRAIN[0]`` if that dataset's metadata is registered and
    has them, else None."""
    from detectron2.data import MetadataCatalog

    if not cfg.DATASETS.TRAIN or cfg.DATASETS.TRAIN[0] not in MetadataCatalog.list():
        return None
    names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
    return [str(n) for n in names] if names else None


def class_names_of(checkpoint_path: str) -> Optional[List[str]]:
    """The class names a checkpoint was saved with (:data:`CLASS_NAMES`), or None for a checkpoint
    without them (written before they were stored, without a config, or not by dinodet2).
    The file is read safely (:func:`.weights_file.read_checkpoint_file`)."""
    data = read_checkpoint_file(checkpoint_path)
    names = data.get(CLASS_NAMES) if isinstance(data, dict) else None
    return [str(n) for n in names] if names else None


# What Detectron2's PeriodicCheckpointer writes: model_<iteration, 7 digits>.pth and model_final.pth.
_PERIODIC_CHECKPOINT = re.compile(r"^model_(\d+|final)\.pth$")


class Dinodet2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` + LoRA key remapping + optional trainable-only checkpoints +
    safe reading, atomic writing and a resume that survives a broken last checkpoint.

    With ``trainable_only=True`` (``SOLVER.CHECKPOINT_TRAINABLE_ONLY``) ``save`` writes only
    :func:`trainable_state_dict` (megabytes for a LoRA-tuned dinov2-base detector instead of
    hundreds), marked ``"dinodet2_format": "trainable_only"`` and with the config that rebuilds
    the model (``"config"``: the YAML dump, when the checkpointer was given ``cfg``). Loading such a
    checkpoint fills the missing, frozen weights from the model itself, i.e. from the pretrained
    DINOv2 the config loads, and refuses it if a missing weight is one that trains. A randomly
    initialised DINOv2 (``MODEL.DINOV2.RANDOM_INIT``) cannot be rebuilt, so for it checkpoints
    stay complete.

    Reading: every file goes through :func:`.weights_file.read_checkpoint_file` (``.pkl`` with an
    unpickler that only rebuilds numpy arrays, everything else with ``torch.load(weights_only=True)``);
    a missing or unreadable file raises :class:`.weights_file.WeightsFileError`.

    Writing (both modes): nothing is written if a floating-point tensor of the checkpoint (model,
    optimizer, scheduler, ...) is NaN or infinite (``FloatingPointError``); otherwise the file and
    then ``last_checkpoint`` are replaced atomically (:func:`.atomic_file.write_atomically`; a
    ``://`` save dir is written through ``path_manager`` as before).

    ``resume_or_load(path, resume=True)`` first removes temporary files of interrupted writes from
    the save dir (main process), then, if ``last_checkpoint`` names a file that is missing or
    unreadable, warns and resumes from the newest readable ``model_*.pth`` instead.

    Class names: given ``cfg``, ``save`` also stores ``thing_classes`` of ``cfg.DATASETS.TRAIN[0]``
    (when registered) under :data:`CLASS_NAMES`; :func:`class_names_of` reads them back.

    Published weights (:meth:`publish_weights`, e.g. the EMA of the weights): a checkpoint's
    ``"model"`` holds them in place of the model's own entries, which are kept under
    ``"training_weights"``. Loading uses ``"model"`` (evaluation, ``MODEL.WEIGHTS``, the tools),
    except a load that restores the training state (``--resume``: the load includes the
    checkpointer's checkpointables), which puts the training weights back.
    """

    def __init__(self, model, save_dir: str = "", *, trainable_only: bool = False, cfg=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        if trainable_only and cfg is not None and cfg.MODEL.DINOV2.RANDOM_INIT:
            logger.warning("SOLVER.CHECKPOINT_TRAINABLE_ONLY is ignored: with MODEL.DINOV2.RANDOM_INIT the frozen "
                           "backbone weights are random and could not be rebuilt, so checkpoints stay complete.")
            trainable_only = False
        self.trainable_only = trainable_only
        self.cfg = cfg
        self._probed = None  # (path, contents) of the file resume_or_load chose, read once
        self._published_weights: Optional[Callable[[], Dict[str, torch.Tensor]]] = None
        self._restoring_training_state = False  # set by load() for _load_model

    def publish_weights(self, source: Callable[[], Dict[str, torch.Tensor]]) -> None:
        """From now on a checkpoint's ``"model"`` holds ``source()``'s tensors (``{state-dict name:
        tensor}``, e.g. :meth:`.ema.ModelEMA.averaged_weights`) in place of the model's own entries
        of those names; the model's own go under ``"training_weights"`` for ``--resume``."""
        self._published_weights = source

    # ------------------------------------------------------------------------------------------
    # writing
    # ------------------------------------------------------------------------------------------
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if self.trainable_only:
            data = {"model": trainable_state_dict(self.model), "dinodet2_format": TRAINABLE_ONLY}
            if self.cfg is not None:
                data["config"] = self.cfg.dump()
        else:
            data = {"model": self.model.state_dict()}
        class_names = training_class_names(self.cfg) if self.cfg is not None else None
        if class_names:
            data[CLASS_NAMES] = class_names  # read back by class_names_of (tools/demo.py)
        if self._published_weights is not None:
            published = {k: v for k, v in self._published_weights().items() if k in data["model"]}
            data[TRAINING_WEIGHTS] = {k: data["model"][k] for k in published}
            data["model"] = {**data["model"], **published}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self._refuse_non_finite(data, save_file)
        if self.trainable_only:
            self.logger.info("Saving trainable-only checkpoint (%d tensors) to %s", len(data["model"]), save_file)
        else:
            self.logger.info("Saving checkpoint to %s", save_file)
        self._write_file(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        self._write_file(os.path.join(self.save_dir, "last_checkpoint"),
                         lambda f: f.write(last_filename_basename.encode()))

    def _write_file(self, path: str, write: Callable[[BinaryIO], None]) -> None:
        if "://" in self.save_dir:  # a remote path_manager folder: no local rename to rely on
            with self.path_manager.open(path, "wb") as f:
                write(f)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomically(path, write)

    def _refuse_non_finite(self, data: Dict, save_file: str) -> None:
        bad = find_non_finite_tensors(data)
        if not bad:
            return
        previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
        kept = (f"the previous checkpoint {previous} (named by last_checkpoint) is kept and --resume will continue "
                "from it" if previous else f"there is no earlier checkpoint in {self.save_dir} to resume from")
        raise FloatingPointError(
            f"Refusing to write checkpoint {save_file}: {len(bad)} tensors hold NaN or Inf values "
            f"(e.g. {', '.join(bad[:5])}), so the training has diverged. Nothing was written; {kept}. "
            "Lower SOLVER.BASE_LR or clip gradients harder (SOLVER.CLIP_GRADIENTS) before resuming.")

    # ------------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------------
    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        requested = kwargs.get("checkpointables", args[0] if args else None)  # None: all of them
        self._restoring_training_state = bool(self.checkpointables if requested is None else requested)
        try:
            if path and "://" not in path:
                # Detectron2 strips a "?matching_heuristics=True" query the same way before reading.
                require_weights_file(urlparse(path)._replace(query="").geturl())
            return super().load(path, *args, **kwargs)
        finally:
            self._probed = None
            self._restoring_training_state = False

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith((".pkl", ".pyth")):
            return self._read(filename)
        # Detectron2 reads the file with self._torch_load, wraps a bare state dict as {"model": ...}
        # and applies a "?matching_heuristics=True" query.
        return super()._load_file(filename)

    def _torch_load(self, f: str) -> Dict[str, Any]:
        return self._read(f)

    def _read(self, filename: str) -> Dict[str, Any]:
        probed, self._probed = self._probed, None
        if probed is not None and probed[0] == filename:
            return probed[1]
        return read_checkpoint_file(filename)

    # ------------------------------------------------------------------------------------------
    # resuming
    # ------------------------------------------------------------------------------------------
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        local_save_dir = bool(self.save_dir) and "://" not in self.save_dir
        if resume and local_save_dir and self.save_to_disk:
            remove_interrupted_writes(self.save_dir)
        if not (resume and local_save_dir and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        return self.load(self._newest_readable_checkpoint())

    def _checkpoints_newest_first(self) -> List[str]:
        """``model_<iter>.pth`` by iteration, ``model_final.pth`` first; ties by modification time."""
        def age(path):
            iteration = _PERIODIC_CHECKPOINT.match(os.path.basename(path)).group(1)
            return (math.inf if iteration == "final" else int(iteration), os.path.getmtime(path))

        files = [p for p in self.get_all_checkpoint_files() if _PERIODIC_CHECKPOINT.match(os.path.basename(p))]
        return sorted(files, key=age, reverse=True)

    def _probe(self, path: str) -> None:
        self._probed = (path, read_checkpoint_file(path))

    def _newest_readable_checkpoint(self) -> str:
        """The file last_checkpoint names if it can be read, else the newest readable checkpoint of
        the save dir (read once: its contents wait in ``self._probed`` for :meth:`load`)."""
        last = self.get_checkpoint_file()
        try:
            self._probe(last)
            return last
        except WeightsFileError as e:
            failures = {last: e}
            logger.warning("Cannot resume from %s (named by %s): %s", last,
                           os.path.join(self.save_dir, "last_checkpoint"), e)
        for candidate in self._checkpoints_newest_first():
            if os.path.normpath(candidate) == os.path.normpath(last):
                continue
            try:
                self._probe(candidate)
            except WeightsFileError as e:
                failures[candidate] = e
                logger.warning("Cannot resume from %s either: %s", candidate, e)
                continue
            logger.warning("Resuming from %s instead: the newest readable checkpoint in %s.", candidate, self.save_dir)
            return candidate
        listing = "\n".join(f"  {p}: {e}" for p, e in failures.items())
        raise WeightsFileError(
            f"Cannot resume from {self.save_dir}: no checkpoint in it can be read.\n{listing}\n"
            f"Put a good checkpoint back into {self.save_dir} (and its name into last_checkpoint), or delete "
            f"{os.path.join(self.save_dir, 'last_checkpoint')} to start again from MODEL.WEIGHTS.")

    # ------------------------------------------------------------------------------------------
    # loading into the model
    # ------------------------------------------------------------------------------------------
    def _load_model(self, checkpoint):
        training = checkpoint.pop(TRAINING_WEIGHTS, None)
        if isinstance(training, dict) and isinstance(checkpoint.get("model"), dict):
            if self._restoring_training_state:
                logger.info("Resuming with the checkpoint's training weights (%d tensors under '%s'; its 'model' "
                            "holds published weights, e.g. the EMA).", len(training), TRAINING_WEIGHTS)
                checkpoint["model"] = {**checkpoint["model"], **training}
            else:
                logger.info("Loading the checkpoint's 'model': published weights (e.g. the EMA) of %d tensors; "
                            "its training weights are only used by --resume.", len(training))
        if isinstance(checkpoint.get("model"), dict) and not checkpoint.get("matching_heuristics", False):
            _strip_prefix_if_present(checkpoint["model"], "module.")  # checkpoints of DDP-wrapped models
            if hasattr(self.model, "upgrade_state_dict"):  # keys renamed since the checkpoint was written
                checkpoint["model"] = self.model.upgrade_state_dict(checkpoint["model"])
            checkpoint["model"] = remap_lora_keys(checkpoint["model"], self.model.state_dict().keys())
            if checkpoint.get("dinodet2_format") == TRAINABLE_ONLY:
                checkpoint["model"] = self._complete_trainable_only(checkpoint["model"])
            # other NUM_CLASSES: class heads re-initialised (one warning); another backbone: refused
            reinitialised = drop_incompatible_weights(checkpoint["model"], self.model,
                                                      resuming=self._restoring_training_state)
            incompatible = super()._load_model(checkpoint)
            # already reported: not again among fvcore's "missing keys"
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in reinitialised]
            return incompatible
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
                "(torch.load(path, weights_only=True)['config']).")
        logger.info("Trainable-only checkpoint: %d frozen weights come from the pretrained backbone (%s).",
                    len(missing), "MODEL.DINOV2.NAME")
        return {**{k: own[k] for k in missing}, **state}
