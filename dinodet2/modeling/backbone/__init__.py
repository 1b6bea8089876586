from .dinov2 import Dinov2Backbone, build_dinov2_backbone, load_dinov2_model
from .lora import LORA_MODULE_FAMILIES, inject_lora, is_lora_parameter, resolve_lora_target_modules
