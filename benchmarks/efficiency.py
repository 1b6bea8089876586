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
  query-layers per image. The timing is round-robin: every round times one pass of every setting in
  turn, and the median round counts, so drift of the machine does not favour one setting.
* ``hf``: ``benchmarks/compare_hf.py``'s deformable configuration (same random DINOv2 + LoRA,
  3 levels, 6+6 layers, 100 queries, 448 px, batch 2): HF ``DeformableDetrForObjectDetection`` vs
  ours at full compute vs ours with the efficiency switches (``--hf-ours-overrides``, default: sparse
  encoder tokens 0.3 + 4 x 4 windows in DINOv2 blocks 0-2, whose cost does not depend on the random
  weights); train step and inference, median s/iter, ratio HF / ours.
* ``windowed_vit``: ViT-S-sized random DINOv2 (384-d, 12 blocks, 6 heads) at 896 px, global
  attention vs windows in 8 of 12 blocks: backbone forward time and peak memory
  (:func:`dinodet2.benchmarking.measure_windowed_vit`, each variant in its own process).
* ``compile``: eager vs ``torch.compile`` train step and inference of the demo config on synthetic
  images (:func:`dinodet2.benchmarking.measure_compile`).
* ``train_speed``: training step time of the demo config with each training-time mechanism
  (synthetic batch of 8 at 224 px, after warm-up / compilation).
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
SECTIONS = ("inference", "hf", "windowed_vit", "compile", "train_speed", "training")

# The recommended inference-time combination (same weights as the full model).
RECOMMENDED = ["MODEL.DETR.ADAPTIVE_QUERIES.ENABLED", "True", "MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD", "0.05",
               "MODEL.DETR.QUERY_PRUNING.ENABLED", "True", "MODEL.DETR.QUERY_PRUNING.DROP_SCORE", "0.05",
               "MODEL.DETR.QUERY_PRUNING.FREEZE_SCORE", "0.9", "MODEL.DETR.QUERY_PRUNING.FREEZE_BOX_DELTA", "0.01"]


# The hf section's switches: their cost does not depend on the weights (random here), unlike the
# score-driven adaptive queries / pruning, whose effect is measured on the trained demo model.
HF_SWITCHES = ["MODEL.DETR.SPARSE_ENCODER.ENABLED", "True", "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO", "0.3",
               "MODEL.DINOV2.WINDOW_BLOCK_INDEXES", "[0, 1, 2]", "MODEL.DINOV2.NUM_WINDOWS", "4"]


def _load_compare_hf():
    spec = importlib.util.spec_from_file_location("compare_hf", os.path.join(_REPO_ROOT, "benchmarks",
                                                                            "compare_hf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# inference: one trained model, every inference-time setting
# ----------------------------------------------------------------------------------------------
# --preset ablation: a model whose config switches the inference mechanisms on
# (configs/Demo/detr_shapes_tiny_efficient.yaml), measured against its own full compute.
FULL_COMPUTE = ["MODEL.DETR.SPARSE_ENCODER.TEST_KEEP_RATIO", "1.0", "MODEL.DETR.ADAPTIVE_QUERIES.ENABLED", "False",
                "MODEL.DETR.QUERY_PRUNING.ENABLED", "False"]


def ablation_variants(args, num_layers: int) -> List[Dict]:
    """Full compute, then the config's mechanisms added one by one (same weights)."""
    full = list(FULL_COMPUTE)
    sparse = ["MODEL.DETR.SPARSE_ENCODER.TEST_KEEP_RATIO", "0.3"]
    adaptive = ["MODEL.DETR.ADAPTIVE_QUERIES.ENABLED", "True"]
    pruning = ["MODEL.DETR.QUERY_PRUNING.ENABLED", "True"]
    v = [dict(name="full compute (dense encoder, top-k queries, every layer)", group="baseline", overrides=full),
         dict(name="sparse encoder tokens at test (keep 0.3)", group="sparse", overrides=full + sparse),
         dict(name="adaptive queries (0.05)", group="adaptive", overrides=full + adaptive),
         dict(name="query pruning (drop 0.05, freeze 0.9 / 0.01)", group="pruning", overrides=full + pruning),
         dict(name="the config's switches together", group="recommended", overrides=[])]
    for d in range(1, num_layers):
        v.append(dict(name=f"the config + decoder depth {d} of {num_layers}", group="depth", value=d,
                      overrides=["MODEL.DETR.TEST_DEC_LAYERS", str(d)]))
    # how fast the switches can make this model at all, accuracy aside: the bound on their speed-up
    v.append(dict(name="ceiling: encoder keep 0.05 + decoder depth 1 (accuracy not kept)", group="ceiling",
                  overrides=["MODEL.DETR.SPARSE_ENCODER.TEST_KEEP_RATIO", "0.05", "MODEL.DETR.TEST_DEC_LAYERS", "1"]))
    if not args.skip_compile:
        v.append(dict(name="the config + torch.compile (backbone)", group="compile",
                      overrides=["MODEL.COMPILE.ENABLED", "True"]))
    return v


def inference_variants(args, num_layers: int) -> List[Dict]:
    """(name, group, overrides) of every inference setting measured (``--preset sweep``)."""
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


def _batches(inputs: List[Dict], batch_size: int) -> List[List[Dict]]:
    return [inputs[i:i + batch_size] for i in range(0, len(inputs) - batch_size + 1, batch_size)]


def _time_pass(model, batches: List[List[Dict]]) -> float:
    """Seconds for one no_grad pass of ``model`` over ``batches``."""
    with torch.no_grad():
        start = time.perf_counter()
        for b in batches:
            model(b)
        return time.perf_counter() - start


def time_side_by_side(models: List, inputs: List[Dict], repeats: int, warmup: int) -> List[Dict]:
    """Images/s of every model at batch 1 and 8, measured round-robin: each round times one pass of
    every model in turn, so drift of the machine (caches, frequency, other processes) spreads over all
    of them; the median round counts."""
    results = [{} for _ in models]
    for bs in (1, 8):
        batches = _batches(inputs, bs)
        for model in models:
            with torch.no_grad():
                for b in batches[:warmup]:
                    model(b)
        times = [[] for _ in models]
        for _ in range(repeats):
            for i, model in enumerate(models):
                times[i].append(_time_pass(model, batches))
        for i, t in enumerate(times):
            median = sorted(t)[len(t) // 2]
            results[i][f"batch{bs}"] = {"images_per_s": len(batches) * bs / median, "seconds": t}
    return results


def _gflops(model, inputs: List[Dict]) -> float:
    """Mean GFLOPs per image over ``inputs`` (one image per forward; pruning makes it vary)."""
    from dinodet2.benchmarking import count_gflops_per_image

    return sum(count_gflops_per_image(lambda: model([x]), model) for x in inputs) / len(inputs)


# The model's stages whose FLOPs are reported apart (module paths in DETR); "other" is the rest
# (input projection, position encodings, two-stage proposal heads, class heads, post-processing).
FLOP_STAGES = {"backbone": "backbone", "encoder": "transformer.encoder", "decoder": "transformer.decoder"}


def stage_gflops(model, batches: List[List[Dict]]) -> Dict[str, float]:
    """Mean GFLOPs per image of every stage in :data:`FLOP_STAGES` and ``other`` / ``total``, over
    ``batches`` (FlopCounterMode, per module). At batch > 1 images are padded to the largest one,
    and what runs on padding counts."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    sums, images = dict.fromkeys(list(FLOP_STAGES) + ["total"], 0.0), 0
    prefix = type(model).__name__ + "."
    try:
        for batch in batches:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model(batch)
            counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
            for stage, path in FLOP_STAGES.items():
                sums[stage] += counts.get(prefix + path, 0)
            sums["total"] += counter.get_total_flops()
            images += len(batch)
    finally:
        for p in params:
            p.requires_grad_(True)
    out = {k: v / 1e9 / max(images, 1) for k, v in sums.items()}
    out["other"] = out["total"] - sum(out[k] for k in FLOP_STAGES)
    return out


def run_inference_section(args) -> Dict:
    cfg0 = load_dinodet2_config(args.config, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"] + args.opts)
    inputs = _val_inputs(cfg0, args.timing_images)
    rows = []
    variants = (ablation_variants if args.preset == "ablation" else inference_variants)(args, cfg0.MODEL.DETR.DEC_LAYERS)
    rows, models = [], []
    for variant in variants:  # accuracy, compute, queries and layers of every setting
        cfg = load_dinodet2_config(args.config, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"] + args.opts
                                   + variant["overrides"])
        print(f"[efficiency] inference: {variant['name']} ...", file=sys.stderr, flush=True)
        model = _build(cfg, args.weights)
        row = dict(variant)
        row.update(_evaluate(cfg, model, os.path.join(args.work_dir, "eval")))
        compiled = "MODEL.COMPILE.ENABLED" in variant["overrides"]
        row["gflops_per_image"] = None if compiled else _gflops(model, inputs[:args.flops_images])
        if not compiled and variant["group"] in ("baseline", "recommended", "ceiling"):
            # where the compute is, without and with the mechanisms, at both timed batch sizes
            row["gflops_by_stage"] = {f"batch{bs}": stage_gflops(model, _batches(inputs, bs)) for bs in (1, 8)}
        rows.append(row)
        models.append(model)
        print(f"[efficiency]   AP {row['AP']:.2f}  queries {row['mean_queries_per_image']:.1f}  "
              f"layers {row['mean_decoder_layers']:.2f}", file=sys.stderr, flush=True)
    print("[efficiency] timing every setting side by side ...", file=sys.stderr, flush=True)
    with CpuContentionMeter() as contention:
        speeds = time_side_by_side(models, inputs, args.repeats, args.warmup)
    for row, speed in zip(rows, speeds):
        row.update(speed)
        row["other_processes_cpu_cores"] = contention.rounded_other_cores
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

    return {attention: measure_windowed_vit(image_size=args.vit_image_size, num_windows=args.vit_windows,
                                            iters=args.vit_iters, warmup=args.vit_warmup,
                                            attn_implementation=attention)
            for attention in args.vit_attention}


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
    "windowed ViT (2 x 2 windows, blocks 0-2)": ["MODEL.DINOV2.WINDOW_BLOCK_INDEXES", "[0, 1, 2]",
                                                 "MODEL.DINOV2.NUM_WINDOWS", "2"],
    "torch.compile": ["MODEL.COMPILE.ENABLED", "True"],
}


def run_train_speed_section(args) -> Dict:
    """Training step time of the improved demo config with each training-time mechanism
    (synthetic batch, :func:`dinodet2.benchmarking.run_benchmark`; compiled: after its compilation)."""
    from dinodet2.benchmarking import run_benchmark

    rows = []
    for name, overrides in TRAINING_VARIANTS.items():
        cfg = load_dinodet2_config(args.config, ["MODEL.DEVICE", "cpu", *overrides, *args.opts])
        compiled = "MODEL.COMPILE.ENABLED" in overrides
        print(f"[efficiency] train step: {name} ...", file=sys.stderr, flush=True)
        r = run_benchmark(cfg, "train", args.train_speed_size, args.train_speed_batch, args.train_speed_iters,
                          args.compile_warmup if compiled else args.warmup, count_flops=False)
        rows.append({"name": name, "overrides": overrides, "s_per_iter": r["median_s_per_iter"],
                     "times_s": r["times_s"], "other_processes_cpu_cores": r.get("other_processes_cpu_cores")})
        print(f"[efficiency]   {r['median_s_per_iter']:.3f} s/iter", file=sys.stderr, flush=True)
    base = rows[0]["s_per_iter"]
    for r in rows:
        r["speedup"] = base / r["s_per_iter"]
    return {"image_size": args.train_speed_size, "batch_size": args.train_speed_batch, "rows": rows}


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
        staged = [r for r in inf["rows"] if r.get("gflops_by_stage")]
        if staged:
            stages = list(FLOP_STAGES) + ["other", "total"]
            lines += ["GFLOPs per image by stage (every timed image; at batch 8 padding counts):", "",
                      "| setting | batch | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
            for r in staged:
                for key, by_stage in r["gflops_by_stage"].items():
                    lines.append(f"| {r['name']} | {key[5:]} | " + " | ".join(f"{by_stage[k]:.3f}" for k in stages)
                                 + " |")
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
    ts = result.get("train_speed")
    if ts:
        lines += [f"| training step ({ts['image_size']} px, batch {ts['batch_size']}) | s/iter | × |", "|---|---|---|"]
        for r in ts["rows"]:
            lines.append(f"| {r['name']} | {r['s_per_iter']:.3f} | {r['speedup']:.2f} |")
        lines.append("")
    tr = result.get("training")
    if tr:
        lines += [f"| training ({tr['iters']} iterations) | s/iter | AP | AP50 | APs |", "|---|---|---|---|---|"]
        for r in tr["rows"]:
            lines.append(f"| {r['name']} | {r['s_per_iter']:.3f} | {_f(r.get('AP'))} | {_f(r.get('AP50'))} | "
                         f"{_f(r.get('APs'))} |")
        lines.append("")
    return "\n".join(lines)


def plot_speed_accuracy(inference: Dict, path: str) -> None:
    """AP vs images/s (batch 1 and 8) of the threshold sweeps and the depths, one line per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, bs in zip(axes, (1, 8)):
        for group, marker in (("adaptive", "o"), ("pruning", "s"), ("depth", "^"), ("sparse", "v"),
                              ("recommended", "*"), ("compile", "D"), ("baseline", "X")):
            rows = [r for r in inference["rows"] if r["group"] == group]
            if not rows:
                continue
            xs = [r[f"batch{bs}"]["images_per_s"] for r in rows]
            ys = [r["AP"] for r in rows]
            ax.plot(xs, ys, marker=marker, linestyle="-" if len(rows) > 1 and group != "recommended" else "none",
                    label=group)
            for r, x, y in zip(rows, xs, ys):
                if "value" in r:
                    ax.annotate(f"{r['value']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel(f"images / s (batch {bs}, CPU)")
        ax.set_ylabel("COCO AP (shapes_val)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Speed / accuracy of the inference-time switches (same weights; labels: threshold or depth)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--preset", choices=("sweep", "ablation"), default="sweep",
                   help="inference section: sweep = each mechanism's threshold / depth on a model trained without "
                        "them (the improved demo); ablation = a config with them on (the efficient demo) against its "
                        "own full compute, mechanisms added one by one")
    p.add_argument("--adaptive-thresholds", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--drop-scores", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--timing-images", type=int, default=48, help="validation images timed (multiple of 8)")
    p.add_argument("--flops-images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (every setting once per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-compile", action="store_true", help="leave torch.compile out of the inference section")
    p.add_argument("--hf-iters", type=int, default=5)
    p.add_argument("--hf-warmup", type=int, default=2)
    p.add_argument("--hf-ours-overrides", nargs="*", default=list(HF_SWITCHES),
                   help="our efficiency switches in the hf section (default: those whose cost does not depend on "
                        "trained weights, so random weights time them fairly)")
    p.add_argument("--vit-image-size", type=int, default=896)
    p.add_argument("--vit-windows", type=int, default=4)
    p.add_argument("--vit-attention", nargs="+", default=["sdpa", "eager"],
                   help="HF attention implementations measured (sdpa: fused, our default; eager: materialised "
                        "attention matrix)")
    p.add_argument("--vit-iters", type=int, default=3)
    p.add_argument("--vit-warmup", type=int, default=1)
    p.add_argument("--compile-batch-size", type=int, default=2)
    p.add_argument("--compile-iters", type=int, default=5)
    p.add_argument("--compile-warmup", type=int, default=3)
    p.add_argument("--train-speed-size", type=int, default=224)
    p.add_argument("--train-speed-batch", type=int, default=8)
    p.add_argument("--train-speed-iters", type=int, default=5)
    p.add_argument("--train-iters", type=int, default=1000)
    p.add_argument("--training-variants", nargs="+", default=list(TRAINING_VARIANTS),
                   choices=list(TRAINING_VARIANTS))
    p.add_argument("--output", default=None, metavar="JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="AP vs images/s of the inference section")
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
               "compile": run_compile_section, "train_speed": run_train_speed_section,
               "training": run_training_section}
    for section in sections:
        result[section] = runners[section](args)
        if args.output:  # keep what is measured so far
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(result, f, indent=2, default=str)
    if args.plot and "inference" in result:
        plot_speed_accuracy(result["inference"], args.plot)
        print(f"wrote {args.plot}")
    print(format_markdown(result))
    if "windowed_vit" in result:
        from dinodet2.benchmarking import format_windowed_vit
        for measured in result["windowed_vit"].values():
            print(format_windowed_vit(measured))
    if "compile" in result:
        from dinodet2.benchmarking import format_compile_summary
        print(format_compile_summary(result["compile"]))
    return result


if __name__ == "__main__":
    main()
