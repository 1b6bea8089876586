"""Detectron2 DefaultTrainer with what dinodet2 needs to differ, and nothing more."""
import logging
import os
import weakref

import torch
from detectron2.data import DatasetFromList, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import DetrDatasetMapper, build_curriculum_sampler, check_datasets_exist, train_dataset_dicts
from .checkpoint import Dinodet2Checkpointer
from .curriculum import CurriculumHook
from .hooks import AdaLoraBudgetHook, TrainLoaderScheduleHook
from .optimizer import build_optimizer

__all__ = ["Trainer", "check_amp_available", "prepare_datasets", "strong_augmentation_off_iter", "wrap_ddp"]


def strong_augmentation_off_iter(cfg):
    """The iteration from which multi-image augmentations are off (None: never / none enabled)."""
    aug = cfg.INPUT.AUG
    last = int(aug.STRONG_OFF_LAST_ITERS)
    if last < 0:
        raise ValueError(f"INPUT.AUG.STRONG_OFF_LAST_ITERS must be >= 0, got {last}.")
    if last == 0 or not any(op.ENABLED for op in (aug.MOSAIC, aug.MIXUP, aug.CUTMIX, aug.COPY_PASTE)):
        return None
    return max(cfg.SOLVER.MAX_ITER - last, 0)


def check_amp_available(cfg) -> None:
    """Detectron2's AMPTrainer needs CUDA; say so clearly instead of its bare assertion."""
    if cfg.SOLVER.AMP.ENABLED and not (cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available()):
        raise ValueError(
            f"SOLVER.AMP.ENABLED=True needs a CUDA device (MODEL.DEVICE='{cfg.MODEL.DEVICE}', "
            f"torch.cuda.is_available()={torch.cuda.is_available()}). Detectron2's AMPTrainer only "
            "supports CUDA; set SOLVER.AMP.ENABLED=False to train in fp32 on this device."
        )


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
    LoRA-aware checkpointing and a clear AMP-on-CPU error."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__, except how the model is wrapped for DDP and
        # which checkpointer is used (it would otherwise pass device_ids to CPU modules).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        check_amp_available(cfg)
        prepare_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(cfg, model)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Dinodet2Checkpointer(model, cfg.OUTPUT_DIR, trainable_only=cfg.SOLVER.CHECKPOINT_TRAINABLE_ONLY,
                                                 cfg=cfg, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        # Inserted right after IterationTimer: before the writers (their scalars get written) and,
        # for CurriculumHook, before EvalHook (its after_train restores every query first).
        hooks = super().build_hooks()
        cfg = self.cfg
        if cfg.MODEL.LORA.ENABLED and cfg.MODEL.LORA.ADALORA.ENABLED:
            hooks.insert(1, AdaLoraBudgetHook(self.model, cfg.OUTPUT_DIR))
        curriculum = CurriculumHook.from_config(cfg, self.model)
        if curriculum is not None:
            hooks.insert(1, curriculum)
        strong_off_iter = strong_augmentation_off_iter(cfg)
        if strong_off_iter is not None or cfg.CURRICULUM.SAMPLING.ENABLED:
            hooks.insert(1, TrainLoaderScheduleHook(
                lambda start_iter, strong: self.build_train_loader(cfg, start_iter=start_iter,
                                                                   strong_augmentation=strong),
                strong_off_iter=strong_off_iter, curriculum_sampler=cfg.CURRICULUM.SAMPLING.ENABLED))
        return hooks

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0, strong_augmentation: bool = True):
        """Detectron2's train loader with :class:`DetrDatasetMapper` (multi-image augmentations
        draw from the same dataset dicts) and, with ``CURRICULUM.SAMPLING.ENABLED``, the
        curriculum sampler at iteration ``start_iter``. ``strong_augmentation=False`` switches
        the multi-image augmentations off (see :class:`TrainLoaderScheduleHook`)."""
        dicts = train_dataset_dicts(cfg)
        dataset = DatasetFromList(dicts, copy=False)  # serialised once; the mapper draws from it too
        mapper = DetrDatasetMapper(cfg, is_train=True, dataset_dicts=dataset)
        if mapper.multi_image is not None and not strong_augmentation:
            mapper.multi_image.active = False
            logging.getLogger(__name__).info("Multi-image augmentations are off from iteration %d on.", start_iter)
        sampler = None
        if cfg.CURRICULUM.SAMPLING.ENABLED:
            if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
                raise ValueError("CURRICULUM.SAMPLING.ENABLED replaces the training sampler; it cannot be combined "
                                 f"with DATALOADER.SAMPLER_TRAIN='{cfg.DATALOADER.SAMPLER_TRAIN}' (use 'TrainingSampler').")
            sampler = build_curriculum_sampler(cfg, dicts, start_iter=start_iter)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder)
