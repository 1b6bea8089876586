"""DETR meta-architecture for Detectron2: backbone (+neck) -> transformer -> set prediction."""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torchvision.ops import box_convert

from ...config import IMAGENET_PIXEL_MEAN_RGB
from ..backbone.lora import adalora_orthogonal_regularization, find_adalora_tuner, trainable_parameter_report
from ..criterion import SetCriterion
from ..denoising import DenoisingGenerator, DenoisingQueries
from ..matcher import CLASS_LOSSES, HungarianMatcher
from ..transformer import DetrTransformer, PositionEmbeddingSine

logger = logging.getLogger(__name__)

__all__ = ["DETR", "MLP"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@META_ARCH_REGISTRY.register()
class DETR(nn.Module):
    """DETR with a Detectron2 backbone, Hungarian matching and Detectron2 inputs/outputs.

    Training input: Detectron2's list of dicts with ``image`` (CHW, ``INPUT.FORMAT``) and
    ``instances`` (``gt_boxes`` absolute XYXY in the image's resized frame, ``gt_classes``
    contiguous ids). Output in training: a dict of weighted losses; in inference:
    ``[{"instances": Instances}]`` in the original image's coordinates.

    :meth:`set_num_active_queries` restricts the decoder to its first ``k`` matching queries
    (curriculum query ramp-up, :class:`dinodet2.engine.curriculum.CurriculumHook`), in training
    and inference alike; the default is all ``num_queries``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        transformer: DetrTransformer,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int = 100,
        in_features: Sequence[str] = (),
        class_loss: str = "ce",
        deep_supervision: bool = True,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        detections_per_image: int = 100,
        denoising: Optional[DenoisingGenerator] = None,
    ):
        super().__init__()
        shapes = backbone.output_shape()
        in_features = list(in_features) or sorted(shapes, key=lambda f: shapes[f].stride)
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.DETR.IN_FEATURES {missing} are not produced by the backbone "
                             f"(it outputs {list(shapes)}).")
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"MODEL.DETR.CLASS_LOSS must be one of {CLASS_LOSSES}, got '{class_loss}'.")
        if denoising is not None and not transformer.uses_reference_boxes:
            raise ValueError("MODEL.DETR.DN.ENABLED needs reference-box queries: set MODEL.DETR.ANCHOR_QUERIES "
                             "or MODEL.DETR.TWO_STAGE to True.")
        hidden = transformer.d_model
        self.backbone = backbone
        self.in_features = in_features
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self._num_active_queries: Optional[int] = None  # None: all num_queries
        self.class_loss = class_loss
        self.deep_supervision = deep_supervision
        self.detections_per_image = detections_per_image

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(shapes[f].channels, hidden, kernel_size=1), nn.GroupNorm(32, hidden))
            for f in in_features
        )
        self.level_embed = nn.Parameter(torch.zeros(len(in_features), hidden)) if len(in_features) > 1 else None
        self.position_encoding = PositionEmbeddingSine(hidden // 2, normalize=True)
        # Seed DETR learns its positional queries here; anchor / two-stage queries live in the transformer.
        learned = transformer.query_type == "learned"
        self.query_embed = nn.Parameter(torch.empty(num_queries, hidden)) if learned else None
        self.denoising = denoising
        num_logits = num_classes + 1 if class_loss == "ce" else num_classes
        self.class_embed = nn.Linear(hidden, num_logits)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        self._reset_parameters()

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        log_parameter_summary(self)

    def _reset_parameters(self):
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        if self.query_embed is not None:
            nn.init.normal_(self.query_embed)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        if self.class_loss != "ce":  # sigmoid heads: prior probability 0.01 for every class (RetinaNet init)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DETR
        _check_pixel_statistics(cfg)
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        num_levels = len(c.IN_FEATURES) or len(backbone.output_shape())
        sigmoid = c.CLASS_LOSS != "ce"
        if c.TWO_STAGE and not sigmoid:
            raise ValueError("MODEL.DETR.TWO_STAGE=True selects proposals by sigmoid scores and needs "
                             "MODEL.DETR.CLASS_LOSS='focal' or 'varifocal'.")
        query_type = "two_stage" if c.TWO_STAGE else ("anchor" if c.ANCHOR_QUERIES else "learned")
        transformer = DetrTransformer(
            d_model=c.HIDDEN_DIM, nhead=c.NHEADS, num_encoder_layers=c.ENC_LAYERS,
            num_decoder_layers=c.DEC_LAYERS, dim_feedforward=c.DIM_FEEDFORWARD, dropout=c.DROPOUT,
            normalize_before=c.PRE_NORM, attention_dropout=c.ATTENTION_DROPOUT,
            activation_dropout=c.ACTIVATION_DROPOUT, num_queries=c.NUM_QUERIES, query_type=query_type,
            num_levels=num_levels, deformable_encoder=c.DEFORMABLE.ENCODER,
            deformable_decoder=c.DEFORMABLE.DECODER, num_points=c.DEFORMABLE.NUM_POINTS,
            deformable_heads=c.DEFORMABLE.NHEADS or None, refine_boxes=c.ITERATIVE_REFINEMENT,
            look_forward_twice=c.LOOK_FORWARD_TWICE, mixed_query_selection=c.MIXED_QUERY_SELECTION,
            num_logits=c.NUM_CLASSES,
        )
        denoising = None
        if c.DN.ENABLED:
            denoising = DenoisingGenerator(
                c.NUM_CLASSES, c.HIDDEN_DIM, num_queries=c.DN.NUM_QUERIES, label_noise_ratio=c.DN.LABEL_NOISE_RATIO,
                box_noise_scale=c.DN.BOX_NOISE_SCALE, contrastive=c.DN.CONTRASTIVE,
            )
        matcher = HungarianMatcher(cost_class=c.COST_CLASS, cost_bbox=c.COST_BBOX, cost_giou=c.COST_GIOU,
                                   class_loss=c.CLASS_LOSS, focal_alpha=c.FOCAL_ALPHA, focal_gamma=c.FOCAL_GAMMA)
        criterion = SetCriterion(
            c.NUM_CLASSES, matcher, class_loss=c.CLASS_LOSS, no_object_weight=c.NO_OBJECT_WEIGHT,
            focal_alpha=c.FOCAL_ALPHA, focal_gamma=c.FOCAL_GAMMA, varifocal_alpha=c.VARIFOCAL_ALPHA,
            class_weight=c.CLASS_WEIGHT, l1_weight=c.L1_WEIGHT, giou_weight=c.GIOU_WEIGHT,
        )
        return {
            "backbone": backbone,
            "transformer": transformer,
            "criterion": criterion,
            "num_classes": c.NUM_CLASSES,
            "num_queries": c.NUM_QUERIES,
            "in_features": c.IN_FEATURES,
            "class_loss": c.CLASS_LOSS,
            "deep_supervision": c.DEEP_SUPERVISION,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "denoising": denoising,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_active_queries(self) -> int:
        """Number of matching queries the decoder uses (``num_queries`` unless restricted)."""
        return self.num_queries if self._num_active_queries is None else self._num_active_queries

    def set_num_active_queries(self, k: Optional[int]) -> None:
        """Use only the first ``k`` matching queries (two-stage: the top-``k`` proposals) from now
        on, in training and inference; ``None`` restores all ``num_queries``. Denoising queries are
        not affected. All query parameters stay in the autograd graph (they are sliced), so
        DistributedDataParallel needs no ``find_unused_parameters``."""
        if k is not None and not 1 <= k <= self.num_queries:
            raise ValueError(f"The number of active queries must be in [1, MODEL.DETR.NUM_QUERIES="
                             f"{self.num_queries}] (or None for all), got {k}.")
        self._num_active_queries = k

    # ------------------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise, pad to the backbone's divisibility; return images and a padding mask."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility,
                                        padding_constraints=self.backbone.padding_constraints)
        mask = torch.ones(images.tensor.shape[0], *images.tensor.shape[-2:], dtype=torch.bool, device=self.device)
        for m, (h, w) in zip(mask, images.image_sizes):
            m[:h, :w] = False
        return images, mask

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """GT boxes as (cx, cy, w, h) normalised by each image's own unpadded size (+ per-box
        loss ``weights`` when the instances carry ``gt_weights``)."""
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor.float() / scale, "xyxy", "cxcywh")
            target = {"labels": inst.gt_classes, "boxes": boxes}
            if inst.has("gt_weights"):  # MixUp label weighting (dinodet2.data.multi_image)
                target["weights"] = inst.gt_weights.float()
            targets.append(target)
        return targets

    def forward_transformer(self, images: ImageList, mask: torch.Tensor,
                            denoising: Optional[DenoisingQueries] = None) -> Dict:
        """Backbone -> flattened multi-level tokens -> transformer -> class / box predictions.

        With ``denoising`` queries, their predictions are returned apart in ``"dn_outputs"``.
        """
        features = self.backbone(images.tensor)
        srcs, level_masks, poss = [], [], []
        for lvl, (name, proj) in enumerate(zip(self.in_features, self.input_proj)):
            feat = features[name]
            m = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
            pos = self.position_encoding(m).to(feat.dtype)
            if self.level_embed is not None:
                pos = pos + self.level_embed[lvl].view(1, -1, 1, 1).to(feat.dtype)
            srcs.append(proj(feat).flatten(2).transpose(1, 2))
            level_masks.append(m)
            poss.append(pos.flatten(2).transpose(1, 2))
        src, pos = torch.cat(srcs, 1), torch.cat(poss, 1)
        flat_mask = torch.cat([m.flatten(1) for m in level_masks], 1)
        spatial_shapes = torch.tensor([m.shape[-2:] for m in level_masks], dtype=torch.int64, device=src.device)
        states, boxes, enc_outputs = self.transformer(
            src, flat_mask, pos, level_masks, spatial_shapes, self.bbox_embed,
            query_embed=self.query_embed, denoising=denoising, num_queries=self._num_active_queries,
        )
        if boxes is None:  # seed DETR: boxes predicted directly
            boxes = self.bbox_embed(states).sigmoid()
        logits = self.class_embed(states)
        num_dn = denoising.num_queries if denoising is not None else 0
        outputs = self._layer_outputs(logits[:, :, num_dn:], boxes[:, :, num_dn:])
        if enc_outputs is not None:
            outputs["enc_outputs"] = enc_outputs
        if denoising is not None:
            outputs["dn_outputs"] = self._layer_outputs(logits[:, :, :num_dn], boxes[:, :, :num_dn])
            outputs["dn_outputs"].update(indices=denoising.match_indices(), num_groups=denoising.num_groups)
        return outputs

    def _layer_outputs(self, logits: torch.Tensor, boxes: torch.Tensor) -> Dict:
        """``[L, B, Q, *]`` per-layer predictions -> final layer + ``aux_outputs``."""
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.deep_supervision:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return outputs

    def forward(self, batched_inputs: List[Dict]):
        images, mask = self.preprocess_image(batched_inputs)
        if not self.training:
            outputs = self.forward_transformer(images, mask)
            results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
            processed = []
            for result, x, size in zip(results, batched_inputs, images.image_sizes):
                height, width = x.get("height", size[0]), x.get("width", size[1])
                processed.append({"instances": detector_postprocess(result, height, width)})
            return processed
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("DETR training needs 'instances' in every input dict (use a dataset mapper "
                             "with annotations).")
        targets = self.prepare_targets(batched_inputs, images)
        denoising = self.denoising(targets) if self.denoising is not None else None
        outputs = self.forward_transformer(images, mask, denoising)
        losses = self.criterion(outputs, targets)
        if "_adalora_tuner" not in self.__dict__:  # looked up once; kept outside the module tree
            self.__dict__["_adalora_tuner"] = find_adalora_tuner(self.backbone)
        tuner = self.__dict__["_adalora_tuner"]
        if tuner is not None:
            weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
            regularization = adalora_orthogonal_regularization(tuner)
            if weight > 0 and regularization is not None:
                losses["loss_adalora_orth"] = weight * regularization
        if self.denoising is not None and denoising is None:
            # A batch without objects leaves the label embedding unused; a zero-valued term keeps
            # it in the graph so DistributedDataParallel still sees a gradient for it.
            losses["loss_class"] = losses["loss_class"] + 0.0 * self.denoising.label_embed.weight.sum()
        return losses

    def inference(self, logits: torch.Tensor, boxes: torch.Tensor,
                  image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        """Top-k detections per image in the resized (unpadded) image frame, absolute XYXY."""
        results = []
        for logit, box, (h, w) in zip(logits.float(), boxes.float(), image_sizes):
            if self.class_loss == "ce":  # softmax: best class per query
                scores, labels = logit.softmax(-1)[:, :-1].max(-1)
                k = min(self.detections_per_image, scores.numel())
                scores, query = scores.topk(k)
                labels = labels[query]
            else:  # sigmoid heads: top-k over queries x classes
                prob = logit.sigmoid().flatten()
                k = min(self.detections_per_image, prob.numel())
                scores, flat = prob.topk(k)
                query, labels = flat // self.num_classes, flat % self.num_classes
            xyxy = box_convert(box[query], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], device=box.device)
            result = Instances((h, w))
            result.pred_boxes = Boxes(xyxy)
            result.scores = scores
            result.pred_classes = labels
            results.append(result)
        return results


def _check_pixel_statistics(cfg) -> None:
    """Catch the common mistake of ImageNet RGB statistics with BGR input (or vice versa)."""
    mean = [round(v, 3) for v in cfg.MODEL.PIXEL_MEAN]
    rgb = [round(v, 3) for v in IMAGENET_PIXEL_MEAN_RGB]
    expected = rgb if cfg.INPUT.FORMAT == "RGB" else rgb[::-1]
    if mean != expected and mean == expected[::-1]:
        raise ValueError(
            f"MODEL.PIXEL_MEAN={cfg.MODEL.PIXEL_MEAN} is in the reverse channel order of "
            f"INPUT.FORMAT='{cfg.INPUT.FORMAT}'. Use MODEL.PIXEL_MEAN={expected} (and reverse PIXEL_STD too)."
        )


def log_parameter_summary(model: nn.Module) -> None:
    """Log total / trainable parameters, overall and per top-level component."""
    rows = []
    for name, child in model.named_children():
        total = sum(p.numel() for p in child.parameters())
        if total:
            rows.append((name, total, sum(p.numel() for p in child.parameters() if p.requires_grad)))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"{n:<18s} {t:>14,d} {tr:>14,d}" for n, t, tr in rows]
    kinds = {k: v for k, v in trainable_parameter_report(model).items() if k not in ("total", "trainable")}
    lines.append("trainable by kind: " + ", ".join(f"{k} {v:,}" for k, v in kinds.items()))
    logger.info(
        "Parameters of %s: total %s, trainable %s (%.2f%%)\n%-18s %14s %14s\n%s", type(model).__name__,
        f"{total:,}", f"{trainable:,}", 100.0 * trainable / max(total, 1), "module", "total", "trainable",
        "\n".join(lines),
    )
