from .detr import DETR
