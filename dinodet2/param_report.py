"""Parameter reports of a built model: counts per kind (LoRA per module family, unfrozen backbone,
neck, rest of the detector) and the summary the trainer logs (``tools/param_report.py`` prints
the same counts)."""
import logging
from collections import OrderedDict

import torch.nn as nn

from .modeling.backbone.lora import family_of, is_lora_parameter

logger = logging.getLogger(__name__)

__all__ = ["log_parameter_summary", "trainable_parameter_report"]


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
