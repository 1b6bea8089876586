"""Small objects and precise boxes (README, "Affordable high resolution", "Scale-aware prediction
heads", "Sliced inference", "Cascade refinement"): what each option costs, on the improved recipe of
the hard data (``configs/Demo/detr_shapes_hard_improved.yaml``)::

    python benchmarks/small_objects.py --sections cost --output output/small_objects.json

Sections:

* ``cost``: per option, one training step and one inference forward on a fixed synthetic batch:
  GFLOPs per image (``FlopCounterMode``; ``grid_sample`` is not counted), the peak of live tensors
  other than the weights (PyTorch's ``MemTracker``: exact and repeatable, unlike RSS) and the median
  seconds per step (only meaningful on an idle machine: every row says how busy the CPU was).

The training comparisons (AP on the hard data, two seeds, every option and the recommended
combination) and sliced vs whole-image inference on large images are the issue's remaining
measurements; they are not in this script yet.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

HARD_CONFIG = os.path.join(_REPO_ROOT, "configs", "Demo", "detr_shapes_hard_improved.yaml")
FOUR_LEVELS = ["MODEL.SFP.SCALE_FACTORS", "[4.0, 2.0, 1.0, 0.5]"]

# name -> config overrides
COST_OPTIONS = {
    "improved recipe (strides 7 / 14 / 28)": [],
    "+ stride-3.5 level, encoded": FOUR_LEVELS,
    "+ stride-3.5 level, decoder only": [*FOUR_LEVELS, "MODEL.DETR.DECODER_ONLY_LEVELS", "[0]"],
    "+ per-level proposal heads": ["MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS", "per_level"],
    "+ size-conditioned decoder heads": ["MODEL.DETR.SCALE_AWARE.DECODER_HEADS", "size_conditioned"],
}


def measure_cost(config: str, options: Dict[str, List[str]], opts: Sequence[str], image_size: Sequence[int],
                 batch: int, iters: int, warmup: int) -> List[Dict]:
    from detectron2.modeling import build_model

    from dinodet2.benchmarking import run_benchmark
    from dinodet2.benchmarking.model_benchmark import make_synthetic_batch, seed_everything
    from dinodet2.benchmarking.windowed_vit import tensor_peak_mib
    from dinodet2.config import load_dinodet2_config

    rows = []
    for name, overrides in options.items():
        cfg = load_dinodet2_config(config, [*overrides, *opts, "MODEL.DEVICE", "cpu"])
        print(f"[small_objects] cost: {name} ...", file=sys.stderr, flush=True)
        row = {"name": name, "overrides": overrides}
        for mode in ("train", "inference"):
            r = run_benchmark(cfg, mode, list(image_size), batch, iters, warmup, count_flops=(mode == "inference"))
            row[mode] = {"s_per_iter": r["median_s_per_iter"], "other_processes_cpu_cores": r["other_processes_cpu_cores"]}
            if mode == "inference":
                row["gflops_per_image"] = r["gflops_per_image"]
        seed_everything(0)
        model = build_model(cfg)
        data = make_synthetic_batch(tuple(image_size), batch, cfg.MODEL.DETR.NUM_CLASSES)

        def train_step():
            model.train()
            sum(model(data).values()).backward()

        def inference_step():
            model.eval()
            with torch.no_grad():
                model([{k: v for k, v in x.items() if k != "instances"} for x in data])

        try:
            row["tensor_peak_train_mib"] = tensor_peak_mib(train_step, model)
        except AssertionError:  # MemTracker's module hooks and some training graphs (torch 2.14): not counted
            row["tensor_peak_train_mib"] = None
        row["tensor_peak_inference_mib"] = tensor_peak_mib(inference_step, model, inference=True)
        rows.append(row)
    return rows


def format_markdown(result: Dict) -> str:
    c = result["cost"]
    lines = [f"Synthetic batch of {c['batch']} at {c['image_size'][0]} x {c['image_size'][1]}, median of {c['iters']}:",
             "", "| option | GFLOPs/img | tensor peak, train step (MiB) | tensor peak, inference (MiB) | "
             "train s/iter | inference s/iter | other CPU load (cores) |", "|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        load = max(r["train"]["other_processes_cpu_cores"] or 0, r["inference"]["other_processes_cpu_cores"] or 0)
        train_peak = "–" if r["tensor_peak_train_mib"] is None else f"{r['tensor_peak_train_mib']:.0f}"
        lines.append(f"| {r['name']} | {r['gflops_per_image']:.2f} | {train_peak} | "
                     f"{r['tensor_peak_inference_mib']:.0f} | {r['train']['s_per_iter']:.3f} | "
                     f"{r['inference']['s_per_iter']:.3f} | {load:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="cost", help="comma list of: cost")
    p.add_argument("--config", default=HARD_CONFIG)
    p.add_argument("--image-size", type=int, nargs=2, default=[352, 480])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, metavar="JSON")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(sections) - {"cost"}:
        sys.exit(f"error: unknown sections {sorted(set(sections) - {'cost'})}; this script has: cost")
    torch.set_num_threads(args.threads)
    result: Dict = {"command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "torch": torch.__version__}
    if "cost" in sections:
        result["cost"] = {"image_size": args.image_size, "batch": args.batch, "iters": args.iters,
                          "rows": measure_cost(args.config, COST_OPTIONS, args.opts, args.image_size, args.batch,
                                               args.iters, args.warmup)}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    print(format_markdown(result))
    return result


if __name__ == "__main__":
    main()
