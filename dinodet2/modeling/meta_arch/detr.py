"""DETR meta-architecture for Detectron2: backbone (+neck) -> transformer -> set prediction."""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torchvision.ops import box_convert

from ...config import IMAGENET_PIXEL_MEAN_RGB
from ..classification import Classification, class_dependent_parameter_names, classification_from_config
from ..criterion import SetCriterion
from ..denoising import DenoisingGenerator, DenoisingQueries
from ..refinement import CascadeRefinement
from ..transformer import DetrTransformer, MultiLevelTokens, PositionEmbeddingSine
from ..training_signals import SignalInputs, build_training_signals
from ..transformer.query_pruning import DecodingStats, QueryPruning

logger = logging.getLogger(__name__)

__all__ = ["DETR", "LEGACY_KEY_PREFIXES"]

#: Parameter-name prefixes of checkpoints written before the transformer was built from its parts
#: (old -> new); :meth:`DETR.upgrade_state_dict` applies them.
LEGACY_KEY_PREFIXES = (
    ("query_embed", "transformer.queries.query_pos"),
    ("bbox_embed.", "transformer.decoder.box_head."),
    ("transformer.encoder_layers.", "transformer.encoder.layers."),
    ("transformer.encoder_norm.", "transformer.encoder.norm."),
    ("transformer.decoder_layers.", "transformer.decoder.layers."),
    ("transformer.decoder_norm.", "transformer.decoder.norm."),
    ("transformer.reference_points.", "transformer.queries.reference_points."),
    ("transformer.ref_point_head.", "transformer.queries.ref_point_head."),
    ("transformer.content_queries", "transformer.queries.content"),
    ("transformer.anchor_boxes", "transformer.queries.anchor_boxes"),
    ("transformer.enc_output.", "transformer.queries.token_proj."),
    ("transformer.enc_class_embed.", "transformer.queries.class_head."),
    ("transformer.enc_bbox_embed.", "transformer.queries.box_head."),
)


@META_ARCH_REGISTRY.register()
class DETR(nn.Module):
    """DETR with a Detectron2 backbone, Hungarian matching and Detectron2 inputs/outputs.

    Built from its parts: ``backbone`` (+ neck), ``transformer`` (encoder, queries, decoder with
    the box head), ``classification`` (how class logits are read, :mod:`..classification`; the
    class head is built from it), ``criterion`` (matcher + losses), optional ``denoising`` and
    optional ``refinement`` (cascade box refinement on the finest level, :mod:`..refinement`).

    Training input: Detectron2's list of dicts with ``image`` (CHW, ``INPUT.FORMAT``) and
    ``instances`` (``gt_boxes`` absolute XYXY in the image's resized frame, ``gt_classes``
    contiguous ids). Output in training: a dict of weighted losses (plus the backbone's
    ``extra_losses()``); in inference: ``[{"instances": Instances}]`` in the original image's
    coordinates.

    :meth:`set_num_active_queries` restricts the decoder to its first ``k`` matching queries
    (curriculum query ramp-up), in training and inference alike; the default is all of them.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        transformer: DetrTransformer,
        classification: Classification,
        criterion: SetCriterion,
        in_features: Sequence[str] = (),
        deep_supervision: bool = True,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        detections_per_image: int = 100,
        denoising: Optional[DenoisingGenerator] = None,
        pruning: Optional[QueryPruning] = None,
        test_decoder_layers: int = 0,
        training_signals: Optional[nn.ModuleDict] = None,
        refinement: Optional[CascadeRefinement] = None,
    ):
        super().__init__()
        shapes = backbone.output_shape()
        in_features = list(in_features) or sorted(shapes, key=lambda f: shapes[f].stride)
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.DETR.IN_FEATURES {missing} are not produced by the backbone "
                             f"(it outputs {list(shapes)}).")
        if denoising is not None and not transformer.queries.uses_reference_boxes:
            raise ValueError("MODEL.DETR.DN.ENABLED needs reference-box queries: set MODEL.DETR.ANCHOR_QUERIES "
                             "or MODEL.DETR.TWO_STAGE to True.")
        hidden = transformer.queries.d_model
        self.backbone = backbone
        self.in_features = in_features
        self.transformer = transformer
        self.classification = classification
        self.criterion = criterion
        self._num_active_queries: Optional[int] = None  # None: all queries
        self.deep_supervision = deep_supervision
        self.detections_per_image = detections_per_image

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(shapes[f].channels, hidden, kernel_size=1), nn.GroupNorm(32, hidden))
            for f in in_features
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.zeros(len(in_features), hidden)) if len(in_features) > 1 else None
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        self.position_encoding = PositionEmbeddingSine(hidden // 2, normalize=True)
        self.denoising = denoising
        self.class_embed = classification.head(hidden)
        self.pruning = pruning
        self.test_decoder_layers = transformer.decoder.check_depth(test_decoder_layers)
        #: auxiliary training-only losses (dinodet2.modeling.training_signals); not run in inference
        self.training_signals = training_signals if training_signals is not None else nn.ModuleDict()
        #: cascade box refinement after the decoder (dinodet2.modeling.refinement); None: no keys
        self.refinement = refinement
        #: what the decoder ran on the last batch (queries per layer, layers run)
        self.last_decoding_stats: Optional[DecodingStats] = None

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DETR
        _check_pixel_statistics(cfg)
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        classification = classification_from_config(cfg)
        shapes = backbone.output_shape()
        in_features = list(c.IN_FEATURES) or sorted(shapes, key=lambda f: shapes[f].stride)
        num_levels = len(in_features)
        return {
            "backbone": backbone,
            "transformer": DetrTransformer.from_config(cfg, classification, num_levels),
            "classification": classification,
            "criterion": SetCriterion.from_config(cfg, classification),
            "in_features": c.IN_FEATURES,
            "deep_supervision": c.DEEP_SUPERVISION,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "denoising": DenoisingGenerator.from_config(cfg),
            "pruning": QueryPruning.from_config(cfg),
            "test_decoder_layers": c.TEST_DEC_LAYERS,
            "training_signals": build_training_signals(
                cfg, backbone, [shapes[f].stride for f in in_features if f in shapes], classification),
            "refinement": CascadeRefinement.from_config(cfg, classification),
        }

    #: state-dict prefixes of parts that exist for training only
    TRAINING_ONLY_PREFIXES = ("training_signals.",)

    def inference_state_dict(self) -> Dict[str, torch.Tensor]:
        """``state_dict()`` without the training-only parts (:data:`TRAINING_ONLY_PREFIXES`): what a
        merged or exported model keeps."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.TRAINING_ONLY_PREFIXES)}

    def class_dependent_parameter_names(self) -> List[str]:
        """State-dict names of the weights with one row per class (the class heads of the decoder
        layers, of the two-stage proposals and of cascade rescoring, the denoising label embedding):
        what a checkpoint trained with another MODEL.DETR.NUM_CLASSES cannot provide."""
        return class_dependent_parameter_names(self)

    def no_weight_decay(self):
        return {"level_embed"} if self.level_embed is not None else set()

    def upgrade_state_dict(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Rename the keys of a checkpoint written before the transformer was built from its parts
        (:data:`LEGACY_KEY_PREFIXES`); keys this model has are left alone."""
        own = self.state_dict().keys()
        upgraded = {}
        for key, value in state.items():
            if key not in own:
                for old, new in LEGACY_KEY_PREFIXES:
                    if key.startswith(old) and new + key[len(old):] in own:
                        key = new + key[len(old):]
                        break
            upgraded[key] = value
        return upgraded

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return self.classification.num_classes

    @property
    def num_queries(self) -> int:
        return self.transformer.queries.num_queries

    @property
    def num_active_queries(self) -> int:
        """Number of matching queries the decoder uses (all of them unless restricted)."""
        return self.num_queries if self._num_active_queries is None else self._num_active_queries

    def set_num_active_queries(self, k: Optional[int]) -> None:
        """Use only the first ``k`` matching queries (two-stage: the top-``k`` proposals) from now
        on, in training and inference; ``None`` restores all of them. Denoising queries are not
        affected. All query parameters stay in the autograd graph (they are sliced), so
        DistributedDataParallel needs no ``find_unused_parameters``."""
        if k is not None:
            self.transformer.queries.check_active(k)
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

    def tokens(self, images: ImageList, mask: torch.Tensor) -> MultiLevelTokens:
        """Backbone features -> projected, position-embedded multi-level tokens."""
        features = self.backbone(images.tensor)
        srcs, poss, level_masks = [], [], []
        for lvl, (name, proj) in enumerate(zip(self.in_features, self.input_proj)):
            feat = features[name]
            m = _nearest_mask(mask, feat.shape[-2], feat.shape[-1])
            pos = self.position_encoding(m).to(feat.dtype)
            if self.level_embed is not None:
                pos = pos + self.level_embed[lvl].view(1, -1, 1, 1).to(feat.dtype)
            srcs.append(proj(feat))
            poss.append(pos)
            level_masks.append(m)
        return MultiLevelTokens.from_levels(srcs, poss, level_masks)

    def forward_transformer(self, images: ImageList, mask: torch.Tensor,
                            denoising: Optional[DenoisingQueries] = None) -> Dict:
        """Backbone -> multi-level tokens -> transformer -> class / box predictions.

        With ``denoising`` queries, their predictions are returned apart in ``"dn_outputs"``. In
        eval mode the decoder runs ``test_decoder_layers`` layers, progressively with ``pruning``;
        ``"query_padding"`` marks padding queries of an adaptive query count.
        """
        return self._run_transformer(images, mask, denoising)[0]

    def _run_transformer(self, images: ImageList, mask: torch.Tensor,
                         denoising: Optional[DenoisingQueries] = None) -> Tuple[Dict, MultiLevelTokens, torch.Tensor]:
        """:meth:`forward_transformer`'s outputs, the tokens the transformer read and its encoder output."""
        decoding = {}
        if not self.training:
            decoding = dict(num_layers=self.test_decoder_layers, pruning=self.pruning,
                            score_head=self.detection_scores if self.pruning is not None else None)
        tokens = self.tokens(images, mask)
        out = self.transformer(tokens, denoising, self._num_active_queries, **decoding)
        self.last_decoding_stats = out.stats
        logits = self.class_embed(out.states)
        num_dn = denoising.num_queries if denoising is not None else 0
        outputs = self._layer_outputs(logits[:, :, num_dn:], out.boxes[:, :, num_dn:])
        if out.proposals is not None:
            outputs["enc_outputs"] = out.proposals
        if out.query_padding is not None:
            outputs["query_padding"] = out.query_padding
        if denoising is not None:
            outputs["dn_outputs"] = self._layer_outputs(logits[:, :, :num_dn], out.boxes[:, :, :num_dn])
            outputs["dn_outputs"].update(indices=denoising.match_indices(), num_groups=denoising.num_groups)
        if self.refinement is not None:
            self._refine(outputs, tokens, out.states[-1, :, num_dn:])
        return outputs, tokens, out.memory

    def _refine(self, outputs: Dict, tokens: MultiLevelTokens, states: torch.Tensor) -> None:
        """Run the cascade refinement on the final predictions: in training its stages go to the
        criterion (``"refine_outputs"``); in inference the last stage's boxes (and, rescoring, logits)
        replace the decoder's (which stay in ``"decoder_boxes"`` / ``"decoder_logits"``)."""
        stages = self.refinement(tokens, states, outputs["pred_boxes"], outputs["pred_logits"])
        if self.training:
            outputs["refine_outputs"] = stages
            return
        outputs["decoder_boxes"], outputs["decoder_logits"] = outputs["pred_boxes"], outputs["pred_logits"]
        outputs["pred_boxes"], outputs["pred_logits"] = stages[-1]["pred_boxes"], stages[-1]["pred_logits"]

    def detection_scores(self, states: torch.Tensor) -> torch.Tensor:
        """``[B, Q]`` best class probability of decoder states (what query pruning reads)."""
        return self.classification.best_class_scores(self.class_embed(states))

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
            results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes,
                                     outputs.get("query_padding"))
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
        outputs, tokens, memory = self._run_transformer(images, mask, denoising)
        outputs.update(self.transformer.encoder.pop_outputs())  # sparse encoder: "token_scores"
        losses = self.criterion(outputs, targets)
        if len(self.training_signals):
            inputs = SignalInputs(images, tokens, memory, outputs, targets, batched_inputs)
            for signal in self.training_signals.values():
                losses.update(signal(inputs))
        if hasattr(self.backbone, "extra_losses"):
            losses.update(self.backbone.extra_losses())
        if self.denoising is not None and denoising is None:
            # A batch without objects leaves the label embedding unused; a zero-valued term keeps
            # it in the graph so DistributedDataParallel still sees a gradient for it.
            losses["loss_class"] = losses["loss_class"] + 0.0 * self.denoising.label_embed.weight.sum()
        return losses

    def inference(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: List[Tuple[int, int]],
                  query_padding: Optional[torch.Tensor] = None) -> List[Instances]:
        """Top-k detections per image in the resized (unpadded) image frame, absolute XYXY;
        ``query_padding`` ``[B, Q]`` (True: padding query) leaves those queries out."""
        results = []
        for i, (logit, box, (h, w)) in enumerate(zip(logits.float(), boxes.float(), image_sizes)):
            if query_padding is not None:
                logit, box = logit[~query_padding[i]], box[~query_padding[i]]
            scores, query, labels = self.classification.detections(logit, self.detections_per_image)
            xyxy = box_convert(box[query], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], device=box.device)
            result = Instances((h, w))
            result.pred_boxes = Boxes(xyxy)
            result.scores = scores
            result.pred_classes = labels
            results.append(result)
        return results


def _nearest_mask(mask: torch.Tensor, height, width) -> torch.Tensor:
    """``[B, H, W]`` padding mask -> ``[B, height, width]`` by nearest neighbour (row ``i`` reads
    ``floor(i * H / height)``, as ``F.interpolate(mode="nearest")``), in integer arithmetic: an
    exported graph's float ``Resize`` rounds ``7 / (8 / 112)`` to 97 and misplaces the padding edge."""
    rows = torch.arange(height, device=mask.device) * mask.shape[-2] // height
    cols = torch.arange(width, device=mask.device) * mask.shape[-1] // width
    return mask[:, rows[:, None], cols[None, :]]


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
