"""Training hooks of dinodet2."""
import json
import logging
import os
from typing import Callable

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.train_schedule import TrainDataSchedule
from ..modeling.backbone.lora import adalora_rank_allocation, find_adalora_tuner

logger = logging.getLogger(__name__)


class AdaLoraBudgetHook(HookBase):
    """Calls AdaLoRA's budget update every iteration with the global step.

    ``peft`` wants ``update_and_allocate(step)`` after ``backward`` and before the next
    ``zero_grad``: Detectron2's trainers zero the gradients at the start of ``run_step``, so
    ``after_step`` still sees this step's gradients (identical on every rank under DDP, so every
    rank prunes the same singular values). The total rank is logged as ``adalora/total_rank``;
    after training the final allocation per module is logged and written to
    ``OUTPUT_DIR/adalora_rank_allocation.json``.

    peft keeps AdaLoRA's state outside the model's state dict: the ``RankAllocator``'s running
    averages of every adapter weight's importance and uncertainty, and the final rank pattern (fixed
    ``TFINAL`` steps before the end and re-applied every step after). The hook's ``state_dict``
    carries both, so the trainer's checkpoint holds them: a resumed run prunes as the uninterrupted
    one would, and one resumed in the final phase has its pattern (peft fails without it).
    """

    _STATISTICS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model, output_dir: str, log_period: int = 20):
        self.model = model.module if hasattr(model, "module") else model
        self.tuner = find_adalora_tuner(self.model)
        if self.tuner is None:
            raise ValueError("AdaLoraBudgetHook needs a model built with MODEL.LORA.ADALORA.ENABLED=True.")
        self.output_dir = output_dir
        self.log_period = log_period

    def after_step(self):
        self.tuner.update_and_allocate(self.trainer.iter)
        if (self.trainer.iter + 1) % self.log_period == 0:
            self.trainer.storage.put_scalar("adalora/total_rank", sum(adalora_rank_allocation(self.model).values()),
                                            smoothing_hint=False)

    @property
    def _adapter_config(self):
        return self.tuner.peft_config[self.tuner.trainable_adapter_name]

    def state_dict(self):
        allocator = self.tuner.rankallocator
        state = {name: {k: v.detach().clone() for k, v in getattr(allocator, name).items()}
                 for name in self._STATISTICS}
        pattern = self._adapter_config.rank_pattern
        state["rank_pattern"] = None if pattern is None else {k: list(v) for k, v in pattern.items()}
        return state

    def load_state_dict(self, state_dict):
        missing = [name for name in self._STATISTICS if name not in state_dict]
        if missing:
            raise KeyError(f"AdaLoRA statistics {missing} missing from the checkpoint's hook state; "
                           f"it holds {sorted(state_dict)}.")
        parameters = dict(self.tuner.model.named_parameters())  # the names peft's allocator uses
        unknown = sorted(set().union(*(state_dict[name] for name in self._STATISTICS)) - set(parameters))
        if unknown:
            raise ValueError(f"The checkpoint's AdaLoRA statistics name parameters this model does not have "
                             f"(e.g. {unknown[:3]}): it was trained with other MODEL.LORA settings.")
        allocator = self.tuner.rankallocator
        for name in self._STATISTICS:  # the checkpointer loads on the CPU: back to each weight's device
            setattr(allocator, name, {k: v.to(parameters[k].device) for k, v in state_dict[name].items()})
        pattern = state_dict.get("rank_pattern")
        self._adapter_config.rank_pattern = None if pattern is None else {k: list(v) for k, v in pattern.items()}

    def after_train(self):
        ranks = adalora_rank_allocation(self.model)
        iterations = self.trainer.iter  # Detectron2 sets iter = max_iter before after_train
        logger.info("AdaLoRA rank allocation after %d iterations (total %d over %d modules):\n%s",
                    iterations, sum(ranks.values()), len(ranks),
                    "\n".join(f"  {name}: {rank}" for name, rank in ranks.items()))
        if comm.is_main_process() and self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "adalora_rank_allocation.json"), "w") as f:
                json.dump({"iteration": iterations, "ranks": ranks}, f, indent=2)


class TrainLoaderScheduleHook(HookBase):
    """Keeps the training data loader in step with the iteration and its
    :class:`~dinodet2.data.train_schedule.TrainDataSchedule`: starts it at the resumed iteration and
    replaces it when the schedule switches the strong multi-image augmentations off.

    ``build_loader(start_iter)`` builds the loader from batch ``start_iter`` on, in that iteration's
    state (a function of the run's seed and the iteration, so a resumed run sees the batches an
    uninterrupted one sees). It is handed to Detectron2's ``SimpleTrainer.reset_data_loader`` (new
    workers) when training resumes at iteration > 0, before the first step, and at the first
    iteration whose state differs from the current loader's. With a switch-off iteration, the
    state is logged as ``data/strong_augmentation`` (1 on, 0 off).
    """

    def __init__(self, build_loader: Callable[[int], object], schedule: TrainDataSchedule):
        self.build_loader = build_loader
        self.schedule = schedule
        self._loader_start = 0  # the iteration the current loader was built for

    def _reset(self, iteration: int) -> None:
        logger.info("Rebuilding the training data loader at iteration %d (strong multi-image augmentation %s).",
                    iteration, "on" if self.schedule.strong_augmentation_at(iteration) else "off")
        self.trainer._trainer.reset_data_loader(lambda: self.build_loader(iteration))
        self._loader_start = iteration

    def before_train(self):
        self._loader_start = 0  # the trainer builds its first loader for iteration 0
        if self.trainer.iter > 0:
            self._reset(self.trainer.iter)

    def before_step(self):
        iteration = self.trainer.iter
        strong = self.schedule.strong_augmentation_at(iteration)
        if strong != self.schedule.strong_augmentation_at(self._loader_start):
            self._reset(iteration)
        if self.schedule.strong_off_iter is not None:
            self.trainer.storage.put_scalar("data/strong_augmentation", float(strong), smoothing_hint=False)
