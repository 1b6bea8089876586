from .dinov2 import Dinov2Backbone, build_dinov2_backbone, load_dinov2_model
from .lora import (
    LORA_MODULE_FAMILIES,
    LoraSpec,
    inject_adalora,
    inject_lora,
    is_lora_parameter,
    merge_lora_,
    resolve_lora_target_modules,
)
