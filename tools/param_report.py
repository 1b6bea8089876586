#!/usr/bin/env python
"""Parameter report of any dinodet2 config: total, trainable, and trainable per kind (LoRA per
module family, unfrozen backbone weights, neck, transformer, heads), plus every LoRA module with
its block, family, rank and alpha.

    python tools/param_report.py --config-file configs/COCO-Detection/detr_dinov2_base_lora4.yaml \\
        [--json report.json] [KEY VALUE ...]

Builds the model on CPU (``MODEL.DEVICE`` is forced to cpu; pretrained weights are loaded as
the config says, so use ``MODEL.DINOV2.RANDOM_INIT True`` to report a Hub model offline).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.modeling import build_model  # noqa: E402

from dinodet2.benchmarking import checkpoint_sizes  # noqa: E402
from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.modeling.backbone.lora import family_of, layer_index_of  # noqa: E402
from dinodet2.param_report import trainable_parameter_report  # noqa: E402


def lora_modules(model):
    from peft.tuners.lora import LoraLayer

    rows = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            rank = module.r.get("default", 0)
            rows.append({"module": name, "block": layer_index_of(name), "family": family_of(name), "rank": rank,
                         "alpha": module.lora_alpha.get("default"),
                         "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.add_argument("--checkpoint-sizes", action="store_true",
                        help="also report the size of a full and of a trainable-only checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_dinodet2_config(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    report = {"parameters": trainable_parameter_report(model), "lora_modules": lora_modules(model)}
    total = report["parameters"]["total"]
    print(f"{'kind':<28s} {'parameters':>14s} {'% of total':>10s}")
    for kind, count in report["parameters"].items():
        print(f"{kind:<28s} {count:>14,d} {100.0 * count / max(total, 1):>9.3f}%")
    if report["lora_modules"]:
        print(f"\n{len(report['lora_modules'])} LoRA modules:")
        for row in report["lora_modules"]:
            print(f"  block {row['block']:>2} {row['family']:<9s} rank {row['rank']:>3} alpha {row['alpha']:<6} "
                  f"{row['module']}")
    if args.checkpoint_sizes:
        report["checkpoint_bytes"] = checkpoint_sizes(model)
        print("\ncheckpoint size: full {full:,} bytes ({full_mib:.1f} MiB), trainable-only {trainable_only:,} bytes "
              "({trainable_only_mib:.2f} MiB)".format(**report["checkpoint_bytes"],
                                                      full_mib=report["checkpoint_bytes"]["full"] / 2**20,
                                                      trainable_only_mib=report["checkpoint_bytes"]["trainable_only"] / 2**20))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
