"""Training hooks of dinodet2."""
import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm

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
    """

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
