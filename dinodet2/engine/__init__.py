from .checkpoint import Dinodet2Checkpointer, class_names_of, remap_lora_keys, trainable_state_dict
from .predictor import build_predictor, model_class_names, stored_class_names
from .compilation import CompileMetricsHook, compile_model, compile_report
from .curriculum_schedules import CurriculumHook
from .ema import EMAHook, ModelEMA, add_model_ema
from .hooks import AdaLoraBudgetHook, TrainLoaderScheduleHook
from .optimizer import build_optimizer, build_param_groups
from .trainer import Trainer, check_amp_available, prepare_datasets, wrap_ddp
