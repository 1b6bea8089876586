"""Box <-> feature encodings shared by the query generators and the decoder."""
import math

import torch

__all__ = ["inverse_sigmoid", "box_sine_embedding"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]`` (finite for boxes on the border)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalised boxes (or points): ``[..., D] -> [..., D * num_feats]``."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes.float()[..., None] * (2 * math.pi) / dim_t
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2).to(boxes.dtype)
