"""ViTDet-style simple feature pyramid for a patch-14 ViT.

Detectron2's ``SimpleFeaturePyramid`` assumes power-of-two strides (it names levels ``p<log2>`` and
asserts log2-contiguous strides), which a patch-14 backbone cannot satisfy (14 / 4 = 3.5). Rather
than resampling DINOv2's patch embedding or token grid to stride 16 (which changes the pretrained
model's input statistics and costs an interpolation), this neck keeps the native 14-px grid and
builds levels with *explicit* strides 14 / scale: 2.0 -> 7, 1.0 -> 14, 0.5 -> 28. Level names are
``p<stride>`` (``p7``, ``p14``, ``p28``). Each level may read a different ViT block
(``MODEL.SFP.IN_FEATURES``), giving multi-scale features from different depths.
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..backbone.dinov2 import build_dinov2_backbone

__all__ = ["Dinov2SimpleFeaturePyramid", "build_dinov2_sfp_backbone"]

_SUPPORTED_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)


def _resample_layers(scale: float, dim: int, norm: str, downsample: str) -> List[nn.Module]:
    """Layers changing the resolution by ``scale`` (a power of two) at width ``dim``."""
    if scale not in _SUPPORTED_SCALES:
        raise ValueError(f"MODEL.SFP.SCALE_FACTORS contains {scale}; supported: {_SUPPORTED_SCALES}.")
    layers: List[nn.Module] = []
    steps = int(round(abs(math.log2(scale))))
    for step in range(steps):
        last = step == steps - 1
        if scale > 1:
            layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        elif downsample == "maxpool":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif downsample == "conv":
            layers.append(nn.Conv2d(dim, dim, kernel_size=2, stride=2))
        else:
            raise ValueError(f"MODEL.SFP.DOWNSAMPLE must be 'maxpool' or 'conv', got '{downsample}'.")
        learned = scale > 1 or downsample == "conv"
        if learned and not last:
            layers += [get_norm(norm, dim) if norm else nn.Identity(), nn.GELU()]
    return layers


class Dinov2SimpleFeaturePyramid(Backbone):
    """Builds a pyramid from (one or several) stride-14 ViT feature maps."""

    def __init__(self, net: Backbone, in_features: Sequence[str], scale_factors: Sequence[float],
                 out_channels: int = 256, norm: str = "LN", downsample: str = "maxpool"):
        super().__init__()
        net_shapes = net.output_shape()
        if not in_features:
            in_features = [net._out_features[-1]]
        if len(in_features) == 1:
            in_features = list(in_features) * len(scale_factors)
        if len(in_features) != len(scale_factors):
            raise ValueError(
                f"MODEL.SFP.IN_FEATURES has {len(in_features)} entries for {len(scale_factors)} "
                "scale factors; give one name for all levels or one per scale factor."
            )
        for f in in_features:
            if f not in net_shapes:
                raise ValueError(
                    f"MODEL.SFP.IN_FEATURES names '{f}', which the backbone does not output; it outputs "
                    f"{list(net_shapes)} (set MODEL.DINOV2.OUT_INDICES to add blocks)."
                )
        order = sorted(range(len(scale_factors)), key=lambda i: -scale_factors[i])  # fine to coarse
        self.net = net
        self.in_features = [in_features[i] for i in order]
        self.scale_factors = [float(scale_factors[i]) for i in order]
        self.stages = nn.ModuleList()
        self._out_features, self._out_feature_strides, self._out_feature_channels = [], {}, {}
        use_bias = norm == ""
        for feat, scale in zip(self.in_features, self.scale_factors):
            in_ch, in_stride = net_shapes[feat].channels, net_shapes[feat].stride
            stride = in_stride / scale
            if stride == int(stride):
                stride = int(stride)
            elif stride * 2 != int(stride * 2):  # 14 / 4 = 3.5 is a level (p3_5); finer fractions are not
                raise ValueError(f"Scale factor {scale} on stride {in_stride} gives the stride {stride}; the pyramid "
                                 "takes whole or half strides (e.g. 4.0 on the patch size 14: stride 3.5).")
            name = f"p{stride:g}".replace(".", "_")
            if name in self._out_feature_strides:
                raise ValueError(f"MODEL.SFP.SCALE_FACTORS repeats the factor {scale}.")
            self.stages.append(nn.Sequential(
                *_resample_layers(scale, in_ch, norm, downsample),
                Conv2d(in_ch, out_channels, kernel_size=1, bias=use_bias, norm=get_norm(norm, out_channels)),
                Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=use_bias,
                       norm=get_norm(norm, out_channels)),
            ))
            self._out_features.append(name)
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = out_channels
        # The ViT's own constraint (patch size, x NUM_WINDOWS with windowed attention) and the coarsest level's.
        self._size_divisibility = math.lcm(net.size_divisibility, max(self._out_feature_strides.values()))

    @property
    def size_divisibility(self) -> int:
        """Pad to a multiple of the coarsest stride so every level has an exact integer size (and of the
        ViT's ``size_divisibility``, e.g. patch size x NUM_WINDOWS with windowed attention)."""
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.net(x)
        return {name: stage(features[feat])
                for name, feat, stage in zip(self._out_features, self.in_features, self.stages)}

    def extra_losses(self) -> Dict[str, torch.Tensor]:
        """The ViT's own training losses (:meth:`Dinov2Backbone.extra_losses`); the pyramid adds none."""
        extra_losses = getattr(self.net, "extra_losses", None)
        return extra_losses() if extra_losses is not None else {}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}


@BACKBONE_REGISTRY.register()
def build_dinov2_sfp_backbone(cfg, input_shape: ShapeSpec = None) -> Dinov2SimpleFeaturePyramid:
    """DINOv2 (+ LoRA) followed by the simple feature pyramid (``MODEL.SFP.*``)."""
    net = build_dinov2_backbone(cfg, input_shape)
    c = cfg.MODEL.SFP
    return Dinov2SimpleFeaturePyramid(net, in_features=c.IN_FEATURES, scale_factors=c.SCALE_FACTORS,
                                      out_channels=c.OUT_CHANNELS, norm=c.NORM, downsample=c.DOWNSAMPLE)
