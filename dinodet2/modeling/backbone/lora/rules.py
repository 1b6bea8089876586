"""Where adapters go and how large they are: ``MODEL.LORA`` settings -> a per-module plan.

Which transformer blocks get adapters: ``MODEL.LORA.LAYERS`` (explicit 0-based indices, negative
ones count from the end) or ``MODEL.LORA.LAST_N_LAYERS``; by default every block.

Per-layer ranks and alphas: ``MODEL.LORA.RANK_PATTERN`` / ``ALPHA_PATTERN`` are lists of rules
``"<blocks>[/<families>]=<value>"`` where ``<blocks>`` is ``*``, one index ``7`` or an inclusive
range ``0-5`` and ``<families>`` a comma-separated subset of the families, e.g.
``["0-5=4", "6-11=16", "*/fc1,fc2=8"]``. Later rules override earlier ones; modules no rule
matches use ``RANK`` / ``ALPHA``. :func:`plan_lora` gives every adapted module its block, family,
rank and alpha; :mod:`.injection` turns the plan into ``peft``'s ``rank_pattern`` /
``alpha_pattern`` with one exact entry per adapted module.
"""
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .names import LORA_MODULE_FAMILIES, family_of, layer_index_of, num_blocks, resolve_lora_target_modules

_RULE = re.compile(r"^\s*(?P<blocks>\*|\d+|\d+\s*-\s*\d+)\s*(?:/(?P<families>[a-z_0-9,\s]+))?=\s*(?P<value>[-+.\deE]+)\s*$")


@dataclass
class LoraSpec:
    """The ``MODEL.LORA`` settings that decide where adapters go and how large they are."""

    families: Sequence[str] = ("query", "value")
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    layers: Sequence[int] = ()
    last_n_layers: int = 0
    rank_pattern: Sequence[str] = ()
    alpha_pattern: Sequence[str] = ()
    use_dora: bool = False

    @classmethod
    def from_config(cls, cfg) -> "LoraSpec":
        c = cfg.MODEL.LORA
        return cls(families=list(c.TARGET_MODULES), rank=c.RANK, alpha=c.ALPHA, dropout=c.DROPOUT,
                   layers=list(c.LAYERS), last_n_layers=c.LAST_N_LAYERS, rank_pattern=list(c.RANK_PATTERN),
                   alpha_pattern=list(c.ALPHA_PATTERN), use_dora=c.USE_DORA)


def selected_blocks(spec: LoraSpec, depth: int) -> List[int]:
    """Indices of the blocks that get adapters (``LAYERS`` / ``LAST_N_LAYERS`` / all)."""
    if spec.layers and spec.last_n_layers:
        raise ValueError("Set only one of MODEL.LORA.LAYERS and MODEL.LORA.LAST_N_LAYERS.")
    if spec.last_n_layers:
        if not 0 < spec.last_n_layers <= depth:
            raise ValueError(f"MODEL.LORA.LAST_N_LAYERS={spec.last_n_layers} must be in 1..{depth} "
                             f"(the model has {depth} blocks).")
        return list(range(depth - spec.last_n_layers, depth))
    if not spec.layers:
        return list(range(depth))
    bad = [i for i in spec.layers if not -depth <= i < depth]
    if bad:
        raise ValueError(f"MODEL.LORA.LAYERS contains {bad}, but the model has {depth} blocks "
                         f"(valid: {-depth}..{depth - 1}).")
    return sorted({i % depth for i in spec.layers})


def _parse_rules(rules: Sequence[str], key: str, depth: int, cast) -> List[Tuple[range, Optional[set], float]]:
    parsed = []
    for rule in rules:
        match = _RULE.match(str(rule))
        if not match:
            raise ValueError(f"{key} rule {rule!r} is not '<blocks>[/<families>]=<value>' "
                             "(blocks: '*', '7' or '0-5'; e.g. '0-5=8' or '*/fc1,fc2=16').")
        blocks = match.group("blocks").replace(" ", "")
        if blocks == "*":
            span = range(depth)
        else:
            lo, _, hi = blocks.partition("-")
            span = range(int(lo), int(hi or lo) + 1)
            if not span or span.stop > depth:
                raise ValueError(f"{key} rule {rule!r}: blocks {blocks} are outside 0..{depth - 1}.")
        families = None
        if match.group("families"):
            families = {f.strip() for f in match.group("families").split(",") if f.strip()}
            unknown = sorted(families - set(LORA_MODULE_FAMILIES))
            if unknown:
                raise ValueError(f"{key} rule {rule!r}: unknown module families {unknown}; "
                                 f"choose from {sorted(LORA_MODULE_FAMILIES)}.")
        try:
            value = cast(match.group("value"))
        except ValueError:
            raise ValueError(f"{key} rule {rule!r}: {match.group('value')!r} is not a valid value.") from None
        parsed.append((span, families, value))
    return parsed


def _apply_rules(rules, layer: int, family: str, default):
    value = default
    for span, families, rule_value in rules:
        if layer in span and (families is None or family in families):
            value = rule_value
    return value


def plan_lora(model: nn.Module, spec: LoraSpec) -> "OrderedDict[str, Dict]":
    """Decide, for every adapted module, its block, family, rank and alpha (nothing is changed)."""
    depth = num_blocks(model)
    blocks = set(selected_blocks(spec, depth))
    ranks = _parse_rules(spec.rank_pattern, "MODEL.LORA.RANK_PATTERN", depth, int)
    alphas = _parse_rules(spec.alpha_pattern, "MODEL.LORA.ALPHA_PATTERN", depth, float)
    plan = OrderedDict()
    for name in resolve_lora_target_modules(model, spec.families):
        layer, family = layer_index_of(name), family_of(name)
        if layer not in blocks:
            continue
        rank = _apply_rules(ranks, layer, family, spec.rank)
        if rank <= 0:
            raise ValueError(f"LoRA rank of {name} is {rank}; MODEL.LORA.RANK and RANK_PATTERN ranks must be "
                             "positive (leave a block out with MODEL.LORA.LAYERS instead).")
        plan[name] = {"layer": layer, "family": family, "rank": rank,
                      "alpha": _apply_rules(alphas, layer, family, spec.alpha)}
    if not plan:
        raise ValueError("MODEL.LORA selects no module (check LAYERS / LAST_N_LAYERS / TARGET_MODULES).")
    return plan
