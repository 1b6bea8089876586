"""LoRA adapters for DINOv2 through ``peft``: which layers, which module families, which ranks.

``MODEL.LORA.TARGET_MODULES`` names *module families* (``query``, ``key``, ``value``, ``attn_out``,
``fc1``, ``fc2``). They are resolved against the module names of the model that was actually built,
so the same config works with transformers 4.x (``attention.attention.query`` ...) and 5.x
(``attention.q_proj`` ...), and with the SwiGLU FFN of ``dinov2-giant`` (``mlp.weights_in/out``).

Which transformer blocks get adapters: ``MODEL.LORA.LAYERS`` (explicit 0-based indices, negative
ones count from the end) or ``MODEL.LORA.LAST_N_LAYERS``; by default every block.

Per-layer ranks and alphas: ``MODEL.LORA.RANK_PATTERN`` / ``ALPHA_PATTERN`` are lists of rules
``"<blocks>[/<families>]=<value>"`` where ``<blocks>`` is ``*``, one index ``7`` or an inclusive
range ``0-5`` and ``<families>`` a comma-separated subset of the families, e.g.
``["0-5=4", "6-11=16", "*/fc1,fc2=8"]``. Later rules override earlier ones; modules no rule
matches use ``RANK`` / ``ALPHA``. They become ``peft``'s ``rank_pattern`` / ``alpha_pattern`` with
one exact entry per adapted module.
"""
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

logger = logging.getLogger(__name__)

# Each family lists the module-name suffixes used for it by the supported transformers versions.
LORA_MODULE_FAMILIES: Dict[str, Sequence[str]] = {
    "query": ("attention.q_proj", "attention.attention.query"),
    "key": ("attention.k_proj", "attention.attention.key"),
    "value": ("attention.v_proj", "attention.attention.value"),
    "attn_out": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "mlp.weights_in"),
    "fc2": ("mlp.fc2", "mlp.weights_out"),
}

_LAYER_INDEX = re.compile(r"(?:^|\.)layer\.(\d+)\.")
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


def family_of(name: str) -> Optional[str]:
    """The module family of a (module or parameter) name, or ``None``."""
    for family, suffixes in LORA_MODULE_FAMILIES.items():
        for suffix in suffixes:
            if name.endswith(suffix) or f"{suffix}." in name:
                return family
    return None


def layer_index_of(name: str) -> Optional[int]:
    """The transformer block index in a module name such as ``encoder.layer.3.attention.q_proj``."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _num_blocks(model: nn.Module) -> int:
    indices = {layer_index_of(n) for n, _ in model.named_modules()} - {None}
    return max(indices) + 1 if indices else 0


def resolve_lora_target_modules(model: nn.Module, families: Sequence[str]) -> List[str]:
    """Full names of the ``nn.Linear`` modules of ``model`` that belong to ``families``."""
    unknown = [f for f in families if f not in LORA_MODULE_FAMILIES]
    if unknown:
        raise ValueError(
            f"MODEL.LORA.TARGET_MODULES contains unknown module families {unknown}; "
            f"choose from {sorted(LORA_MODULE_FAMILIES)}."
        )
    if not families:
        raise ValueError("MODEL.LORA.TARGET_MODULES is empty; set MODEL.LORA.ENABLED=False instead.")
    suffixes = tuple(s for f in families for s in LORA_MODULE_FAMILIES[f])
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(suffixes)
    ]
    if not names:
        raise ValueError(
            f"No linear layers of the DINOv2 model match MODEL.LORA.TARGET_MODULES={list(families)} "
            f"(looked for names ending in {suffixes}). This transformers version may name them "
            "differently; please report it."
        )
    return names


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
    depth = _num_blocks(model)
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


def lora_config_for(plan: "OrderedDict[str, Dict]", spec: LoraSpec, config_cls=None, **extra):
    """A ``peft`` config (``LoraConfig`` unless ``config_cls``) with exact per-module patterns."""
    from peft import LoraConfig

    config_cls = config_cls or LoraConfig
    rank_pattern = {re.escape(n): p["rank"] for n, p in plan.items() if p["rank"] != spec.rank}
    alpha_pattern = {re.escape(n): p["alpha"] for n, p in plan.items() if p["alpha"] != spec.alpha}
    kwargs = dict(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(plan),
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if spec.use_dora:
        kwargs["use_dora"] = True
    kwargs.update(extra)
    return config_cls(**kwargs)


def inject_lora(model: nn.Module, spec: LoraSpec) -> "OrderedDict[str, Dict]":
    """Inject LoRA (or DoRA) adapters into ``model`` in place (``peft.inject_adapter_in_model``).

    Module names keep their place in the model; ``peft`` wraps each target ``nn.Linear`` so its
    weight becomes ``<name>.base_layer.weight`` and adds ``<name>.lora_A/B.default.weight`` (and
    ``lora_magnitude_vector`` for DoRA). Returns the plan (module -> block, family, rank, alpha).
    """
    from peft import inject_adapter_in_model

    if spec.rank <= 0:
        raise ValueError(f"MODEL.LORA.RANK must be a positive integer, got {spec.rank}.")
    plan = plan_lora(model, spec)
    inject_adapter_in_model(lora_config_for(plan, spec), model)
    ranks = sorted({p["rank"] for p in plan.values()})
    logger.info("%s injected into %d modules of DINOv2 (blocks %s, families %s, ranks %s)",
                "DoRA" if spec.use_dora else "LoRA", len(plan), sorted({p["layer"] for p in plan.values()}),
                sorted({p["family"] for p in plan.values()}), ranks)
    return plan


def is_lora_parameter(name: str) -> bool:
    """True for parameters created by peft's LoRA / DoRA / AdaLoRA layers."""
    return "lora_" in name


def trainable_parameter_report(model: nn.Module) -> "OrderedDict[str, int]":
    """Parameter counts: total, trainable, and trainable per kind (LoRA per module family,
    unfrozen backbone, neck, rest of the detector)."""
    report = OrderedDict(total=0, trainable=0)
    for name, param in model.named_parameters():
        n = param.numel()
        report["total"] += n
        if not param.requires_grad:
            continue
        report["trainable"] += n
        if is_lora_parameter(name):
            key = f"lora/{family_of(name) or 'other'}"
        elif name.startswith("backbone.") and ".stages." in name:
            key = "neck"
        elif name.startswith("backbone."):
            key = "backbone (unfrozen)"
        else:
            key = name.split(".", 1)[0]
        report[key] = report.get(key, 0) + n
    return report


def merge_lora_(model: nn.Module) -> int:
    """Merge every LoRA / DoRA / AdaLoRA adapter of ``model`` into its base linear layer and
    replace the ``peft`` wrapper by that plain ``nn.Linear``, in place.

    Afterwards ``model.state_dict()`` has the plain names (``...q_proj.weight``) and loads into a
    model built with ``MODEL.LORA.ENABLED False``; inference costs exactly the unadapted model.
    Returns the number of merged layers.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(safe_merge=True)  # raises if a merged weight is not finite
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.get_base_layer())
        merged += 1
    return merged


# ------------------------------------------------------------------------------------------------
# AdaLoRA: adaptive rank allocation (peft's AdaLoraModel and its RankAllocator)
# ------------------------------------------------------------------------------------------------
ADALORA_ATTRIBUTE = "adalora_tuner"


def inject_adalora(model: nn.Module, spec: LoraSpec, *, init_r: int, target_r: int, total_step: int,
                   tinit: int = 0, tfinal: int = 0, delta_t: int = 10, beta1: float = 0.85, beta2: float = 0.85,
                   orth_reg_weight: float = 0.5) -> "OrderedDict[str, Dict]":
    """Inject AdaLoRA adapters (SVD-form ``lora_A``, ``lora_E``, ``lora_B``) into ``model`` in place.

    Every targeted module starts at rank ``init_r``; the rank allocator then prunes singular
    values by importance so that the average rank reaches ``target_r`` after
    ``total_step - tfinal`` steps. ``peft``'s tuner object, which owns the allocator, is kept on
    ``model`` (as a plain attribute, outside the module tree and the state dict); it must be told
    every training step (:class:`dinodet2.engine.hooks.AdaLoraBudgetHook`).
    """
    from peft import AdaLoraConfig
    from peft.tuners.adalora import AdaLoraModel

    if spec.rank_pattern or spec.alpha_pattern or spec.use_dora:
        raise ValueError("MODEL.LORA.ADALORA.ENABLED decides ranks itself: leave MODEL.LORA.RANK_PATTERN, "
                         "ALPHA_PATTERN empty and USE_DORA False.")
    if not 0 < target_r <= init_r:
        raise ValueError(f"MODEL.LORA.ADALORA needs 0 < TARGET_R <= INIT_R, got TARGET_R={target_r}, INIT_R={init_r}.")
    if tinit + tfinal >= total_step:
        raise ValueError(f"MODEL.LORA.ADALORA: TINIT ({tinit}) + TFINAL ({tfinal}) must be smaller than "
                         f"SOLVER.MAX_ITER ({total_step}) to leave a budgeting phase.")
    plan = plan_lora(model, spec)
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                           beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight, total_step=total_step,
                           lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(plan))
    tuner = AdaLoraModel(model, config, "default")
    model.__dict__[ADALORA_ATTRIBUTE] = tuner  # not a submodule: no state-dict entries
    for p in plan.values():
        p["rank"] = init_r
    logger.info("AdaLoRA injected into %d modules (init_r=%d -> target_r=%d over %d steps)", len(plan), init_r,
                target_r, total_step)
    return plan


def find_adalora_tuner(model: nn.Module):
    """The AdaLoRA tuner attached by :func:`inject_adalora` anywhere inside ``model``, or None."""
    for module in model.modules():
        tuner = module.__dict__.get(ADALORA_ATTRIBUTE)
        if tuner is not None:
            return tuner
    return None


def adalora_orthogonal_regularization(tuner):
    """AdaLoRA's orthogonality penalty on ``P`` (``lora_A``) and ``Q`` (``lora_B``), as ``peft``
    adds it to a transformers model's loss: mean over matrices of ``||P P^T - I||_F``."""
    import torch

    total, count = None, 0
    for name, param in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and param.requires_grad and param.numel():
            cov = param @ param.T if "lora_A" in name else param.T @ param
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            term = torch.linalg.matrix_norm(cov - eye)
            total = term if total is None else total + term
            count += 1
    return None if total is None else total / count


def adalora_rank_allocation(model: nn.Module) -> "OrderedDict[str, int]":
    """Current rank of every AdaLoRA module (names relative to the ViT): the number of singular
    values the rank allocator keeps (its mask in ``rank_pattern``; ``INIT_R`` before the first
    pruning)."""
    tuner = find_adalora_tuner(model)
    if tuner is None:
        return OrderedDict()
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern or {}
    suffix = f".lora_E.{tuner.trainable_adapter_name}"
    ranks = OrderedDict()
    for name, param in tuner.model.named_parameters():
        if name.endswith(suffix):
            mask = pattern.get(name, pattern.get(name.replace(f".{tuner.trainable_adapter_name}", "")))
            ranks[name[: -len(suffix)]] = int(sum(bool(v) for v in mask)) if mask is not None else param.shape[0]
    return ranks
