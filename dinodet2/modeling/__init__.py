"""Model components; importing this module registers them in Detectron2's registries."""
from .backbone import Dinov2Backbone, build_dinov2_backbone
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .meta_arch import DETR
from .neck import Dinov2SimpleFeaturePyramid, build_dinov2_sfp_backbone
