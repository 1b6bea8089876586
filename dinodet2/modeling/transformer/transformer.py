"""The DETR transformer, built from its parts: an encoder over the multi-level tokens, the
decoder queries (:mod:`.queries`) and a decoder that refines boxes layer by layer.

Every improvement is a part or a setting of a part (see ``MODEL.DETR`` in :mod:`dinodet2.config`):

* encoder layers: standard self-attention or multi-scale deformable attention (:class:`DetrEncoder`),
  optionally updating only the tokens a scorer selects (:mod:`.sparse_encoder`);
* decoder cross-attention: standard (every token) or deformable (around each query's reference);
* queries: learned, anchor or two-stage (:func:`~.queries.build_queries`);
* boxes are predicted relative to the reference (inverse-sigmoid space; no reference: relative to
  0, the seed's ``sigmoid(box_head(state))``); with iterative refinement each layer's box becomes
  the next layer's reference, detached; with ``look_forward_twice`` (DINO) a layer's box is
  predicted from the previous layer's *undetached* box so the loss of layer ``l`` also trains
  layer ``l - 1`` (:class:`DetrDecoder`);
* denoising queries (:mod:`dinodet2.modeling.denoising`) are prepended to the matching queries,
  kept apart by a self-attention mask.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classification import Classification
from .box_encoding import inverse_sigmoid
from .deformable_attention import MultiScaleDeformableAttention
from .decoder_memory import DecoderMemory
from .deformable_layers import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .layers import TransformerDecoderLayer, TransformerEncoderLayer, clones
from .multilevel_tokens import MultiLevelTokens
from .queries import Queries, build_queries
from .query_pruning import ActiveQueries, DecodingStats, QueryPruning
from .scale_aware import DECODER_HEAD_KINDS, SizeConditioning
from .sparse_encoder import SparseTokenSelector, TokenSelection
from .token_geometry import to_level_coordinates

__all__ = ["BoxHead", "DetrDecoder", "DetrEncoder", "DetrTransformer", "TransformerOutput"]


def _reset_layer_parameters(module: nn.Module) -> None:
    """Xavier for the attention / FFN weights; deformable attention keeps its own init."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m._reset_parameters()


class BoxHead(nn.Module):
    """``num_layers`` linear layers with ReLU in between, the last one zero-initialised (DETR's box MLP)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def check_decoder_only_levels(levels: Sequence[int], num_levels: int) -> Tuple[int, ...]:
    """``MODEL.DETR.DECODER_ONLY_LEVELS`` checked against the transformer's ``num_levels``."""
    levels = tuple(int(level) for level in levels)
    bad = [level for level in levels if not 0 <= level < num_levels]
    if bad:
        raise ValueError(f"MODEL.DETR.DECODER_ONLY_LEVELS {list(levels)} names levels {bad}, but the transformer has "
                         f"{num_levels} levels (0..{num_levels - 1}, in MODEL.DETR.IN_FEATURES order).")
    if levels and len(set(levels)) >= num_levels:
        raise ValueError(f"MODEL.DETR.DECODER_ONLY_LEVELS {list(levels)} leaves no level to the encoder and the "
                         "two-stage proposals; keep at least one level out of it.")
    return levels


class DetrEncoder(nn.Module):
    """Encoder layers (standard or deformable) over the multi-level tokens, optional final norm.

    With ``sparse`` (:mod:`.sparse_encoder`, ``MODEL.DETR.SPARSE_ENCODER``) the layers update only the
    tokens its scorer selects (:meth:`encode_selected`); the final norm still applies to every token.
    A training forward leaves the scorer's logits for the ``loss_token_fg`` loss in :meth:`pop_outputs`.
    """

    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None,
                 sparse: Optional[SparseTokenSelector] = None, decoder_only_levels: Sequence[int] = ()):
        super().__init__()
        if sparse is not None and num_layers < 1:
            raise ValueError("MODEL.DETR.SPARSE_ENCODER.ENABLED needs MODEL.DETR.ENC_LAYERS >= 1.")
        self.layers = clones(layer, num_layers)
        self.norm = norm if num_layers else None
        self.deformable = isinstance(layer, DeformableTransformerEncoderLayer)
        _reset_layer_parameters(self.layers)
        self.sparse = sparse  # None registers nothing: the state-dict keys of the dense encoder
        #: levels whose tokens the layers never update (they stay keys / values): decoder-only levels
        self.decoder_only_levels = tuple(sorted(set(decoder_only_levels)))
        self._outputs: Dict[str, Dict[str, torch.Tensor]] = {}

    def encoded_tokens(self, tokens: MultiLevelTokens) -> Optional[torch.Tensor]:
        """``[N]`` bool, True on the tokens of the levels the layers update; None when that is every level."""
        return tokens.token_mask_without(self.decoder_only_levels)

    def _references(self, tokens: MultiLevelTokens) -> Optional[torch.Tensor]:
        """Deformable layers sample around every token's own centre on every level: ``[B, N, L, 2]``."""
        if not self.deformable:
            return None
        return to_level_coordinates(tokens.anchors[0][..., :2].to(tokens.src.dtype), tokens.ratios)

    def forward(self, tokens: MultiLevelTokens) -> torch.Tensor:
        memory = tokens.src
        if not len(self.layers):
            return memory
        selection = None
        encoded = self.encoded_tokens(tokens)
        if self.sparse is not None and (self.training or not self.sparse.keeps_every_token):
            logits = self.sparse.scorer(memory)
            if self.training:
                self._outputs = {"token_scores": self.sparse.loss_inputs(logits, tokens)}
            if not self.sparse.keeps_every_token:
                selection = self.sparse.select(logits, tokens, eligible=encoded)
        if selection is None and encoded is not None:  # every token of the encoded levels, padding included
            index = encoded.nonzero().squeeze(1).expand(memory.shape[0], -1)
            selection = TokenSelection(index, torch.ones_like(index, dtype=torch.bool))
        if selection is not None:
            memory = self.encode_selected(tokens, selection)
        else:
            refs = self._references(tokens)
            for layer in self.layers:
                memory = layer(memory, pos=tokens.pos, key_padding_mask=tokens.mask, reference_points=refs,
                               spatial_shapes=tokens.spatial_shapes)
        return self.norm(memory) if self.norm is not None else memory

    def encode_selected(self, tokens: MultiLevelTokens, selection: TokenSelection) -> torch.Tensor:
        """The layers update only ``selection``'s tokens, the queries of every layer; keys / values are all
        tokens (the selected ones as updated so far, scattered back after every layer). The other tokens
        keep their input features bit for bit. ``[B, N, C]``, before the final norm."""
        memory, index = tokens.src, selection.index
        if index.shape[1] == 0:
            return memory

        def gather(x: torch.Tensor) -> torch.Tensor:  # [B, N, ...] -> [B, K, ...]
            return torch.gather(x, 1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))

        refs = self._references(tokens)
        query, pos, keep = gather(memory), gather(tokens.pos), selection.keep[..., None]
        query_refs = gather(refs) if refs is not None else None
        for layer in self.layers:
            updated = layer(query, pos=pos, key_padding_mask=tokens.mask, reference_points=query_refs,
                            spatial_shapes=tokens.spatial_shapes, memory=memory, memory_pos=tokens.pos)
            query = torch.where(keep, updated, query)  # slots past an image's count stay as they were
            memory = memory.to(query.dtype).scatter(1, index[..., None].expand_as(query), query)
        return memory

    def pop_outputs(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The last training forward's outputs for the criterion, handed over once: ``token_scores``
        (:meth:`~.sparse_encoder.SparseTokenSelector.loss_inputs`) with a sparse encoder, else nothing."""
        outputs, self._outputs = self._outputs, {}
        return outputs


class DetrDecoder(nn.Module):
    """Decoder layers + shared final norm + the box head that predicts every layer's boxes.

    Args:
        layer: one decoder layer (standard or deformable), cloned ``num_layers`` times.
        box_head: predicts box deltas relative to the reference (inverse-sigmoid space).
        refine_boxes: each layer's box becomes the next layer's reference (detached).
        look_forward_twice: predict from the previous layer's undetached box (needs refine_boxes).
        size_conditioning: scale-aware heads: every layer's normed state is modulated by the size of
            the box its prediction is relative to (:class:`~.scale_aware.SizeConditioning`) before the
            class and box heads read it; None: the heads read the state as it is.
    """

    def __init__(self, layer: nn.Module, num_layers: int, d_model: int, box_head: nn.Module,
                 refine_boxes: bool = True, look_forward_twice: bool = False,
                 size_conditioning: Optional[SizeConditioning] = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError("MODEL.DETR.DEC_LAYERS must be >= 1.")
        if look_forward_twice and not refine_boxes:
            raise ValueError("MODEL.DETR.LOOK_FORWARD_TWICE needs MODEL.DETR.ITERATIVE_REFINEMENT=True.")
        self.layers = clones(layer, num_layers)
        _reset_layer_parameters(self.layers)
        self.norm = nn.LayerNorm(d_model)
        self.box_head = box_head
        self.deformable = isinstance(layer, DeformableTransformerDecoderLayer)
        self.refine_boxes = refine_boxes
        self.look_forward_twice = look_forward_twice
        self.size_conditioning = size_conditioning  # None registers nothing: the shared heads' state-dict keys

    def forward(self, tokens: MultiLevelTokens, memory: torch.Tensor, queries: Queries, content: torch.Tensor,
                reference: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor] = None,
                query_padding: Optional[torch.Tensor] = None, num_layers: Optional[int] = None,
                pruning: Optional[QueryPruning] = None, score_head: Optional[Callable] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, DecodingStats]:
        """States ``[L, B, Q, C]`` (after the final norm) and boxes ``[L, B, Q, 4]`` of every layer run,
        and what the pass cost.

        ``query_padding`` ``[B, Q]``: padding queries (an adaptive query count), ignored by the
        others' self-attention. ``num_layers``: run only the first layers (any-depth decoding;
        None: all). ``pruning`` (inference, with ``score_head`` mapping states to class scores
        ``[B, Q]``): progressive decoding (:mod:`.query_pruning`); then ``L`` is 1 and holds
        every query's last state and box.
        """
        layers = self.layers[:self.check_depth(num_layers)]
        batch, num_queries = content.shape[:2]
        cache = DecoderMemory(memory, tokens.pos, tokens.mask)
        stats = DecodingStats(len(self.layers))
        real = num_queries if query_padding is None else (~query_padding).sum(1).float().mean().item()
        fixed_pos = None if queries.uses_reference_boxes else queries.position(reference, batch, num_queries)
        if pruning is not None:
            if score_head is None:
                raise ValueError("progressive decoding needs the class scores (score_head)")
            if attn_mask is not None:
                raise ValueError("progressive decoding is for inference; it does not take denoising queries")
            return self._progressive(layers, tokens, cache, queries, fixed_pos, content, reference, query_padding,
                                     pruning, score_head, stats)
        states, boxes = [], []
        previous = reference  # the box a layer's prediction is relative to
        for index, layer in enumerate(layers):
            stats.queries_per_layer.append(real)
            content, state, box, reference, previous = self._layer(
                index, layer, tokens, cache, queries, fixed_pos, content, reference, previous, attn_mask, query_padding)
            states.append(state)
            boxes.append(box)
        return torch.stack(states), torch.stack(boxes), stats

    def check_depth(self, num_layers: Optional[int]) -> int:
        if num_layers is None or num_layers == 0:
            return len(self.layers)
        if not 1 <= num_layers <= len(self.layers):
            raise ValueError(f"MODEL.DETR.TEST_DEC_LAYERS={num_layers} must be in 1..{len(self.layers)} "
                             f"(MODEL.DETR.DEC_LAYERS), or 0 for all layers.")
        return num_layers

    def _layer(self, index, layer, tokens, cache, queries, fixed_pos, content, reference, previous, attn_mask,
               query_padding, keys_of=None):
        """One decoder layer: new content, its normed state, its box, the next reference and base.
        ``fixed_pos``: the positional queries of query kinds without reference boxes (the same in
        every layer), else None (generated from the reference). ``keys_of(content, query_pos)``: the
        self-attention keys of progressive decoding (None: the queries themselves)."""
        batch, num_queries = content.shape[:2]
        query_pos = fixed_pos if fixed_pos is not None else queries.position(reference, batch, num_queries)
        level_refs = to_level_coordinates(reference, tokens.ratios) if self.deformable else None
        content = layer(content, query_pos=query_pos, self_attn_mask=attn_mask, reference_points=level_refs,
                        spatial_shapes=tokens.spatial_shapes, query_padding_mask=query_padding,
                        projected_memory=cache.projected(index, layer),
                        self_attn_keys=keys_of(content, query_pos) if keys_of is not None else None)
        state = self.norm(content)
        base = previous if self.look_forward_twice else reference
        if self.size_conditioning is not None and base is not None:
            state = self.size_conditioning(state, base)
        delta = self.box_head(state)
        if base is not None:
            base = inverse_sigmoid(base)
            delta = delta + (F.pad(base, (0, 2)) if base.shape[-1] == 2 else base)  # a point: size from 0
        box = delta.sigmoid()
        if self.refine_boxes and reference is not None:
            reference, previous = box.detach(), box
        return content, state, box, reference, previous

    def _progressive(self, layers, tokens, cache, queries, fixed_pos, content, reference, query_padding, pruning,
                     score_head, stats):
        """Progressive decoding (see :mod:`.query_pruning`)."""
        active = ActiveQueries(content, query_padding)
        previous = reference
        last_box = reference
        for index, layer in enumerate(layers):
            batch = content.shape[0]
            stats.queries_per_layer.append(active.valid.sum().item() / batch)
            content, state, box, reference, previous = self._layer(
                index, layer, tokens, cache, queries, fixed_pos, content, reference, previous, None, active.padding,
                active.self_attention_keys if active.packed else None)
            active.record(state, box)
            if index + 1 == len(layers) or not pruning.applies_after(index + 1):
                last_box = box
                continue
            leaving = pruning.leaving(score_head(state), box, last_box)
            # what every query would enter the next layer with: the keys of the ones that leave now
            next_pos = fixed_pos if fixed_pos is not None else queries.position(reference, batch, content.shape[1])
            active.record_keys(content, next_pos)
            any_left, (content, reference, previous, last_box, fixed_pos) = active.keep(
                ~leaving, content, reference, previous, box, fixed_pos)
            if not any_left:
                break
        return active.final_state[None], active.final_box[None], stats


class DetrTransformer(nn.Module):
    """Encoder + queries + decoder (see the module docstring).

    ``forward`` returns a :class:`TransformerOutput`: every decoder layer's states and boxes for
    the ``k`` matching queries (two-stage: at most the number of tokens) preceded by the
    denoising queries, the two-stage proposals, the query padding of an adaptive query count
    and the decoding statistics.
    """

    def __init__(self, encoder: DetrEncoder, queries: Queries, decoder: DetrDecoder):
        super().__init__()
        self.encoder = encoder
        self.queries = queries
        self.decoder = decoder

    @classmethod
    def from_config(cls, cfg, classification: Classification, num_levels: int) -> "DetrTransformer":
        """The transformer ``MODEL.DETR`` describes, over ``num_levels`` feature levels."""
        c = cfg.MODEL.DETR
        if c.HIDDEN_DIM % c.NHEADS:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM={c.HIDDEN_DIM} must be divisible by MODEL.DETR.NHEADS={c.NHEADS}.")
        deformable_heads = c.DEFORMABLE.NHEADS or c.NHEADS
        if (c.DEFORMABLE.ENCODER or c.DEFORMABLE.DECODER) and c.HIDDEN_DIM % deformable_heads:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM={c.HIDDEN_DIM} must be divisible by "
                             f"MODEL.DETR.DEFORMABLE.NHEADS={deformable_heads}.")
        if c.DEFORMABLE.NUM_POINTS < 1:
            raise ValueError(f"MODEL.DETR.DEFORMABLE.NUM_POINTS must be >= 1, got {c.DEFORMABLE.NUM_POINTS}.")
        common = dict(dim_feedforward=c.DIM_FEEDFORWARD, dropout=c.DROPOUT, normalize_before=c.PRE_NORM,
                      attention_dropout=c.ATTENTION_DROPOUT, activation_dropout=c.ACTIVATION_DROPOUT)
        deformable = (c.HIDDEN_DIM, deformable_heads, num_levels, c.DEFORMABLE.NUM_POINTS)
        if c.DEFORMABLE.ENCODER:
            encoder_layer = DeformableTransformerEncoderLayer(*deformable, **common)
        else:
            encoder_layer = TransformerEncoderLayer(c.HIDDEN_DIM, c.NHEADS, **common)
        if c.DEFORMABLE.DECODER:
            decoder_layer = DeformableTransformerDecoderLayer(*deformable, **common)
        else:
            decoder_layer = TransformerDecoderLayer(c.HIDDEN_DIM, c.NHEADS, **common)
        decoder_only = check_decoder_only_levels(c.DECODER_ONLY_LEVELS, num_levels)
        encoder = DetrEncoder(encoder_layer, c.ENC_LAYERS, nn.LayerNorm(c.HIDDEN_DIM) if c.PRE_NORM else None,
                              sparse=SparseTokenSelector.from_config(cfg), decoder_only_levels=decoder_only)
        queries = build_queries(cfg, classification, num_levels)
        heads = c.SCALE_AWARE.DECODER_HEADS
        if heads not in DECODER_HEAD_KINDS:
            raise ValueError(f"MODEL.DETR.SCALE_AWARE.DECODER_HEADS={heads!r} must be one of {DECODER_HEAD_KINDS}.")
        if heads == "size_conditioned" and not queries.uses_reference_boxes:
            raise ValueError("MODEL.DETR.SCALE_AWARE.DECODER_HEADS 'size_conditioned' conditions the heads on each "
                             "query's reference box: set MODEL.DETR.TWO_STAGE or MODEL.DETR.ANCHOR_QUERIES True.")
        decoder = DetrDecoder(decoder_layer, c.DEC_LAYERS, c.HIDDEN_DIM, BoxHead(c.HIDDEN_DIM, c.HIDDEN_DIM, 4, 3),
                              refine_boxes=c.ITERATIVE_REFINEMENT, look_forward_twice=c.LOOK_FORWARD_TWICE,
                              size_conditioning=SizeConditioning(c.HIDDEN_DIM) if heads == "size_conditioned" else None)
        return cls(encoder, queries, decoder)

    def forward(self, tokens: MultiLevelTokens, denoising=None, num_queries: Optional[int] = None,
                num_layers: Optional[int] = None, pruning: Optional[QueryPruning] = None,
                score_head: Optional[Callable] = None) -> "TransformerOutput":
        """``num_queries``: active matching queries (None: all); ``num_layers``: decoder depth
        (None: all); ``pruning`` + ``score_head``: progressive decoding (inference)."""
        memory = self.encoder(tokens)
        init = self.queries.initial(tokens, memory, num_queries)
        content, reference, attn_mask = init.content, init.reference, None
        if denoising is not None:
            content = torch.cat([denoising.queries.to(content.dtype), content], 1)
            reference = torch.cat([denoising.boxes.to(reference.dtype), reference], 1)
            attn_mask = denoising.attention_mask(content.shape[1])
        states, boxes, stats = self.decoder(tokens, memory, self.queries, content, reference, attn_mask,
                                            query_padding=init.padding, num_layers=num_layers, pruning=pruning,
                                            score_head=score_head)
        return TransformerOutput(states, boxes, init.proposals, init.padding, stats, memory)


@dataclass
class TransformerOutput:
    """What :class:`DetrTransformer` returns.

    Attributes:
        states: decoder states ``[L, B, Q', C]`` of every layer run; ``Q'`` is the matching
            queries preceded by the denoising queries; with progressive decoding ``L`` is 1 and
            holds every query's last state.
        boxes: normalised cxcywh boxes ``[L, B, Q', 4]``, likewise.
        proposals: the two-stage token proposals (``pred_logits``, ``pred_boxes``) or None.
        query_padding: ``[B, Q]`` True on padding matching queries (adaptive query count), or None.
        stats: queries and layers the decoder ran (:class:`~.query_pruning.DecodingStats`).
        memory: the encoder's output tokens ``[B, N, C]`` (what the decoder attended to).
    """

    states: torch.Tensor
    boxes: torch.Tensor
    proposals: Optional[Dict[str, torch.Tensor]]
    query_padding: Optional[torch.Tensor]
    stats: DecodingStats
    memory: Optional[torch.Tensor] = None
