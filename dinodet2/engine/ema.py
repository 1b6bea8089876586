"""Exponential moving average (EMA) of the model's weights (``SOLVER.EMA``), as every recent DETR
recipe keeps one (DINO / detrex, RF-DETR, D-FINE / DEIM, YOLOv5...): evaluation, the checkpoints'
``"model"`` and everything built on them use the averaged weights, training goes on with the live
ones.

What is averaged: the entries of ``model.state_dict()`` that can change in training, i.e. the
parameters that train (``requires_grad`` when the EMA starts) and every (persistent) buffer --
exactly what a trainable-only checkpoint holds (:func:`.checkpoint.trainable_state_dict`). Frozen
weights (the pretrained DINOv2 under LoRA) never change, so their average is themselves: keeping a
copy would cost memory (the whole ViT) for nothing, and the trainable-only checkpoint of an EMA
needs nothing else. Floating-point entries are averaged in float32 (float64 stays float64) whatever
the model's dtype (fp16 / bf16 weights included); integer buffers are copied at every update.

Decay with a warm-up ramp (YOLOv5's, also RF-DETR's and D-FINE's): the ``k``-th update uses
``d_k = DECAY * (1 - exp(-k / TAU))`` (``TAU`` 0: ``DECAY`` from the start), so the first averages
follow the fast-changing early weights instead of remembering the random initialisation for
~1 / (1 - DECAY) steps. ``k`` counts the updates (steps the optimizer took), not the iterations:
a step the non-finite guard skipped (:mod:`.nonfinite`) is not averaged in.

Checkpoints (``SOLVER.EMA.CHECKPOINT_MODEL``): the EMA state (update count + averages) is a
checkpointable ``"ema"`` of the trainer's checkpointer, so ``--resume`` continues the average
exactly. With ``"ema"`` (default) every checkpoint's ``"model"`` holds the averaged weights -- what
the evaluation during training reported -- so ``--eval-only``, fine-tuning from ``MODEL.WEIGHTS``,
``merge_lora.py`` and ``visualize_predictions.py`` use them with no extra option; the live weights
are kept under ``"training_weights"`` and put back by ``--resume`` only
(:meth:`.checkpoint.Dinodet2Checkpointer.publish_weights`). With ``"live"``, ``"model"`` holds
the live weights, as without EMA.
"""
import contextlib
import logging
import math
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer

__all__ = ["CHECKPOINT_MODEL_CHOICES", "EMAHook", "ModelEMA", "add_model_ema", "check_ema_config"]

logger = logging.getLogger(__name__)

# What a checkpoint's "model" holds with SOLVER.EMA.ENABLED (SOLVER.EMA.CHECKPOINT_MODEL).
CHECKPOINT_MODEL_CHOICES = ("ema", "live")


def _check_decay_and_tau(decay: float, tau: float) -> None:
    if not 0.0 < decay < 1.0:
        raise ValueError(f"SOLVER.EMA.DECAY must be in (0, 1), got {decay}. It is the weight of the old average "
                         "per update: 0.9997 (DINO / detrex) or 0.993 (RF-DETR, with TAU 100) are typical.")
    if not 0.0 <= tau < math.inf:
        raise ValueError(f"SOLVER.EMA.TAU must be >= 0 (updates of the decay's warm-up ramp; 0 = no ramp), got {tau}.")


def check_ema_config(cfg) -> None:
    """Reject ``SOLVER.EMA`` values that cannot work, naming the key and the fix."""
    c = cfg.SOLVER.EMA
    _check_decay_and_tau(float(c.DECAY), float(c.TAU))
    if c.CHECKPOINT_MODEL not in CHECKPOINT_MODEL_CHOICES:
        raise ValueError(f"SOLVER.EMA.CHECKPOINT_MODEL must be one of {CHECKPOINT_MODEL_CHOICES} (what a "
                         f"checkpoint's 'model' holds), got {c.CHECKPOINT_MODEL!r}.")
    if not isinstance(c.EVAL_WITH_EMA, bool):
        raise ValueError(f"SOLVER.EMA.EVAL_WITH_EMA must be True or False, got {c.EVAL_WITH_EMA!r}.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict`` names the checkpoints use: DDP's ``.module``, a
    ``torch.compile`` wrapper's ``._orig_mod`` (in-place compilation changes no name)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _average_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 (float64 kept) for floating-point entries; integer entries keep their dtype."""
    return torch.promote_types(tensor.dtype, torch.float32) if tensor.is_floating_point() else tensor.dtype


class ModelEMA:
    """The exponential moving average of a model's changing weights (see the module docstring).

    Args:
        model: the model (DDP-wrapped or compiled in place is fine: the unwrapped module is used).
        decay: ``DECAY``, the weight of the old average once the ramp is over.
        tau: ``TAU``, the ramp's time constant in updates (0: no ramp).

    The average starts when :meth:`reset` copies the current weights (``EMAHook.before_train``:
    after the checkpointer loaded ``MODEL.WEIGHTS``) or :meth:`load_state_dict` restores one
    (``--resume``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997, tau: float = 2000.0):
        _check_decay_and_tau(float(decay), float(tau))
        self.model = _unwrap(model)
        self.decay = float(decay)
        self.tau = float(tau)
        self.num_updates = 0
        self.average: Dict[str, torch.Tensor] = {}
        self._swapped_in = False

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> "ModelEMA":
        check_ema_config(cfg)
        return cls(model, decay=float(cfg.SOLVER.EMA.DECAY), tau=float(cfg.SOLVER.EMA.TAU))

    @property
    def initialized(self) -> bool:
        return bool(self.average)

    def decay_at(self, update: int) -> float:
        """The decay of the ``update``-th update (1-based)."""
        if self.tau == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-update / self.tau))

    # ------------------------------------------------------------------------------------------
    # the live weights
    # ------------------------------------------------------------------------------------------
    def _changing_entries(self) -> Dict[str, torch.Tensor]:
        """The model's state-dict entries that can change in training: trainable parameters and
        buffers (the live tensors themselves)."""
        state = self.model.state_dict(keep_vars=True)
        return {name: t for name, t in state.items() if not isinstance(t, nn.Parameter) or t.requires_grad}

    def _live(self) -> Dict[str, torch.Tensor]:
        """The live tensor of every averaged entry (looked up again each time: a module may
        replace a buffer object)."""
        state = self.model.state_dict(keep_vars=True)
        missing = [name for name in self.average if name not in state]
        if missing:
            raise KeyError(f"The model has no entries {missing[:5]} that the EMA averages; the model changed "
                           "after the EMA started (an EMA belongs to one model structure).")
        return {name: state[name] for name in self.average}

    # ------------------------------------------------------------------------------------------
    # averaging
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the model's current weights (update count 0)."""
        self.average = {name: t.detach().to(dtype=_average_dtype(t), copy=True)
                        for name, t in self._changing_entries().items()}
        self.num_updates = 0
        logger.info("EMA of %d weight tensors (%d values) started: decay %g, warm-up tau %g updates.",
                    len(self.average), sum(t.numel() for t in self.average.values()), self.decay, self.tau)

    @torch.no_grad()
    def update(self) -> float:
        """One update after an optimizer step: ``average = d * average + (1 - d) * weights`` with
        ``d`` = :meth:`decay_at` of this update. Returns ``d``."""
        if not self.initialized:
            raise RuntimeError("ModelEMA.update() before the EMA started: call reset() (or load_state_dict()) first.")
        if self._swapped_in:
            raise RuntimeError("ModelEMA.update() while the EMA weights are swapped into the model.")
        self.num_updates += 1
        d = self.decay_at(self.num_updates)
        live = self._live()
        averages, values = [], []
        for name, avg in self.average.items():
            if avg.is_floating_point():
                averages.append(avg)
                values.append(live[name].detach().to(avg.dtype))
            else:
                avg.copy_(live[name])
        if averages:
            torch._foreach_mul_(averages, d)
            torch._foreach_add_(averages, values, alpha=1.0 - d)
        return d

    def averaged_weights(self) -> Dict[str, torch.Tensor]:
        """The averages in the dtypes of the model's entries (what the model would hold)."""
        live = self._live()
        return {name: avg.to(dtype=live[name].dtype) for name, avg in self.average.items()}

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the model holds the EMA weights; after it, the live weights again,
        bit for bit (copied aside and back). Call it on every rank under DDP."""
        if not self.initialized:
            raise RuntimeError("The EMA has not started yet (no update, nothing loaded): nothing to swap in.")
        if self._swapped_in:
            raise RuntimeError("The EMA weights are already swapped into the model.")
        live = self._live()
        with torch.no_grad():
            kept = {name: t.detach().clone() for name, t in live.items()}
            for name, t in live.items():
                t.copy_(self.average[name])
        self._swapped_in = True
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(kept[name])
            self._swapped_in = False

    # ------------------------------------------------------------------------------------------
    # checkpointing
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"num_updates": self.num_updates, "average": dict(self.average)}

    @torch.no_grad()
    def load_state_dict(self, state: Dict) -> None:
        """Restore the average and the update count (``--resume``). Entries the model averages but
        the checkpoint lacks start from the model's current weights; entries the model no longer
        has are dropped; both with a warning."""
        saved = state["average"]
        changing = self._changing_entries()
        absent = [name for name in changing if name not in saved]
        dropped = [name for name in saved if name not in changing]
        if absent:
            logger.warning("The checkpoint's EMA lacks %d entries the model trains (e.g. %s): their average "
                           "starts from the current weights.", len(absent), absent[0])
        if dropped:
            logger.warning("The checkpoint's EMA has %d entries that the model does not train (e.g. %s): dropped.",
                           len(dropped), dropped[0])
        average = {}
        for name, t in changing.items():
            source = saved.get(name, t.detach())
            if source.shape != t.shape:
                raise ValueError(f"The checkpoint's EMA of '{name}' has shape {tuple(source.shape)}, the model's "
                                 f"weight {tuple(t.shape)}: the checkpoint is from another model.")
            average[name] = source.to(device=t.device, dtype=_average_dtype(t), copy=True)
        self.average = average
        self.num_updates = int(state["num_updates"])
        logger.info("EMA restored from the checkpoint: %d tensors after %d updates.", len(average), self.num_updates)


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every optimizer step, and starts it before training
    unless a resumed checkpoint restored it.

    Args:
        ema: the average.
        skipped_steps: the number of steps skipped so far without touching the weights (the
            non-finite guard's ``skipped_steps``); a step during which it grows is not averaged in.

    It must run after the hooks that change the weights in ``after_step`` (AdaLoRA's rank
    allocation) and before the checkpointer and the evaluation (:func:`add_model_ema` puts it there).
    """

    def __init__(self, ema: ModelEMA, skipped_steps: Optional[Callable[[], int]] = None):
        self.ema = ema
        self._skipped_steps = skipped_steps or (lambda: 0)
        self._skipped_before = 0

    def before_train(self):
        if not self.ema.initialized:
            self.ema.reset()

    def before_step(self):
        self._skipped_before = self._skipped_steps()

    def after_step(self):
        if self._skipped_steps() != self._skipped_before:
            return  # the optimizer did not step: nothing new to average
        decay = self.ema.update()
        self.trainer.storage.put_scalar("ema/decay", decay, smoothing_hint=False)


def add_model_ema(hooks: List[Optional[HookBase]], ema: ModelEMA, checkpointer, *, eval_with_ema: bool = True,
                  checkpoint_model: str = "ema", evaluate: Optional[Callable[[], Dict]] = None,
                  eval_period: int = 0, skipped_steps: Optional[Callable[[], int]] = None) -> List[HookBase]:
    """Wire ``ema`` into a trainer's hooks (Detectron2's ``DefaultTrainer.build_hooks`` order) and
    checkpointer:

    * an :class:`EMAHook` just before the first ``PeriodicCheckpointer`` / ``EvalHook``, so that
      the checkpoint and the evaluation of an iteration see its update;
    * with ``eval_with_ema``, every ``EvalHook`` is replaced by one that runs ``evaluate`` (the
      trainer's evaluation function) with the EMA weights swapped in, every ``eval_period``
      iterations and after training, as before;
    * ``ema`` becomes the checkpointable ``"ema"`` (saved with every checkpoint, restored by
      ``--resume``), and with ``checkpoint_model="ema"`` the checkpoints' ``"model"`` holds the
      averaged weights (the live ones under ``"training_weights"``, for ``--resume``).
    """
    if checkpoint_model not in CHECKPOINT_MODEL_CHOICES:
        raise ValueError(f"checkpoint_model must be one of {CHECKPOINT_MODEL_CHOICES}, got {checkpoint_model!r}.")
    hooks = list(hooks)
    checkpointer.add_checkpointable("ema", ema)
    if checkpoint_model == "ema":
        checkpointer.publish_weights(ema.averaged_weights)
    if eval_with_ema:
        if evaluate is None:
            raise ValueError("eval_with_ema needs the trainer's evaluation function (evaluate).")

        def evaluate_with_ema():
            with ema.swapped_in():
                return evaluate()

        hooks = [EvalHook(eval_period, evaluate_with_ema) if isinstance(h, EvalHook) else h for h in hooks]
    first = next((i for i, h in enumerate(hooks) if isinstance(h, (PeriodicCheckpointer, EvalHook))), len(hooks))
    hooks.insert(first, EMAHook(ema, skipped_steps))
    return hooks
