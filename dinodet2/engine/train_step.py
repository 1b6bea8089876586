"""One optimizer step from ``SOLVER.ACCUMULATION_STEPS`` micro-batches, in ``SOLVER.AMP``'s precision.

``SOLVER.IMS_PER_BATCH`` keeps Detectron2's meaning, the batch of one optimizer step (over all
processes); with accumulation each process runs it as ``ACCUMULATION_STEPS`` micro-batches of
``IMS_PER_BATCH / (world size x ACCUMULATION_STEPS)`` images, so only one micro-batch's activations
are alive at a time. The data loader still delivers the whole per-process batch of an iteration
(the same images, in the same order, as without accumulation), which :class:`AccumulatingTrainer`
cuts into micro-batches: the data stream, the per-iteration seeds and hence ``--resume``
(:mod:`.exact_resume`) do not depend on ``ACCUMULATION_STEPS`` (the whole batch's images are held
in host memory, its activations never). An iteration is one optimizer step:
``MAX_ITER``, the LR schedule, ``CHECKPOINT_PERIOD`` and ``EVAL_PERIOD`` count optimizer steps.

Each micro-batch's losses are divided by ``ACCUMULATION_STEPS`` before ``backward`` (gradients add
up to the mean over micro-batches), and :class:`~dinodet2.modeling.criterion.SetCriterion` divides
its box-normalised losses by the box count of the whole batch, not of the micro-batch
(:meth:`~dinodet2.modeling.criterion.SetCriterion.effective_batch`): the accumulated gradient is the
one of the whole batch in one forward, up to float rounding, for the class (focal / varifocal;
softmax ``ce`` only when all micro-batches have the same size and ``MODEL.DETR.NO_OBJECT_WEIGHT`` is
1), L1 and GIoU losses of the decoder layers and the two-stage proposals. What stays per
micro-batch: the number of denoising groups (a function of the largest object count in the batch),
``loss_token_fg``'s foreground-token count, per-batch padding to the largest image, and batch norm
statistics (none in the shipped models). Under DDP gradients are all-reduced once, in the backward
of the last micro-batch (``no_sync`` before). Then, once per optimizer step: the non-finite guard
(:mod:`.nonfinite`) checks the accumulated gradients, gradient clipping (inside ``optimizer.step``,
:mod:`.optimizer`) sees the accumulated (and, with fp16, unscaled) gradient, and the logged losses
are the mean over the micro-batches (``class_error`` over the whole batch).

:func:`build_step_trainer` keeps Detectron2's own trainers where they do the job
(``SimpleTrainer`` for fp32, ``AMPTrainer`` for CUDA autocast) and uses :class:`AccumulatingTrainer`
for accumulation and CPU autocast.
"""
import contextlib
import inspect
import time
from typing import Dict, List, Optional, Tuple, Type

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from ..modeling.criterion import SetCriterion
from .nonfinite import NonFiniteStepGuard, guarded_trainer_class
from .precision import MixedPrecision

__all__ = ["AccumulatingTrainer", "build_step_trainer", "check_accumulation_steps", "split_micro_batches",
           "step_trainer_class"]


def check_accumulation_steps(cfg, world_size: int) -> int:
    """``SOLVER.ACCUMULATION_STEPS``, checked against ``SOLVER.IMS_PER_BATCH`` and the world size."""
    steps, batch = int(cfg.SOLVER.ACCUMULATION_STEPS), int(cfg.SOLVER.IMS_PER_BATCH)
    if steps < 1:
        raise ValueError(f"SOLVER.ACCUMULATION_STEPS must be >= 1 (1: no accumulation), got {steps}.")
    if batch % (world_size * steps):
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={batch} is the batch of one optimizer step, split over {world_size} "
            f"process(es) and SOLVER.ACCUMULATION_STEPS={steps} micro-batches, so it must be a multiple of "
            f"{world_size * steps}: set SOLVER.IMS_PER_BATCH to a multiple of {world_size * steps} or choose "
            "ACCUMULATION_STEPS dividing IMS_PER_BATCH / world size.")
    return steps


def split_micro_batches(batch: List[dict], steps: int) -> List[List[dict]]:
    """``batch`` cut, in order, into ``steps`` micro-batches of equal size."""
    if len(batch) % steps:
        raise ValueError(f"A batch of {len(batch)} images cannot be split into SOLVER.ACCUMULATION_STEPS={steps} "
                         "equal micro-batches.")
    size = len(batch) // steps
    return [batch[i * size:(i + 1) * size] for i in range(steps)]


def _num_target_boxes(batch: List[dict]) -> int:
    return sum(len(x["instances"]) for x in batch if "instances" in x)


class AccumulatingTrainer(SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` step (forward, backward, ``after_backward``, ``_write_metrics``,
    ``optimizer.step``) over ``accumulation_steps`` micro-batches of each loaded batch, with the
    forward under ``precision``'s autocast and a ``GradScaler`` when it needs one (see the module
    docstring).

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        accumulation_steps: micro-batches per optimizer step (``SOLVER.ACCUMULATION_STEPS``).
        precision: the autocast of the forward, or None (fp32).
        grad_scaler: loss scaling; default: ``precision.grad_scaler()`` (fp16: one, bf16 / fp32: none).
    """

    def __init__(self, model, data_loader, optimizer, accumulation_steps: int = 1,
                 precision: Optional[MixedPrecision] = None, grad_scaler: Optional["torch.amp.GradScaler"] = None,
                 **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        if accumulation_steps < 1:
            raise ValueError(f"SOLVER.ACCUMULATION_STEPS must be >= 1, got {accumulation_steps}.")
        self.accumulation_steps = int(accumulation_steps)
        self.precision = precision
        self.grad_scaler = grad_scaler if grad_scaler is not None or precision is None else precision.grad_scaler()
        self._criteria = [m for m in model.modules() if isinstance(m, SetCriterion)]

    def run_step(self):
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        batch = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        self.optimizer.zero_grad()
        micro_batches = split_micro_batches(batch, self.accumulation_steps)
        with self._effective_batch(batch):
            loss_dict = self._accumulate_gradients(micro_batches)
        self.after_backward()
        self._write_metrics(loss_dict, data_time)  # the non-finite guard runs here (nonfinite.py)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _accumulate_gradients(self, micro_batches: List[List[dict]]) -> Dict[str, torch.Tensor]:
        """Forward + backward of every micro-batch; returns each loss's mean over them (detached)."""
        steps = len(micro_batches)
        totals: Dict[str, torch.Tensor] = {}
        for i, micro_batch in enumerate(micro_batches):
            # DDP all-reduces gradients in the backward of the last micro-batch only.
            sync = contextlib.nullcontext() if i == steps - 1 or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()
            with sync:
                with self.precision.autocast() if self.precision is not None else contextlib.nullcontext():
                    loss_dict = self.model(micro_batch)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values()) / steps
                (self.grad_scaler.scale(losses) if self.grad_scaler is not None else losses).backward()
            for name, value in loss_dict.items():
                share = value.detach() / steps
                totals[name] = totals[name] + share if name in totals else share
        return totals

    def _effective_batch(self, batch: List[dict]):
        """Every :class:`SetCriterion` of the model normalises by ``batch``'s box count (one batch
        split into micro-batches); nothing to do without accumulation."""
        stack = contextlib.ExitStack()
        if self.accumulation_steps > 1:
            num_boxes = _num_target_boxes(batch)
            for criterion in self._criteria:
                stack.enter_context(criterion.effective_batch(num_boxes, self.accumulation_steps))
        return stack

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def step_trainer_class(precision: Optional[MixedPrecision],
                       accumulation_steps: int) -> Tuple[Type[SimpleTrainer], dict]:
    """The trainer class (and its extra constructor arguments) that runs one optimizer step.

    Without accumulation Detectron2's own: ``SimpleTrainer`` in fp32, ``AMPTrainer`` for CUDA fp16
    (both as before these keys existed) and for CUDA bf16 when its constructor takes ``precision``
    (pinned sal-detectron2 0.7.2 and upstream main do; then with a disabled ``GradScaler``).
    Otherwise -- accumulation, CPU autocast (``AMPTrainer`` asserts CUDA), bf16 with an
    ``AMPTrainer`` without ``precision`` -- :class:`AccumulatingTrainer`.
    """
    if accumulation_steps == 1 and precision is None:
        return SimpleTrainer, {}
    if accumulation_steps == 1 and precision.device_type == "cuda":
        if precision.dtype == torch.float16:
            return AMPTrainer, {}
        if "precision" in inspect.signature(AMPTrainer.__init__).parameters:
            return AMPTrainer, {"precision": precision.dtype,
                                "grad_scaler": torch.amp.GradScaler("cuda", enabled=False)}
    return AccumulatingTrainer, {"accumulation_steps": accumulation_steps, "precision": precision}


def build_step_trainer(cfg, model, data_loader, optimizer, guard: NonFiniteStepGuard,
                       world_size: int = 1) -> SimpleTrainer:
    """The inner trainer of ``SOLVER.AMP`` and ``SOLVER.ACCUMULATION_STEPS`` (checked here, with a clear
    error), its steps guarded against non-finite values."""
    precision = MixedPrecision.from_config(cfg)
    trainer_cls, kwargs = step_trainer_class(precision, check_accumulation_steps(cfg, world_size))
    return guarded_trainer_class(trainer_cls)(model, data_loader, optimizer, guard=guard, **kwargs)
