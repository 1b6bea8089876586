"""The CUDA check (``benchmarks/gpu_check.sh`` runs it): a short training of the improved COCO-sized
config in AMP fp16 and bf16, inference with and without the LoRA adapters merged, and the efficiency
switches, each on a fixed-seed synthetic batch (``dinodet2.benchmarking.run_benchmark``): s/iter,
peak CUDA memory and whether every loss stayed finite, in one table.

The model is ``configs/COCO-Detection/detr_dinov2_base_lora4_sfp_improved.yaml`` with a randomly
initialised DINOv2 of dinov2-base's size (768-d, 12 blocks; no download) at 1024 x 1024, batch 2::

    bash benchmarks/gpu_check.sh                       # all rows, JSON in output/gpu_check.json
    python benchmarks/gpu_check.py --iters 5 --image-size 512 --output out.json
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from dinodet2.benchmarking import run_benchmark  # noqa: E402
from dinodet2.config import load_dinodet2_config  # noqa: E402

COCO_CONFIG = os.path.join(_REPO_ROOT, "configs", "COCO-Detection", "detr_dinov2_base_lora4_sfp_improved.yaml")
EFFICIENCY = ["MODEL.DETR.SPARSE_ENCODER.ENABLED", "True", "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO", "0.3",
              "MODEL.DINOV2.WINDOW_BLOCK_INDEXES", "[0, 1, 3, 4, 6, 7, 9, 10]", "MODEL.DINOV2.NUM_WINDOWS", "4"]

# (name, mode, overrides, merge LoRA before timing)
ROWS = [
    ("train, AMP fp16", "train", ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "float16"], False),
    ("train, AMP bf16", "train", ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"], False),
    ("train, fp32", "train", [], False),
    ("train, AMP bf16 + sparse encoder 0.3 + windowed ViT", "train",
     ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16", *EFFICIENCY], False),
    ("inference, LoRA adapters", "inference", [], False),
    ("inference, LoRA merged", "inference", [], True),
    ("inference, sparse encoder 0.3 + windowed ViT", "inference", EFFICIENCY, False),
]


def measure(args) -> List[Dict]:
    from detectron2.modeling import build_model

    from dinodet2.modeling.backbone.lora import merge_lora_

    rows = []
    for name, mode, overrides, merge in ROWS:
        cfg = load_dinodet2_config(args.config, ["MODEL.DEVICE", args.device, "MODEL.DINOV2.RANDOM_INIT", "True",
                                                 "SOLVER.IMS_PER_BATCH", str(args.batch), *overrides, *args.opts])
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            model = None
            if merge:
                torch.manual_seed(0)
                model = build_model(cfg)
                merge_lora_(model)
            r = run_benchmark(cfg, mode, args.image_size, args.batch, args.iters, args.warmup, count_flops=False,
                              model=model)
            rows.append({"name": name, "status": "ok", **r})
        except Exception as e:  # one failing row must not hide the others
            rows.append({"name": name, "mode": mode, "status": f"failed: {type(e).__name__}: {e}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def format_markdown(rows: Sequence[Dict], device_name: str) -> str:
    lines = [f"{device_name}, torch {torch.__version__}", "",
             "| row | s/iter (median) | peak memory (MiB) | losses finite | status |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | – | – | – | {r['status']} |")
            continue
        finite = {True: "yes", False: "**no**", None: "–"}[r.get("losses_finite")]
        lines.append(f"| {r['name']} | {r['median_s_per_iter']:.3f} | {r['peak_memory_mib']:.0f} | {finite} | ok |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=COCO_CONFIG)
    p.add_argument("--device", default="cuda")
    p.add_argument("--image-size", type=int, nargs="+", default=[1024])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", default=os.path.join(_REPO_ROOT, "output", "gpu_check.json"))
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (torch.cuda.is_available() is False); this check is for CUDA machines. "
                 "Use --device cpu to try the script itself.")
    rows = measure(args)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=2, default=str)
    print(format_markdown(rows, name))
    if any(r["status"] != "ok" or r.get("losses_finite") is False for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
