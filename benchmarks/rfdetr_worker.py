#!/usr/bin/env python
"""The RF-DETR side of ``benchmarks/compare_rfdetr.py``; runs inside RF-DETR's own virtualenv
(``.venv-rfdetr/``, which has ``rfdetr`` and no Detectron2 / dinodet2), started as a subprocess.

``--describe``: build nothing, write RF-DETR's architecture for ``--variant`` (with ``--overrides``
applied to its ``ModelConfig``) as JSON; ``compare_rfdetr.py`` derives our matching config from it.
Otherwise: build the variant with a randomly initialised DINOv2 and time ``--modes`` on the images
and targets of ``--batch`` (a ``torch.save`` file written by ``compare_rfdetr.py``, so both sides see
the same pixels and boxes), with the timing helpers of ``dinodet2/benchmarking/measurement.py``
(loaded from its file: that module needs only ``torch``), and write the results as JSON.

Random initialisation: RF-DETR's variants with patch 16 (nano, small, medium, large) never load
DINOv2 weights (``rfdetr.models.backbone.dinov2.DinoV2``: a patch size other than 14 or a position
table other than 518 px switches loading off), and ``pretrain_weights=None`` skips RF-DETR's own
checkpoint; ``HF_HUB_OFFLINE=1`` makes any attempted download fail instead of happening.
"""
import argparse
import importlib.util
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: --variant -> rfdetr.config class (rfdetr 1.11)
VARIANT_CONFIGS = {"nano": "RFDETRNanoConfig", "small": "RFDETRSmallConfig", "medium": "RFDETRMediumConfig",
                   "large": "RFDETRLargeConfig"}
#: ImageNet statistics on [0, 1] pixels, what RF-DETR's preprocessing normalises with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_measurement():
    """``dinodet2/benchmarking/measurement.py`` as a module, without importing dinodet2 (Detectron2)."""
    path = os.path.join(_REPO_ROOT, "dinodet2", "benchmarking", "measurement.py")
    spec = importlib.util.spec_from_file_location("dinodet2_measurement", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config(variant: str, overrides: dict):
    import rfdetr.config

    config = getattr(rfdetr.config, VARIANT_CONFIGS[variant])(pretrain_weights=None, device="cpu", **overrides)
    if config.patch_size == 14:
        raise SystemExit(f"rfdetr_worker: variant '{variant}' has patch size 14, for which RF-DETR loads pretrained "
                         "DINOv2 weights from the Hub; use a patch-16 variant (nano, small, medium, large).")
    return config


def describe(config) -> dict:
    """What RF-DETR builds for ``config``: the ViT, its windows, the projector and the decoder."""
    from importlib.metadata import version

    from rfdetr.models import MODEL_DEFAULTS
    from rfdetr.models.backbone.dinov2 import compute_window_block_indexes, get_config

    parts = config.encoder.split("_")
    registers = "registers" in parts
    vit = get_config(parts[-1], registers)
    return {
        "rfdetr_version": version("rfdetr"),
        "config_class": type(config).__name__,
        "encoder": config.encoder,
        "vit_hidden_size": vit["hidden_size"],
        "vit_layers": vit["num_hidden_layers"],
        "vit_heads": vit["num_attention_heads"],
        "vit_mlp_ratio": vit["mlp_ratio"],
        "vit_register_tokens": vit.get("num_register_tokens", 0) if registers else 0,
        "windowed": "windowed" in parts,
        "patch_size": config.patch_size,
        "positional_encoding_size": config.positional_encoding_size,
        "resolution": config.resolution,
        "num_windows": config.num_windows,
        "window_block_indexes": compute_window_block_indexes(config.out_feature_indexes,
                                                             MODEL_DEFAULTS.window_block_indexes),
        "out_feature_indexes": list(config.out_feature_indexes),
        "projector_scale": list(config.projector_scale),
        "hidden_dim": config.hidden_dim,
        "dec_layers": config.dec_layers,
        "sa_nheads": config.sa_nheads,
        "ca_nheads": config.ca_nheads,
        "dec_n_points": config.dec_n_points,
        "dim_feedforward": MODEL_DEFAULTS.dim_feedforward,
        "dropout": MODEL_DEFAULTS.dropout,
        "num_queries": config.num_queries,
        "num_select": config.num_select,
        "group_detr": config.group_detr,
        "two_stage": config.two_stage,
        "lite_refpoint_refine": config.lite_refpoint_refine,
        "bbox_reparam": config.bbox_reparam,
        "ia_bce_loss": config.ia_bce_loss,
        "aux_loss": MODEL_DEFAULTS.aux_loss,
        "num_classes": config.num_classes,
        "freeze_encoder": config.freeze_encoder,
        "backbone_lora": config.backbone_lora,
    }


def build(config, seed: int):
    """(model, criterion, postprocess) with fresh random weights (seeded)."""
    from rfdetr.config import TrainConfig
    from rfdetr.models import build_criterion_from_config, build_model_from_config

    torch.manual_seed(seed)
    train_config = TrainConfig(dataset_dir=".", output_dir=os.path.join(_REPO_ROOT, "output", "rfdetr_worker"))
    model = build_model_from_config(config, train_config)
    criterion, postprocess = build_criterion_from_config(config, train_config)
    return model, criterion, postprocess


def normalise(images: torch.Tensor) -> torch.Tensor:
    """0-255 RGB -> RF-DETR's input (ImageNet-normalised [0, 1] pixels)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images / 255.0 - mean) / std


def train_step(model, criterion, images, targets, solver: dict):
    """forward + weighted loss sum + zero_grad + backward + full-model clipping + AdamW (fused where
    torch has it, as RF-DETR's ``fused_optimizer`` and our ``SOLVER.FUSED``), as our benchmark's step."""
    model.train()
    criterion.train()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        optimizer = torch.optim.AdamW(groups, lr=solver["lr"], weight_decay=solver["weight_decay"], fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=solver["lr"], weight_decay=solver["weight_decay"])
    params = decay + no_decay
    weights = criterion.weight_dict

    def step():
        outputs = model(normalise(images), targets)
        loss_dict = criterion(outputs, targets)
        loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        optimizer.zero_grad()
        loss.backward()
        if solver.get("clip_norm"):
            torch.nn.utils.clip_grad_norm_(params, solver["clip_norm"])
        optimizer.step()

    return step


def inference_step(model, postprocess, images):
    """eval-mode forward + RF-DETR's PostProcess (top-``num_select`` boxes in pixels) under no_grad."""
    model.eval()
    sizes = torch.tensor([list(images.shape[-2:])] * images.shape[0])

    def step():
        with torch.no_grad():
            postprocess(model(normalise(images)), target_sizes=sizes)

    return step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="nano", choices=sorted(VARIANT_CONFIGS))
    p.add_argument("--overrides", default="{}", help="JSON dict of rfdetr ModelConfig fields")
    p.add_argument("--describe", action="store_true")
    p.add_argument("--batch", help="torch.save file: images [B, 3, H, W] 0-255, targets, solver")
    p.add_argument("--modes", default="train,inference")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, metavar="JSON")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = model_config(args.variant, json.loads(args.overrides))
    result = {"describe": describe(config), "torch_version": torch.__version__,
              "torch_threads": torch.get_num_threads()}
    if not args.describe:
        m = load_measurement()
        data = torch.load(args.batch, weights_only=True)
        model, criterion, postprocess = build(config, args.seed)
        for mode in [s.strip() for s in args.modes.split(",") if s.strip()]:
            images = data["images"] if mode == "train" else data["images"][:1]
            step = (train_step(model, criterion, images, data["targets"], data["solver"]) if mode == "train"
                    else inference_step(model, postprocess, images))
            print(f"[rfdetr_worker] {mode} ...", flush=True)
            with m.CpuContentionMeter() as contention:
                times = m.time_iterations(step, args.iters, args.warmup, "cpu")
            model.eval()
            one = normalise(data["images"][:1])
            result[mode] = {"mode": mode, "batch_size": images.shape[0], **m.summary_stats(times, images.shape[0]),
                            **m.parameter_counts(model),
                            "gflops_per_image": m.count_gflops_per_image(lambda: model(one), model),
                            "other_processes_cpu_cores": contention.rounded_other_cores}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
