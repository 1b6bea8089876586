"""dinodet2: DINOv2 + LoRA DETR-style detection for Detectron2.

Importing this package registers the backbones (``build_dinov2_backbone``,
``build_dinov2_sfp_backbone``), the ``DETR`` meta-architecture and the embedded ``shapes``
datasets in Detectron2's registries.
"""
from .config import add_dinodet2_config
from . import data, modeling  # noqa: F401  (registration side effects)

__version__ = "0.1.0"
__all__ = ["add_dinodet2_config", "__version__"]
