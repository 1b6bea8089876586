"""Class-aware merging of overlapping detections (the tiles of sliced inference see an object
more than once): non-maximum suppression or weighted box fusion."""
import torch
from torchvision.ops import batched_nms, box_iou

__all__ = ["MERGE_METHODS", "merge_detections", "nms_merge", "weighted_box_fusion"]

_IOU_ROWS = 4096  # boxes per IoU block in weighted_box_fusion: bounds its memory to 4096 x leaders


def nms_merge(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float):
    """Class-aware NMS (``torchvision.ops.batched_nms``): ``(boxes, scores, classes)`` of the kept
    detections, highest score first."""
    keep = batched_nms(boxes, scores, classes, iou_threshold)
    return boxes[keep], scores[keep], classes[keep]


def weighted_box_fusion(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float):
    """Class-aware weighted box fusion: ``(boxes, scores, classes)`` of one fused detection per
    cluster, highest score first.

    Clusters are those of greedy class-aware NMS: each detection joins the highest-scoring detection
    NMS keeps (its *leader*) of its class with an IoU above ``iou_threshold`` and a score at least its
    own -- the one that suppresses it in NMS. (Solovyev et al.'s WBF compares each box with the
    running fused box instead; the leader rule is order-free and vectorised.) A cluster's box is
    the score-weighted mean of its boxes; its score is the leader's (the cluster's maximum), so WBF
    and NMS rank the same clusters in the same order and only the coordinates differ: a cluster
    is not penalised for low-score duplicates, which a detector's long tail of detections produces
    around every object (WBF's mean score is made for agreeing ensemble members, not for those)."""
    if len(boxes) == 0:
        return boxes, scores, classes
    leaders = batched_nms(boxes, scores, classes, iou_threshold)  # highest score first
    cluster = torch.empty(len(boxes), dtype=torch.long, device=boxes.device)
    for start in range(0, len(boxes), _IOU_ROWS):
        rows = slice(start, start + _IOU_ROWS)
        joins = ((box_iou(boxes[rows], boxes[leaders]) > iou_threshold)
                 & (classes[rows, None] == classes[leaders][None])
                 & (scores[rows, None] <= scores[leaders][None]))
        joins[:, 0] |= ~joins.any(1)  # unreachable for iou_threshold < 1 (a leader joins itself)
        cluster[rows] = joins.int().argmax(1)  # first True: the highest-scoring such leader
    weights = scores.float()
    weighted_sum = torch.zeros(len(leaders), 4, dtype=torch.float32, device=boxes.device)
    weighted_sum.index_add_(0, cluster, boxes.float() * weights[:, None])
    weight_sum = torch.zeros(len(leaders), dtype=torch.float32, device=boxes.device).index_add_(0, cluster, weights)
    fused = weighted_sum / weight_sum.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    # zero-score clusters (weights all 0): keep the leader's box
    fused = torch.where(weight_sum[:, None] > 0, fused, boxes[leaders].float())
    return fused.to(boxes.dtype), scores[leaders], classes[leaders]


MERGE_METHODS = {"nms": nms_merge, "wbf": weighted_box_fusion}


def merge_detections(method: str, boxes, scores, classes, iou_threshold: float, max_detections: int):
    """Merge with ``method`` ("nms" or "wbf"), then keep the ``max_detections`` highest scores."""
    boxes, scores, classes = MERGE_METHODS[method](boxes, scores, classes, iou_threshold)
    return boxes[:max_detections], scores[:max_detections], classes[:max_detections]
