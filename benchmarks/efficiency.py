#!/usr/bin/env python
"""What the efficiency switches buy: speed, compute and accuracy of one trained model with each
inference-time mechanism, the side-by-side with HuggingFace Deformable DETR, windowed ViT
attention and ``torch.compile``, all in one command.

Sections (``--sections``, default all):

* ``inference``: the trained improved demo model (``--weights``; ``--train`` trains it first with
  ``tools/train_net.py`` and the demo config, like ``bash tools/dev.sh demo``) evaluated on
  ``shapes_val`` with the same weights under every inference-time setting: full compute, adaptive
  query count (threshold sweep), progressive query pruning (threshold sweep), any-depth decoding
  (depths 1..N), ``torch.compile``, and the recommended combination. Per setting: COCO AP / AP50 /
  APs (Detectron2's ``COCOEvaluator``), images/s at batch 1 and 8 over the validation images
  (model call incl. post-processing, after warm-up), GFLOPs/image (``FlopCounterMode``, mean over
  the timed images), mean queries per image entering the decoder, mean decoder layers run and mean
  query-layers per image.
* ``hf``: ``benchmarks/compare_hf.py``'s deformable configuration (same random DINOv2 + LoRA,
  3 levels, 6+6 layers, 100 queries, 448 px, batch 2): HF ``DeformableDetrForObjectDetection`` vs
  ours at full compute vs ours with the efficiency switches (``--hf-ours-overrides``); train step
  and inference, median s/iter, ratio HF / ours.
* ``windowed_vit``: ViT-S-sized random DINOv2 (384-d, 12 blocks, 6 heads) at 896 px, global
  attention vs windows in 8 of 12 blocks: backbone forward time and peak memory
  (:func:`dinodet2.benchmarking.measure_windowed_vit`, each variant in its own process).
* ``compile``: eager vs ``torch.compile`` train step and inference of the demo config on synthetic
  images (:func:`dinodet2.benchmarking.measure_compile`).
* ``training``: training-time mechanisms (sparse encoder tokens, windowed attention,
  ``torch.compile``) against the improved demo recipe with the same budget (``--train-iters``):
  ``tools/train_net.py`` runs one after the other, s/iter (median of ``metrics.json``'s ``time``)
  and AP on ``shapes_val``.

Run it alone on an idle machine (other processes distort every ratio)::

    python benchmarks/efficiency.py --weights output/demo/model_final.pth --output output/efficiency/efficiency.json
    python benchmarks/efficiency.py --train --sections inference   # trains the demo model first (~14 min)
"""
import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from dinodet2.benchmarking import (CpuContentionMeter, bbox_metrics, device_name, fixed_budget_overrides,  # noqa: E402
                                   median_iteration_seconds, read_metrics_records, train_net_command)
from dinodet2.config import load_dinodet2_config  # noqa: E402

DEMO_CONFIG = os.path.join(_REPO_ROOT, "configs", "Demo", "detr_shapes_tiny_improved.yaml")
SECTIONS = ("inference", "hf", "windowed_vit", "compile", "training")

# The recommended inference-time combination (same weights as the full model).
RECOMMENDED = ["MODEL.DETR.ADAPTIVE_QUERIES.ENABLED", "True", "MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD", "0.05",
               "MODEL.DETR.QUERY_PRUNING.ENABLED", "True", "MODEL.DETR.QUERY_PRUNING.DROP_SCORE", "0.05",
               "MODEL.DETR.QUERY_PRUNING.FREEZE_SCORE", "0.9", "MODEL.DETR.QUERY_PRUNING.FREEZE_BOX_DELTA", "0.01"]


def _load_compare_hf():
    spec = importlib.util.spec_from_file_location("compare_hf", os.path.join(_REPO_ROOT, "benchmarks",
                                                                            "compare_hf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# inference: one trained model, every inference-time setting
# ----------------------------------------------------------------------------------------------
def inference_variants(args, num_layers: int) -> List[Dict]:
    """(name, group, overrides) of every inference setting measured."""
    v = [dict(name="full compute", group="baseline", overrides=[])]
    for t in args.adaptive_thresholds:
        v.append(dict(name=f"adaptive queries, threshold {t:g}", group="adaptive", value=t, overrides=[
            "MODEL.DETR.ADAPTIVE_QUERIES.ENABLED", "True", "MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD", str(t)]))
    for t in args.drop_scores:
        v.append(dict(name=f"query pruning, drop < {t:g}, freeze >= 0.9 & moved <= 0.01", group="pruning", value=t,
                      overrides=["MODEL.DETR.QUERY_PRUNING.ENABLED", "True",
                                 "MODEL.DETR.QUERY_PRUNING.DROP_SCORE", str(t)]))
    for d in range(1, num_layers):
        v.append(dict(name=f"decoder depth {d} of {num_layers}", group="depth", value=d,
                      overrides=["MODEL.DETR.TEST_DEC_LAYERS", str(d)]))
    v.append(dict(name=f"decoder depth {num_layers} of {num_layers}", group="depth", value=num_layers, overrides=[]))
    if not args.skip_compile:
        v.append(dict(name="torch.compile (inductor)", group="compile", overrides=["MODEL.COMPILE.ENABLED", "True"]))
    v.append(dict(name="recommended: adaptive 0.05 + pruning 0.05", group="recommended",
                  overrides=list(RECOMMENDED)))
    if not args.skip_compile:
        v.append(dict(name="recommended + torch.compile", group="recommended",
                      overrides=list(RECOMMENDED) + ["MODEL.COMPILE.ENABLED", "True"]))
    return v


class _StatsRecorder:
    """Mean queries per image, decoder layers and query-layers per image over every batch."""

    def __init__(self, model):
        self.model, self.images, self.queries, self.layers, self.query_layers = model, 0, 0.0, 0.0, 0.0

    def add(self, batch_size: int) -> None:
        stats = self.model.last_decoding_stats
        self.images += batch_size
        self.queries += stats.initial_queries * batch_size
        self.layers += stats.layers_run * batch_size
        self.query_layers += sum(stats.queries_per_layer) * batch_size

    def summary(self) -> Dict:
        n = max(self.images, 1)
        return {"mean_queries_per_image": self.queries / n, "mean_decoder_layers": self.layers / n,
                "mean_query_layers_per_image": self.query_layers / n}


def _build(cfg, weights: str):
    from dinodet2.engine.checkpoint import Dinodet2Checkpointer
    from dinodet2.engine.trainer import Trainer

    model = Trainer.build_model(cfg)
    Dinodet2Checkpointer(model).load(weights)
    return model.eval()


def _evaluate(cfg, model, output_dir: str) -> Dict:
    from detectron2.evaluation import inference_on_dataset

    from dinodet2.engine.trainer import Trainer

    name = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, name)
    evaluator = Trainer.build_evaluator(cfg, name, output_folder=output_dir)
    recorder = _StatsRecorder(model)
    original = model.forward

    def forward(batched_inputs):
        out = original(batched_inputs)
        recorder.add(len(batched_inputs))
        return out
    model.forward = forward
    try:
        with contextlib.redirect_stdout(sys.stderr):
            results = inference_on_dataset(model, loader, evaluator)
    finally:
        del model.forward
    bbox = results.get("bbox", {})
    return {"AP": bbox.get("AP"), "AP50": bbox.get("AP50"), "AP75": bbox.get("AP75"), "APs": bbox.get("APs"),
            **recorder.summary()}


def _val_inputs(cfg, count: int) -> List[Dict]:
    from dinodet2.engine.trainer import Trainer

    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    inputs = []
    for batch in loader:
        inputs += batch
        if len(inputs) >= count:
            break
    return inputs[:count]


def _images_per_second(model, inputs: List[Dict], batch_size: int, repeats: int, warmup: int) -> Dict:
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs) - batch_size + 1, batch_size)]
    with torch.no_grad():
        for b in batches[:warmup]:
            model(b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for b in batches:
                model(b)
            times.append(time.perf_counter() - start)
    best = sorted(times)[len(times) // 2]
    return {"images_per_s": len(batches) * batch_size / best, "seconds": times}


def _gflops(model, inputs: List[Dict]) -> float:
    """Mean GFLOPs per image over ``inputs`` (one image per forward; pruning makes it vary)."""
    from dinodet2.benchmarking import count_gflops_per_image

    return sum(count_gflops_per_image(lambda: model([x]), model) for x in inputs) / len(inputs)


def run_inference_section(args) -> Dict:
    cfg0 = load_dinodet2_config(args.config, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"] + args.opts)
    inputs = _val_inputs(cfg0, args.timing_images)
    rows = []
    for variant in inference_variants(args, cfg0.MODEL.DETR.DEC_LAYERS):
        cfg = load_dinodet2_config(args.config, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"] + args.opts
                                   + variant["overrides"])
        print(f"[efficiency] inference: {variant['name']} ...", file=sys.stderr, flush=True)
        model = _build(cfg, args.weights)
        row = dict(variant)
        with CpuContentionMeter() as contention:
            row.update(_evaluate(cfg, model, os.path.join(args.work_dir, "eval")))
            row["gflops_per_image"] = None if variant["group"] == "compile" or "MODEL.COMPILE.ENABLED" in \
                variant["overrides"] else _gflops(model, inputs[:args.flops_images])
            for bs in (1, 8):
                row[f"batch{bs}"] = _images_per_second(model, inputs, bs, args.repeats, args.warmup)
        row["other_processes_cpu_cores"] = contention.rounded_other_cores
        rows.append(row)
        print(f"[efficiency]   AP {row['AP']:.2f}  b1 {row['batch1']['images_per_s']:.1f} img/s  "
              f"b8 {row['batch8']['images_per_s']:.1f} img/s  queries {row['mean_queries_per_image']:.1f}  "
              f"layers {row['mean_decoder_layers']:.2f}", file=sys.stderr, flush=True)
    full = rows[0]
    for row in rows:
        row["speedup_batch1"] = row["batch1"]["images_per_s"] / full["batch1"]["images_per_s"]
        row["speedup_batch8"] = row["batch8"]["images_per_s"] / full["batch8"]["images_per_s"]
        row["delta_AP"] = row["AP"] - full["AP"]
    return {"weights": args.weights, "config": os.path.relpath(args.config, _REPO_ROOT), "rows": rows}


# ----------------------------------------------------------------------------------------------
# hf: HF Deformable DETR vs ours at compare_hf's configuration
# ----------------------------------------------------------------------------------------------
def run_hf_section(args) -> Dict:
    from dinodet2.benchmarking import run_benchmark

    hf_mod = _load_compare_hf()
    hf_args = hf_mod.get_parser().parse_args(["--iters", str(args.hf_iters), "--warmup", str(args.hf_warmup)])
    hf_args.image_size = hf_mod.parse_image_size(hf_args.image_size)
    base_cfg = load_dinodet2_config(hf_mod.SEED_CONFIG, hf_mod.backbone_overrides(hf_args))
    rows = []

    def ours(overrides):
        def fn(mode):
            cfg = load_dinodet2_config(hf_mod.SEED_CONFIG, hf_mod.our_overrides("deformable", hf_args) + overrides)
            r = run_benchmark(cfg, mode, hf_args.image_size, hf_args.batch_size, hf_args.iters, hf_args.warmup,
                              seed=hf_args.seed)
            r.pop("peak_memory_mib", None)
            return r
        return fn

    modes = ["train", "inference"]
    hf = hf_mod.measure("HF DeformableDetrForObjectDetection (3 levels)", lambda m: hf_mod.run_hf_benchmark(
        lambda: hf_mod.build_hf_deformable(hf_args, hf_args.seed, 3), m, hf_args, base_cfg), modes)
    full = hf_mod.measure("ours, full compute", ours([]), modes)
    fast = hf_mod.measure("ours, efficiency switches", ours(args.hf_ours_overrides), modes)
    for entry in (hf, full, fast):
        rows.append(entry)
    ratios = {label: {m: hf_mod._ratio(hf, e, m) for m in modes} for label, e in (("full", full), ("switches", fast))}
    return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(hf_args).items()},
            "our_switches": args.hf_ours_overrides, "rows": rows, "hf_over_ours": ratios}


# ----------------------------------------------------------------------------------------------
# windowed ViT, torch.compile
# ----------------------------------------------------------------------------------------------
def run_windowed_vit_section(args) -> Dict:
    from dinodet2.benchmarking import measure_windowed_vit

    return measure_windowed_vit(image_size=args.vit_image_size, num_windows=args.vit_windows,
                                iters=args.vit_iters, warmup=args.vit_warmup)


def run_compile_section(args) -> Dict:
    from dinodet2.benchmarking import measure_compile

    cfg = load_dinodet2_config(args.config, ["MODEL.DEVICE", "cpu"] + args.opts)
    return measure_compile(cfg, batch_size=args.compile_batch_size, iters=args.compile_iters,
                           warmup=args.compile_warmup)


# ----------------------------------------------------------------------------------------------
# training: same budget, training-time mechanisms
# ----------------------------------------------------------------------------------------------
TRAINING_VARIANTS = {
    "improved recipe": [],
    "sparse encoder tokens (keep 0.3)": ["MODEL.DETR.SPARSE_ENCODER.ENABLED", "True",
                                         "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO", "0.3"],
    "windowed ViT (2x2 windows, blocks 0-2)": ["MODEL.DINOV2.WINDOW_BLOCK_INDEXES", "[0, 1, 2]",
                                               "MODEL.DINOV2.NUM_WINDOWS", "2"],
    "torch.compile": ["MODEL.COMPILE.ENABLED", "True"],
}


def run_training_section(args) -> Dict:
    rows = []
    for name in args.training_variants:
        overrides = TRAINING_VARIANTS[name]
        out = os.path.join(args.work_dir, "train_" + "".join(c if c.isalnum() else "_" for c in name))
        cmd = train_net_command(args.config, [*overrides, *fixed_budget_overrides(args.train_iters, out),
                                              "SEED", "42", *args.opts])
        print(f"[efficiency] training: {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=_REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        records = read_metrics_records(out)
        rows.append({"name": name, "overrides": overrides, "wall_s": time.perf_counter() - start,
                     "s_per_iter": median_iteration_seconds(records), **bbox_metrics(records)})
        print(f"[efficiency]   {rows[-1]}", file=sys.stderr, flush=True)
    return {"iters": args.train_iters, "rows": rows}


# ----------------------------------------------------------------------------------------------
def format_markdown(result: Dict) -> str:
    lines = []
    inf = result.get("inference")
    if inf:
        lines += ["| setting | AP | AP50 | APs | ΔAP | GFLOPs/img | img/s b1 | img/s b8 | × b1 | × b8 | queries/img | "
                  "layers | query-layers/img |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in inf["rows"]:
            g = "–" if r["gflops_per_image"] is None else f"{r['gflops_per_image']:.3f}"
            lines.append(f"| {r['name']} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['APs']:.2f} | {r['delta_AP']:+.2f} | {g} | "
                         f"{r['batch1']['images_per_s']:.1f} | {r['batch8']['images_per_s']:.1f} | "
                         f"{r['speedup_batch1']:.2f} | {r['speedup_batch8']:.2f} | {r['mean_queries_per_image']:.1f} | "
                         f"{r['mean_decoder_layers']:.2f} | {r['mean_query_layers_per_image']:.1f} |")
        lines.append("")
    hf = result.get("hf")
    if hf:
        lines += ["| model | train s/iter | inference s/iter | GFLOPs/img |", "|---|---|---|---|"]
        for r in hf["rows"]:
            cells = [f"{r[m]['median_s_per_iter']:.3f}" if m in r else r.get("status", "–") for m in ("train", "inference")]
            gf = r.get("inference", {}).get("gflops_per_image")
            lines.append(f"| {r['model']} | {cells[0]} | {cells[1]} | {'–' if gf is None else f'{gf:.1f}'} |")
        for label, ratio in hf["hf_over_ours"].items():
            lines.append(f"| HF / ours ({label}) | {_x(ratio['train'])} | {_x(ratio['inference'])} | |")
        lines.append("")
    tr = result.get("training")
    if tr:
        lines += [f"| training ({tr['iters']} iterations) | s/iter | AP | AP50 | APs |", "|---|---|---|---|---|"]
        for r in tr["rows"]:
            lines.append(f"| {r['name']} | {r['s_per_iter']:.3f} | {_f(r.get('AP'))} | {_f(r.get('AP50'))} | "
                         f"{_f(r.get('APs'))} |")
        lines.append("")
    return "\n".join(lines)


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("--weights", default=os.path.join(_REPO_ROOT, "output", "demo", "model_final.pth"))
    p.add_argument("--train", action="store_true", help="train the demo model into --weights' folder first")
    p.add_argument("--work-dir", default=os.path.join(_REPO_ROOT, "output", "efficiency"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adaptive-thresholds", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--drop-scores", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--timing-images", type=int, default=48, help="validation images timed (multiple of 8)")
    p.add_argument("--flops-images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-compile", action="store_true", help="leave torch.compile out of the inference section")
    p.add_argument("--hf-iters", type=int, default=5)
    p.add_argument("--hf-warmup", type=int, default=2)
    p.add_argument("--hf-ours-overrides", nargs="*", default=[
        "MODEL.DETR.SPARSE_ENCODER.ENABLED", "True", "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO", "0.3",
        "MODEL.DETR.QUERY_PRUNING.ENABLED", "True"])
    p.add_argument("--vit-image-size", type=int, default=896)
    p.add_argument("--vit-windows", type=int, default=4)
    p.add_argument("--vit-iters", type=int, default=3)
    p.add_argument("--vit-warmup", type=int, default=1)
    p.add_argument("--compile-batch-size", type=int, default=2)
    p.add_argument("--compile-iters", type=int, default=5)
    p.add_argument("--compile-warmup", type=int, default=3)
    p.add_argument("--train-iters", type=int, default=1000)
    p.add_argument("--training-variants", nargs="+", default=list(TRAINING_VARIANTS),
                   choices=list(TRAINING_VARIANTS))
    p.add_argument("--output", default=None, metavar="JSON")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for the demo model (KEY VALUE ...)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        sys.exit(f"error: unknown section(s) {bad}; choose from {SECTIONS}")
    if args.timing_images % 8:
        sys.exit("error: --timing-images must be a multiple of 8 (batch 8 timing)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    if args.train:
        out = os.path.dirname(os.path.abspath(args.weights))
        subprocess.run(train_net_command(args.config, ["OUTPUT_DIR", out, *args.opts]), cwd=_REPO_ROOT, check=True)
    if "inference" in sections and not os.path.isfile(args.weights):
        sys.exit(f"error: --weights {args.weights} does not exist; train the demo model (bash tools/dev.sh demo) "
                 "or pass --train")
    result: Dict = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "device_name": device_name("cpu"), "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    runners = {"inference": run_inference_section, "hf": run_hf_section, "windowed_vit": run_windowed_vit_section,
               "compile": run_compile_section, "training": run_training_section}
    for section in sections:
        result[section] = runners[section](args)
        if args.output:  # keep what is measured so far
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(result, f, indent=2, default=str)
    print(format_markdown(result))
    if "windowed_vit" in result:
        from dinodet2.benchmarking import format_windowed_vit
        print(format_windowed_vit(result["windowed_vit"]))
    if "compile" in result:
        from dinodet2.benchmarking import format_compile_summary
        print(format_compile_summary(result["compile"]))
    return result


if __name__ == "__main__":
    main()
