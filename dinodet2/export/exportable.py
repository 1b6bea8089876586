"""A traceable single-image view of :class:`~dinodet2.modeling.meta_arch.DETR` for export.

Detectron2's list-of-dicts input and ``Instances`` output cannot be traced; this wrapper takes one
``[1, 3, H, W]`` float image in ``INPUT.FORMAT`` (0-255, the size the model should see, i.e. already
resized like ``ResizeShortestEdge`` would) and returns tensors. Everything ``DETR.forward`` does in
inference happens inside the graph: normalisation by ``PIXEL_MEAN`` / ``PIXEL_STD``, zero padding to
the backbone's ``size_divisibility`` with the padding mask, the transformer, and the top-k
post-processing (``TEST.DETECTIONS_PER_IMAGE``). Outputs are ``boxes`` ``[K, 4]`` XYXY in input
pixels, ``scores`` ``[K]`` and ``labels`` ``[K]`` (int64), sorted by descending score: the same
values as ``DETR.inference`` on that image (before ``detector_postprocess`` rescales to an original
size, which is a multiplication the caller does).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.structures import ImageList
from torchvision.ops import box_convert

__all__ = ["ExportableDETR"]


class ExportableDETR(nn.Module):
    """``forward(image [1, 3, H, W]) -> (boxes [K, 4], scores [K], labels [K])`` of an eval-mode DETR.

    Refused (clear error) for inference features whose output size depends on the data: an adaptive
    query count (``MODEL.DETR.ADAPTIVE_QUERIES``) and progressive decoding (query pruning), which
    drop queries per image.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "pruning", None) is not None:
            raise ValueError("Progressive decoding (query pruning) drops queries per image and cannot be "
                             "exported: set MODEL.DETR.QUERY_PRUNING.ENABLED False before exporting.")
        self.model = model.eval()

    def forward(self, image: torch.Tensor):
        model = self.model
        height, width = image.shape[-2], image.shape[-1]
        x = (image - model.pixel_mean) / model.pixel_std
        divisor = model.backbone.size_divisibility
        pad_h, pad_w = (-height) % divisor, (-width) % divisor
        x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros after normalisation, as ImageList.from_tensors
        rows = torch.arange(x.shape[-2], device=x.device)[:, None] >= height
        cols = torch.arange(x.shape[-1], device=x.device)[None, :] >= width
        mask = (rows | cols)[None]  # [1, Hp, Wp], True on padding
        outputs = model.forward_transformer(ImageList(x, [(height, width)]), mask)
        if "query_padding" in outputs:
            raise ValueError("An adaptive query count (padding queries) cannot be exported: set "
                             "MODEL.DETR.ADAPTIVE_QUERIES.ENABLED False before exporting.")
        logits, boxes = outputs["pred_logits"][0].float(), outputs["pred_boxes"][0].float()
        scores, query, labels = model.classification.detections(logits, model.detections_per_image)
        # the image size as graph values (torch.as_tensor(width) would freeze a dynamic size to a constant)
        size_wh = torch.stack([torch.ones_like(image[0, 0, 0]).sum(), torch.ones_like(image[0, 0, :, 0]).sum()])
        scale = torch.cat([size_wh, size_wh]).to(boxes)
        xyxy = box_convert(boxes[query], "cxcywh", "xyxy") * scale
        return xyxy, scores, labels
