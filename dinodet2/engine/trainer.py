"""Detectron2 DefaultTrainer with what dinodet2 needs to differ, and nothing more."""
import logging
import os
import weakref

import torch
from detectron2.data import DatasetFromList, build_batch_data_loader, build_detection_test_loader
from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import DetrDatasetMapper, TrainDataSchedule, check_datasets_exist, eval_dataset_dicts, train_dataset_dicts
from ..data.train_stream import SeededMapDataset, TrainStream, aspect_ratio_groups, build_index_sampler
from ..inference.sliced import SlicedDetector, SlicedInference, check_sliced_config
from ..param_report import log_parameter_summary
from .checkpoint import Dinodet2Checkpointer
from .compilation import CompileMetricsHook, compile_model, compile_report
from .curriculum_schedules import CurriculumHook
from .ema import ModelEMA, add_model_ema
from .exact_resume import ExactResumeHook, resolve_run_seed
from .hooks import AdaLoraBudgetHook, TrainLoaderScheduleHook
from .nonfinite import NonFiniteStepGuard
from .optimizer import build_optimizer
from .precision import check_amp_available
from .train_step import build_step_trainer, check_accumulation_steps

__all__ = ["Trainer", "check_amp_available", "prepare_datasets", "wrap_ddp"]


def wrap_ddp(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel for >1 process; CPU (gloo) models are wrapped without device_ids."""
    kwargs = {"broadcast_buffers": False,
              "find_unused_parameters": cfg.SOLVER.DDP_FIND_UNUSED_PARAMETERS}
    if next(model.parameters()).device.type != "cuda":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def prepare_datasets(dataset_names) -> None:
    """Check (and for the embedded shapes dataset, generate) dataset files, main process first."""
    if comm.is_main_process():
        check_datasets_exist(dataset_names)
    comm.synchronize()
    if not comm.is_main_process():
        check_datasets_exist(dataset_names)


class Trainer(DefaultTrainer):
    """DefaultTrainer + COCOEvaluator, AdamW parameter groups, DETR's mapper, CPU-capable DDP,
    LoRA-aware checkpointing, fp16 / bf16 autocast (CPU: bf16) and gradient accumulation
    (:mod:`.train_step`), steps guarded against non-finite values
    (:mod:`.nonfinite`) and exact resume: the data stream, augmentations and per-step randomness
    are functions of the run's seed and the iteration (:mod:`dinodet2.data.train_stream`,
    :mod:`.exact_resume`)."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__, except how the model is wrapped for DDP and
        # which checkpointer is used (it would otherwise pass device_ids to CPU modules).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        check_amp_available(cfg)
        prepare_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        for name in cfg.DATASETS.TEST:  # evaluation runs late: check its datasets before iteration 0
            eval_dataset_dicts(cfg, name)
        if cfg.TEST.SLICED.ENABLED:
            check_sliced_config(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        check_accumulation_steps(cfg, comm.get_world_size())
        self.seed = resolve_run_seed(cfg)  # replaced by the checkpoint's on --resume
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg, seed=self.seed)
        model = wrap_ddp(cfg, model)
        # SOLVER.AMP precision and SOLVER.ACCUMULATION_STEPS micro-batches per step (.train_step)
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer, NonFiniteStepGuard.from_config(cfg),
                                           world_size=comm.get_world_size())
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Dinodet2Checkpointer(model, cfg.OUTPUT_DIR, trainable_only=cfg.SOLVER.CHECKPOINT_TRAINABLE_ONLY,
                                                 cfg=cfg, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        # DefaultTrainer's hooks live on this object, but the inner trainer's run_step calls
        # after_backward on its own (empty) hook list: route that one call to these hooks.
        self._trainer.after_backward = self.after_backward

    def build_hooks(self):
        # ExactResumeHook first (each step's seeds are set before any other hook runs); the others
        # before the writers (their scalars get written) and, for CurriculumHook, before EvalHook
        # (its after_train restores every query first).
        hooks = super().build_hooks()
        cfg = self.cfg
        hooks.insert(0, ExactResumeHook(lambda: self.seed, lambda seed: setattr(self, "seed", seed)))
        if compile_report(self.model) is not None:
            hooks.insert(1, CompileMetricsHook(self.model))
        if cfg.MODEL.LORA.ENABLED and cfg.MODEL.LORA.ADALORA.ENABLED:
            hooks.insert(1, AdaLoraBudgetHook(self.model, cfg.OUTPUT_DIR))
        curriculum = CurriculumHook.from_config(cfg, self.model)
        if curriculum is not None:
            hooks.insert(1, curriculum)
        hooks.insert(1, TrainLoaderScheduleHook(
            lambda start_iter: self.build_train_loader(cfg, start_iter=start_iter, seed=self.seed),
            TrainDataSchedule.from_config(cfg)))
        if cfg.SOLVER.EMA.ENABLED:  # EMA hook before the checkpointer and evaluation; EMA in checkpoints
            hooks = add_model_ema(hooks, ModelEMA.from_config(cfg, self.model), self.checkpointer,
                                  eval_with_ema=cfg.SOLVER.EMA.EVAL_WITH_EMA,
                                  checkpoint_model=cfg.SOLVER.EMA.CHECKPOINT_MODEL,
                                  evaluate=self._test_and_save_results, eval_period=cfg.TEST.EVAL_PERIOD,
                                  skipped_steps=lambda: self._trainer.guard.skipped_steps)
        return hooks

    def _test_and_save_results(self):
        """What DefaultTrainer.build_hooks' EvalHook runs (its local ``test_and_save_results``)."""
        self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    @classmethod
    def build_model(cls, cfg):
        """DefaultTrainer's model; logs its parameter summary (total / trainable per component and kind)
        and compiles ``MODEL.COMPILE.MODULES`` in place with ``MODEL.COMPILE.ENABLED``
        (:func:`.compilation.compile_model`; also for ``--eval-only``)."""
        model = super().build_model(cfg)
        log_parameter_summary(model)
        return compile_model(cfg, model)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0, seed=None):
        """The training loader from batch ``start_iter`` on, a function of ``seed`` (default:
        ``SEED``, or a random one shared by all ranks if it is negative) and the iteration only.

        Detectron2's batch loader over a :class:`TrainStream` of ``DATALOADER.SAMPLER_TRAIN``'s
        indices (or the curriculum sampler's), grouped by aspect ratio with
        ``DATALOADER.ASPECT_RATIO_GROUPING``, mapped by :class:`DetrDatasetMapper` with per-sample
        seeds (:class:`SeededMapDataset`; multi-image augmentations draw from the same dataset,
        on or off at ``start_iter`` as :class:`TrainDataSchedule` says)."""
        seed = resolve_run_seed(cfg) if seed is None else int(seed)
        dicts = train_dataset_dicts(cfg)
        dataset = DatasetFromList(dicts, copy=False)  # serialised once; the mapper draws from it too
        mapper = TrainDataSchedule.from_config(cfg).build_mapper(cfg, dataset, start_iter)
        world_size = comm.get_world_size()
        batch_size = cfg.SOLVER.IMS_PER_BATCH // world_size
        groups = aspect_ratio_groups(dicts) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
        stream = TrainStream(build_index_sampler(cfg, dicts, seed), batch_size, groups, start_iter=start_iter)
        return build_batch_data_loader(SeededMapDataset(dataset, mapper, seed), stream, cfg.SOLVER.IMS_PER_BATCH,
                                       aspect_ratio_grouping=False, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                       seed=seed)  # its own generator: starting it draws nothing from torch's

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with :class:`DetrDatasetMapper`, over the dataset's dicts checked
        by :func:`eval_dataset_dicts` (not empty; ``MODEL.DETR.NUM_CLASSES`` covers its categories).
        With ``TEST.SLICED.ENABLED`` the images are not resized: sliced inference resizes each tile."""
        extra = {"augmentations": []} if cfg.TEST.SLICED.ENABLED else {}
        return build_detection_test_loader(eval_dataset_dicts(cfg, dataset_name),
                                           mapper=DetrDatasetMapper(cfg, is_train=False, **extra),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer's evaluation; with ``TEST.SLICED.ENABLED`` through :class:`SlicedDetector`
        (tiles of the original images, :mod:`dinodet2.inference.sliced`)."""
        if cfg.TEST.SLICED.ENABLED:
            model = SlicedDetector(model, SlicedInference(cfg))
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder)
