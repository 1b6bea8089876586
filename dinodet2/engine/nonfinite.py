"""Stop (or skip) a training step whose loss or gradients are not finite, before the optimizer
writes anything non-finite into the weights (``SOLVER.NONFINITE.*``).

Detectron2 raises ``FloatingPointError`` for a non-finite *loss* (on the main process only), but
not for non-finite *gradients* of a finite loss: those reach ``optimizer.step()``, the weights
become NaN, and the next periodic checkpoint -- the one ``--resume`` uses -- is poisoned.

:class:`NonFiniteStepGuard` decides, between ``backward()`` and ``optimizer.step()``, whether the
step may proceed. Under DDP the decision is collective (any rank's non-finite loss or gradient
stops or skips the step on every rank), so ranks never diverge. Policies:

* ``"stop"`` (default): raise ``FloatingPointError`` naming the iteration, the non-finite losses
  and parameters, and what to change. Nothing was stepped, so the last checkpoint stays good.
* ``"skip"``: drop the step's gradients (the optimizer leaves every weight and its state alone;
  with AMP, ``GradScaler`` skips the step and lowers its scale), log a warning, count the step in
  ``nonfinite/skipped_steps``, and stop as above after ``MAX_CONSECUTIVE_SKIPS`` skips in a row.

The check runs where Detectron2's trainers hand the step's loss dict over between ``backward`` and
``step``: ``_write_metrics`` (:func:`guarded_trainer_class`).
"""
import logging
import os
from typing import Dict, List, Optional, Type

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = ["NONFINITE_POLICIES", "NonFiniteStepGuard", "guarded_trainer_class"]

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")


def _nonfinite_names(names: List[str], values: List[torch.Tensor]) -> List[str]:
    """The names whose scalar value is NaN/inf; one host-device sync when all are finite."""
    if not values:
        return []
    finite = torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in values]))
    if bool(finite.all()):
        return []
    return [name for name, ok in zip(names, finite.tolist()) if not ok]


def _nonfinite_losses(loss_dict: Dict[str, torch.Tensor]) -> List[str]:
    return _nonfinite_names(list(loss_dict), [v.sum() for v in loss_dict.values()])


def _nonfinite_gradients(model: torch.nn.Module) -> List[str]:
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    # one fused norm per gradient: a gradient with a NaN/inf element has a NaN/inf norm
    norms = torch._foreach_norm([g.detach() for _, g in named]) if named else []
    return _nonfinite_names([n for n, _ in named], list(norms))


class NonFiniteStepGuard:
    """Decides whether a training step may reach ``optimizer.step()`` (see the module docstring).

    Args:
        policy: ``"stop"`` or ``"skip"`` (``SOLVER.NONFINITE.POLICY``).
        max_consecutive_skips: with ``"skip"``, stop after this many skipped steps in a row
            (``SOLVER.NONFINITE.MAX_CONSECUTIVE_SKIPS``).
        output_dir: where checkpoints are written, to name the one ``--resume`` would use.
    """

    def __init__(self, policy: str = "stop", max_consecutive_skips: int = 10, output_dir: str = ""):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"SOLVER.NONFINITE.POLICY must be one of {NONFINITE_POLICIES}, got '{policy}'.")
        if max_consecutive_skips < 1:
            raise ValueError(f"SOLVER.NONFINITE.MAX_CONSECUTIVE_SKIPS must be >= 1, got {max_consecutive_skips}.")
        self.policy = policy
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.output_dir = output_dir
        self.consecutive_skips = 0
        self.skipped_steps = 0

    @classmethod
    def from_config(cls, cfg) -> "NonFiniteStepGuard":
        c = cfg.SOLVER.NONFINITE
        return cls(c.POLICY, c.MAX_CONSECUTIVE_SKIPS, cfg.OUTPUT_DIR)

    def admit(self, model: torch.nn.Module, loss_dict: Dict[str, torch.Tensor], iteration: int,
              check_gradients: bool = True) -> bool:
        """True if the step may proceed. False: the step is skipped (gradients dropped unless
        ``check_gradients`` is False, i.e. AMP's ``GradScaler`` owns them and skips by itself).
        Raises ``FloatingPointError`` when the run must stop. Collective under DDP."""
        bad_losses = _nonfinite_losses(loss_dict)
        bad_grads = _nonfinite_gradients(model) if check_gradients else []
        local_bad = bool(bad_losses or bad_grads)
        if comm.get_world_size() > 1:
            reports = comm.all_gather((bad_losses, bad_grads))
            if not any(losses or grads for losses, grads in reports):
                self.consecutive_skips = 0
                return True
            bad_losses = sorted({n for losses, _ in reports for n in losses})
            bad_grads = sorted({n for _, grads in reports for n in grads})
        elif not local_bad:
            self.consecutive_skips = 0
            return True
        values = {k: float(v.detach().float().mean()) for k, v in loss_dict.items()}
        what = self._describe(iteration, bad_losses, bad_grads, values)
        if self.policy == "stop":
            raise FloatingPointError(f"{what} Training stopped before the optimizer step, so no weight became "
                                     f"non-finite. {self._resume_hint()} {self._remedy()}")
        self.consecutive_skips += 1
        self.skipped_steps += 1
        if self.consecutive_skips > self.max_consecutive_skips:
            raise FloatingPointError(
                f"{what} This is the {self.consecutive_skips}th non-finite step in a row (SOLVER.NONFINITE."
                f"MAX_CONSECUTIVE_SKIPS={self.max_consecutive_skips}): training stopped. {self._resume_hint()} "
                f"{self._remedy()}")
        if check_gradients:
            for p in model.parameters():
                p.grad = None
        logger.warning("%s Step skipped (%d in a row, %d in this run; SOLVER.NONFINITE.POLICY=skip).",
                       what, self.consecutive_skips, self.skipped_steps)
        try:
            get_event_storage().put_scalar("nonfinite/skipped_steps", self.skipped_steps, smoothing_hint=False)
        except AssertionError:  # no EventStorage outside a training loop
            pass
        return False

    @staticmethod
    def _describe(iteration, bad_losses, bad_grads, values) -> str:
        parts = [f"Non-finite values at iteration {iteration}:"]
        if bad_losses:
            parts.append(f"losses {', '.join(bad_losses)} (loss dict: {values});")
        if bad_grads:
            shown = ", ".join(bad_grads[:5]) + (f" and {len(bad_grads) - 5} more" if len(bad_grads) > 5 else "")
            parts.append(f"gradients of {len(bad_grads)} parameters ({shown}).")
        return " ".join(parts)

    def _resume_hint(self) -> str:
        path = os.path.join(self.output_dir, "last_checkpoint") if self.output_dir else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                name = f.read().strip()
            return f"The last checkpoint, {os.path.join(self.output_dir, name)}, is what --resume continues from."
        return "No checkpoint was written yet."

    @staticmethod
    def _remedy() -> str:
        return ("Usual causes: a learning rate too high for this batch size (SOLVER.BASE_LR), no gradient "
                "clipping (SOLVER.CLIP_GRADIENTS.ENABLED), or a bad sample near this iteration. "
                "SOLVER.NONFINITE.POLICY skip skips such steps instead of stopping.")


def guarded_trainer_class(base: Type[SimpleTrainer]) -> Type[SimpleTrainer]:
    """``base`` (``SimpleTrainer``, ``AMPTrainer`` or :class:`~.train_step.AccumulatingTrainer`) whose
    steps pass a :class:`NonFiniteStepGuard` (the ``guard`` constructor argument) between ``backward``
    and ``optimizer.step`` (with gradient accumulation: once, on the accumulated gradients)."""

    class Guarded(base):
        def __init__(self, *args, guard: Optional[NonFiniteStepGuard] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.guard = guard or NonFiniteStepGuard()

        def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
            # Called by run_step after backward() and before optimizer.step(). With fp16 AMP, GradScaler
            # handles non-finite (scaled) gradients itself; only the loss is checked then (a disabled
            # scaler, bf16 in AMPTrainer, does not: the gradients are checked).
            scaler = getattr(self, "grad_scaler", None)
            scaled = scaler is not None and scaler.is_enabled()
            if self.guard.admit(self.model, loss_dict, self.iter if iter is None else iter, check_gradients=not scaled):
                super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)

    Guarded.__name__ = Guarded.__qualname__ = f"NonFiniteGuarded{base.__name__}"
    return Guarded
