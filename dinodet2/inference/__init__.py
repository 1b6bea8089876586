"""Inference strategies beyond one forward per image: sliced (tiled) inference for large images."""
from .box_merging import merge_detections, nms_merge, weighted_box_fusion
from .sliced import SlicedDetector, SlicedInference, SlicedPredictor, check_sliced_config
from .tiling import TileGrid, tile_starts

__all__ = ["SlicedDetector", "SlicedInference", "SlicedPredictor", "TileGrid", "check_sliced_config",
           "merge_detections", "nms_merge", "tile_starts", "weighted_box_fusion"]
