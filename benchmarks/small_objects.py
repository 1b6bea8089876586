"""Small objects and precise boxes (README, "Affordable high resolution", "Scale-aware prediction
heads", "Sliced inference", "Cascade refinement"): what each option costs, on the improved recipe of
the hard data (``configs/Demo/detr_shapes_hard_improved.yaml``)::

    python benchmarks/small_objects.py --sections cost --output output/small_objects.json
    python benchmarks/small_objects.py --sections training,sliced --iters 300 --seeds 1 2 --reuse \
        --output output/small_objects.json SOLVER.IMS_PER_BATCH 4

Sections:

* ``cost``: per option, one training step and one inference forward on a fixed synthetic batch:
  GFLOPs per image (``FlopCounterMode``; ``grid_sample`` is not counted), the peak of live tensors
  other than the weights (PyTorch's ``MemTracker``: exact and repeatable, unlike RSS) and the median
  seconds per step (only meaningful on an idle machine: every row says how busy the CPU was).

* ``training``: every option, all of them together and the recommended combination, each trained
  ``--iters`` iterations per seed with ``tools/train_net.py`` on ``shapes_hard_train`` and evaluated
  on ``shapes_hard_val``: AP, AP50, AP75, APs, APm, s/iter (from the training log), peak RSS; mean
  over the seeds. ``--reuse`` completes an interrupted measurement.
* ``sliced``: one trained model (``--weights``; default the ``training`` section's first improved-recipe
  run) on large generated images (``--large-images`` of ``--large-size`` px, the hard data's objects of
  6-80 px), whole-image inference (the test-time resize shrinks them) vs sliced inference
  (``TEST.SLICED``): AP, APs and seconds per image.
"""
import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from dinodet2.benchmarking.training_runs import fixed_budget_run, mean_over_seeds, write_json  # noqa: E402
from dinodet2.engine.cpu_allocator import keep_freed_memory  # noqa: E402

HARD_CONFIG = os.path.join(_REPO_ROOT, "configs", "Demo", "detr_shapes_hard_improved.yaml")
SECTIONS = ("cost", "training", "sliced")
FOUR_LEVELS = ["MODEL.SFP.SCALE_FACTORS", "[4.0, 2.0, 1.0, 0.5]"]

# name -> config overrides
COST_OPTIONS = {
    "improved recipe (strides 7 / 14 / 28)": [],
    "+ stride-3.5 level, encoded": FOUR_LEVELS,
    "+ stride-3.5 level, decoder only": [*FOUR_LEVELS, "MODEL.DETR.DECODER_ONLY_LEVELS", "[0]"],
    "+ per-level proposal heads": ["MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS", "per_level"],
    "+ size-conditioned decoder heads": ["MODEL.DETR.SCALE_AWARE.DECODER_HEADS", "size_conditioned"],
    "+ cascade refinement": ["MODEL.DETR.REFINEMENT.ENABLED", "True"],
}


# name -> config overrides of the training comparison
TRAINING_OPTIONS = {
    "improved recipe": [],
    "+ stride-3.5 level, decoder only": [*FOUR_LEVELS, "MODEL.DETR.DECODER_ONLY_LEVELS", "[0]"],
    "+ per-level proposal heads": ["MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS", "per_level"],
    "+ size-conditioned decoder heads": ["MODEL.DETR.SCALE_AWARE.DECODER_HEADS", "size_conditioned"],
    "+ cascade refinement": ["MODEL.DETR.REFINEMENT.ENABLED", "True"],
}
TRAINING_OPTIONS["all of them"] = [v for overrides in TRAINING_OPTIONS.values() for v in overrides]
# What helped on its own: cascade refinement (which then pools the stride-3.5 level) on top of the
# decoder-only stride-3.5 level; without the scale-aware heads, which did not help.
RECOMMENDED = "cascade + stride-3.5 level, decoder only"  # configs/Demo/detr_shapes_hard_small_objects.yaml
TRAINING_OPTIONS[RECOMMENDED] = [*TRAINING_OPTIONS["+ stride-3.5 level, decoder only"],
                                 *TRAINING_OPTIONS["+ cascade refinement"]]
COST_OPTIONS["all of them (stride 3.5 decoder only)"] = TRAINING_OPTIONS["all of them"]
COST_OPTIONS[RECOMMENDED] = TRAINING_OPTIONS[RECOMMENDED]
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "s_per_iter", "peak_rss_mib")


def run_name(name: str, seed: int) -> str:
    return f"seed{seed}_" + "".join(c if c.isalnum() else "_" for c in name)


def measure_training(args) -> Dict:
    rows = []
    names = args.options or list(TRAINING_OPTIONS)
    unknown = [n for n in names if n not in TRAINING_OPTIONS]
    if unknown:
        raise SystemExit(f"error: unknown --options {unknown}; choose from {list(TRAINING_OPTIONS)}")
    for seed in args.seeds:
        for name in names:
            overrides = TRAINING_OPTIONS[name]
            out = os.path.join(args.work_dir, run_name(name, seed))
            r = fixed_budget_run(os.path.abspath(args.config), [*overrides, *args.opts], out, args.iters, seed,
                                 cwd=_REPO_ROOT, reuse=args.reuse, label="small_objects")
            rows.append({"variant": name, "seed": seed, "overrides": overrides, **r})
            print(f"[small_objects] {name} seed {seed}: AP {r.get('AP')}", file=sys.stderr, flush=True)
    return {"iters": args.iters, "seeds": args.seeds, "rows": rows, "summary": mean_over_seeds(rows, SUMMARY_KEYS)}


def measure_sliced(args) -> Dict:
    """Whole-image vs sliced inference of one trained model on large generated images."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from dinodet2.config import load_dinodet2_config
    from dinodet2.data.shapes_hard import register_shapes_hard_dataset
    from dinodet2.engine.checkpoint import Dinodet2Checkpointer
    from dinodet2.engine.trainer import Trainer

    weights = args.weights or os.path.join(args.work_dir, run_name("improved recipe", args.seeds[0]), "model_final.pth")
    name = f"shapes_hard_large_{args.large_size}"
    if name not in DatasetCatalog.list():
        register_shapes_hard_dataset(name, os.path.join(args.work_dir, "large_images"), f"large{args.large_size}",
                                     args.large_images, seed=7, min_size=args.large_size * 7 // 8,
                                     max_size=args.large_size)
    settings = {"whole image (test-time resize)": [],
                f"sliced: {args.tile_size} px tiles, overlap {args.overlap}, + whole image":
                    ["TEST.SLICED.ENABLED", "True", "TEST.SLICED.TILE_SIZE", str(args.tile_size),
                     "TEST.SLICED.OVERLAP", str(args.overlap)]}
    rows = []
    for label, overrides in settings.items():
        cfg = load_dinodet2_config(args.config, [*args.opts, *overrides, "DATASETS.TEST", f"('{name}',)",
                                                 "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
                                                 "OUTPUT_DIR", os.path.join(args.work_dir, "sliced_eval")])
        model = build_model(cfg)
        Dinodet2Checkpointer(model).load(weights)
        model.eval()
        print(f"[small_objects] sliced: {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results = Trainer.test(cfg, model)
        seconds = time.perf_counter() - start
        bbox = results[name]["bbox"] if name in results else results["bbox"]
        rows.append({"setting": label, "AP": bbox["AP"], "AP50": bbox["AP50"], "APs": bbox["APs"],
                     "s_per_image": seconds / args.large_images})
    return {"weights": weights, "images": args.large_images, "size": args.large_size, "rows": rows}


def measure_cost(config: str, options: Dict[str, List[str]], opts: Sequence[str], image_size: Sequence[int],
                 batch: int, iters: int, warmup: int) -> List[Dict]:
    from detectron2.modeling import build_model

    from dinodet2.benchmarking import run_benchmark
    from dinodet2.benchmarking.model_benchmark import make_synthetic_batch, seed_everything
    from dinodet2.benchmarking.measurement import tensor_peak_mib
    from dinodet2.config import load_dinodet2_config

    rows = []
    # The process's first model runs slower (heap growth, page faults, lazy initialisation): one untimed
    # pass of the first option first, so that the first row is timed like the others.
    first = load_dinodet2_config(config, [*next(iter(options.values())), *opts, "MODEL.DEVICE", "cpu"])
    for mode in ("train", "inference"):
        run_benchmark(first, mode, list(image_size), batch, 1, warmup, count_flops=False)
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

        row["tensor_peak_train_mib"] = tensor_peak_mib(train_step, model)  # None: not counted
        row["tensor_peak_inference_mib"] = tensor_peak_mib(inference_step, model, inference=True)
        rows.append(row)
    return rows


def format_markdown(result: Dict) -> str:
    lines: List[str] = []
    if "cost" in result:
        lines += _format_cost(result["cost"])
    if "training" in result:
        t = result["training"]
        lines += ["", f"{t['iters']} iterations per run, seeds {t['seeds']} (mean; AP per seed in brackets):", "",
                  "| option | AP | AP50 | AP75 | APs | APm | s/iter (logged) | peak RSS (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in t["summary"]:
            per = "/".join(f"{v:.2f}" for v in r["AP_per_seed"])
            lines.append(f"| {r['variant']} | {_f(r['AP'])} ({per}) | {_f(r['AP50'])} | {_f(r['AP75'])} | "
                         f"{_f(r['APs'])} | {_f(r.get('APm'))} | {_f(r['s_per_iter'], 3)} | "
                         f"{_f(r['peak_rss_mib'], 0)} |")
    if "sliced" in result:
        sl = result["sliced"]
        lines += ["", f"{sl['images']} generated images, sides {sl['size'] * 7 // 8}-{sl['size']} px ({sl['weights']}):", "",
                  "| inference | AP | AP50 | APs | s/image |", "|---|---|---|---|---|"]
        for r in sl["rows"]:
            lines.append(f"| {r['setting']} | {_f(r['AP'])} | {_f(r['AP50'])} | {_f(r['APs'])} | "
                         f"{r['s_per_image']:.2f} |")
    return "\n".join(lines)


def _f(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _format_cost(c: Dict) -> List[str]:
    lines = [f"Synthetic batch of {c['batch']} at {c['image_size'][0]} x {c['image_size'][1]}, median of {c['iters']}:",
             "", "| option | GFLOPs/img | tensor peak, train step (MiB) | tensor peak, inference (MiB) | "
             "train s/iter | inference s/iter | inference images/s | other CPU load (cores) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        load = max(r["train"]["other_processes_cpu_cores"] or 0, r["inference"]["other_processes_cpu_cores"] or 0)
        train_peak = "–" if r["tensor_peak_train_mib"] is None else f"{r['tensor_peak_train_mib']:.0f}"
        lines.append(f"| {r['name']} | {r['gflops_per_image']:.2f} | {train_peak} | "
                     f"{r['tensor_peak_inference_mib']:.0f} | {r['train']['s_per_iter']:.3f} | "
                     f"{r['inference']['s_per_iter']:.3f} | {c['batch'] / r['inference']['s_per_iter']:.2f} | "
                     f"{load:.1f} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="cost", help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--config", default=HARD_CONFIG)
    p.add_argument("--image-size", type=int, nargs=2, default=[352, 480])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="cost: timed steps; training: iterations per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--options", nargs="+", default=None,
                   help="the options to run in the cost or the training section (default: all of the section's)")
    p.add_argument("--work-dir", default=os.path.join(_REPO_ROOT, "output", "small_objects"))
    p.add_argument("--reuse", action="store_true", help="read finished training runs instead of running them again")
    p.add_argument("--weights", default=None, help="sliced section: the trained model (default: see the docstring)")
    p.add_argument("--large-images", type=int, default=20)
    p.add_argument("--large-size", type=int, default=2048)
    p.add_argument("--tile-size", type=int, default=320)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--output", default=None, metavar="JSON")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(sections) - set(SECTIONS):
        sys.exit(f"error: unknown sections {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the tools (CPU_ALLOCATOR.KEEP_FREED_MEMORY): no page faults in every step
    result: Dict = {"command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "torch": torch.__version__}
    if "cost" in sections:
        names = args.options or list(COST_OPTIONS)
        if set(names) - set(COST_OPTIONS):
            sys.exit(f"error: unknown --options {sorted(set(names) - set(COST_OPTIONS))} for the cost section; "
                     f"choose from {list(COST_OPTIONS)}")
        options = {name: COST_OPTIONS[name] for name in names}
        result["cost"] = {"image_size": args.image_size, "batch": args.batch, "iters": args.iters,
                          "rows": measure_cost(args.config, options, args.opts, args.image_size, args.batch,
                                               args.iters, args.warmup)}
    for section, measure in (("training", measure_training), ("sliced", measure_sliced)):
        if section in sections:
            result[section] = measure(args)
            if args.output:  # keep what is measured so far
                write_json(args.output, result)
    if args.output:
        write_json(args.output, result)
    print(format_markdown(result))
    return result


if __name__ == "__main__":
    main()
