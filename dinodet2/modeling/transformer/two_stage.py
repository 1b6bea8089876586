"""Two-stage DETR transformer: token proposals select the decoder's reference boxes.

Every image token (after the optional encoder) predicts a class and a box relative to its own
anchor (the token's centre, a size that doubles per pyramid level). These dense predictions are
supervised with the same Hungarian set loss (``*_enc`` losses) and learn quickly, like a dense
detector. The top-``num_queries`` tokens by class score become the decoder's reference boxes:
their positional queries are generated from the box (sine embedding + MLP, DAB-DETR style) while
the content queries are learned ("mixed query selection", DINO). Each decoder layer predicts a
delta on its reference box in inverse-sigmoid space; with ``refine_boxes`` the refined box is the
next layer's reference (detached, as in Deformable DETR's iterative refinement).
"""
import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .detr_transformer import DetrTransformer


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalised boxes: ``[..., 4] -> [..., 4 * num_feats]``."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes.float()[..., None] * (2 * math.pi) / dim_t
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2).to(boxes.dtype)


def token_anchors(level_masks: List[torch.Tensor], base_size: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor box of every token and whether the token lies inside its image.

    ``level_masks``: per level ``[B, h, w]`` padding masks (True = padding). Centres are
    normalised by each image's own valid extent on that level, like the targets; sizes are
    ``base_size * 2**level``. Returns anchors ``[B, N, 4]`` (cxcywh) and ``valid`` ``[B, N]``.
    """
    anchors, valid = [], []
    for lvl, mask in enumerate(level_masks):
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).float()  # [B]
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).float()
        ys = torch.arange(h, dtype=torch.float32, device=mask.device) + 0.5
        xs = torch.arange(w, dtype=torch.float32, device=mask.device) + 0.5
        cy = (ys[None, :, None] / valid_h[:, None, None]).expand(-1, h, w)
        cx = (xs[None, None, :] / valid_w[:, None, None]).expand(-1, h, w)
        size = torch.full_like(cx, base_size * 2.0 ** lvl)
        anchors.append(torch.stack([cx, cy, size, size], dim=-1).flatten(1, 2))
        valid.append((~mask).flatten(1))
    return torch.cat(anchors, 1), torch.cat(valid, 1)


class TwoStageDetrTransformer(DetrTransformer):
    """``DetrTransformer`` with token proposals and reference-box queries (see module docstring).

    ``forward(src, mask, pos, level_masks, class_head, box_head)`` returns the decoder states
    ``[L, B, Q, C]``, the reference box each layer started from ``[L, B, Q, 4]`` and the token
    proposals ``{"pred_logits", "pred_boxes"}`` for the encoder loss. Layer ``l``'s boxes are
    ``sigmoid(box_head(states[l]) + inverse_sigmoid(references[l]))``.
    """

    def __init__(self, num_queries: int, num_logits: int, refine_boxes: bool = True, **kwargs):
        super().__init__(**kwargs)
        d = self.d_model
        self.num_queries = num_queries
        self.refine_boxes = refine_boxes
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.enc_class_embed = nn.Linear(d, num_logits)
        self.enc_bbox_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))
        self.content_queries = nn.Parameter(torch.zeros(num_queries, d))
        self.ref_point_head = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d))
        nn.init.constant_(self.enc_class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.enc_bbox_embed[-1].weight)
        nn.init.zeros_(self.enc_bbox_embed[-1].bias)

    def propose(self, memory: torch.Tensor, level_masks: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Class logits and boxes of every token; padding tokens get a score of -inf for selection."""
        anchors, valid = token_anchors(level_masks)
        feat = self.enc_output(memory)
        logits = self.enc_class_embed(feat).masked_fill(~valid[..., None], -1e4)  # padding: background
        boxes = (self.enc_bbox_embed(feat) + inverse_sigmoid(anchors.to(feat.dtype))).sigmoid()
        scores = logits.detach().float().sigmoid().amax(-1).masked_fill(~valid, float("-inf"))
        return {"pred_logits": logits, "pred_boxes": boxes, "scores": scores}

    def forward(self, src, mask, pos, level_masks, box_head):
        memory = self.encode(src, mask, pos)
        proposals = self.propose(memory, level_masks)
        k = min(self.num_queries, memory.shape[1])
        top = proposals["scores"].topk(k, dim=1).indices  # [B, k]
        reference = torch.gather(proposals["pred_boxes"].detach(), 1, top[..., None].expand(-1, -1, 4))
        tgt = self.content_queries[:k].unsqueeze(0).expand(memory.shape[0], -1, -1)
        states, references = [], []
        for layer in self.decoder_layers:
            query_pos = self.ref_point_head(box_sine_embedding(reference, self.d_model // 2))
            tgt = layer(tgt, memory, query_pos=query_pos, pos=pos, memory_key_padding_mask=mask)
            state = self.decoder_norm(tgt)
            states.append(state)
            references.append(reference)
            if self.refine_boxes:
                reference = (box_head(state) + inverse_sigmoid(reference)).sigmoid().detach()
        enc_outputs = {"pred_logits": proposals["pred_logits"], "pred_boxes": proposals["pred_boxes"]}
        return torch.stack(states), torch.stack(references), enc_outputs
