#!/usr/bin/env python
"""Side-by-side CPU speed of RF-DETR (PyPI ``rfdetr``) and dinodet2's closest configuration, both
with the same randomly initialised windowed DINOv2, resolution, decoder depth and query count.

RF-DETR pins its own versions, so it lives in its own virtualenv (``--rfdetr-venv``, default
``.venv-rfdetr/`` at the repository root, git-ignored), created on first use with
``torch==<our torch version> torchvision==<ours> rfdetr==<--rfdetr-version> scipy`` through pip
(whatever index pip is configured with; rfdetr 1.11.2's requirements accept torch 2.14.1, so no
``--no-deps`` is needed). Its side runs there as a subprocess (``benchmarks/rfdetr_worker.py``) that
writes JSON.

Matching (:func:`our_overrides`, :func:`matching_rows`): the worker describes RF-DETR's variant
(``--variant``, default ``nano``: DINOv2-S 384-d, 12 blocks, 6 heads, patch 16, 24 x 24 position
table, 2 x 2 windows in blocks 0, 1, 2, 4, 5, 7, 8, 10, 11, 384 x 384 input, one P4 level, 2 decoder
layers, 300 queries, two-stage) and our config (``configs/COCO-Detection/
detr_dinov2_base_lora4_sfp_improved.yaml`` + overrides) is derived from that description: the same
ViT (``MODEL.DINOV2.*`` with ``RANDOM_INIT``, ``WINDOW_BLOCK_INDEXES``, ``NUM_WINDOWS``), the whole ViT
trained (RF-DETR's recipe: ``FREEZE False``, no LoRA), a one-level simple feature pyramid at the
patch stride, no transformer encoder, the same decoder (layers, width, FFN, heads, deformable heads
and points), two-stage queries, top-``num_select`` detections. What cannot match is listed in the
table (the neck; the box parametrisation; group DETR vs our denoising as the training-only extra
queries, ``--group-detr`` / ``--denoising``).

Protocol (``compare_hf.py``'s, with interleaved inference rounds): one fixed-seed synthetic batch (random 0-255 images, 5 random boxes
each) shared by both sides through a file; train step = forward + loss + ``zero_grad`` + backward +
full-model clipping at 0.1 + fused AdamW (lr 1e-4, weight decay 1e-4); inference = batch 1,
``no_grad`` eval forward + post-processing (RF-DETR's ``PostProcess``; our ``detector_postprocess``);
our ONNX Runtime path: ``dinodet2.export.export_onnx`` of the same model (fixed size, normalisation
and top-k inside the graph), ``InferenceSession.run`` on one image; and its INT8 file
(``dinodet2.export.quantize_int8``: the ViT's linear layers int8, dynamic uint8 activations, the rest
fp32) on the same image with the same session options (``--threads`` intra-op threads, one inter-op
thread, ``ORT_ENABLE_ALL`` graph optimisation). The same ``--threads`` everywhere (torch in both
processes, ONNX Runtime's intra-op threads). Median over ``--iters`` timed iterations after
``--warmup``; PyTorch inference: median over the pooled iterations of ``--rounds`` interleaved rounds,
each side in a fresh process per measurement (:func:`inference_rounds`). Ratios are RF-DETR time / our time (> 1: ours is faster); goals of issue 15: ONNX >= 2x
(fp32 or INT8), PyTorch inference >= 1x.

Allocator: both PyTorch sides are measured first with glibc's default ``malloc`` settings, then again
with glibc keeping freed memory (``*_kept`` rows: our process calls ``keep_freed_memory``, what our
tools do with ``CPU_ALLOCATOR.KEEP_FREED_MEMORY``; RF-DETR's worker runs with the equivalent
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` environment). Freed memory handed back to the OS
page-faults again in the next step, which costs both sides alike, so the equal-setting rows compare
the models and the "as shipped" row compares what each package's users get by default.

Examples::

    python benchmarks/compare_rfdetr.py --output benchmarks/results/compare_rfdetr.json
    python benchmarks/compare_rfdetr.py --iters 1 --warmup 0 --threads 1        # smoke run
    python benchmarks/compare_rfdetr.py --group-detr 1 --denoising off         # no training-only queries
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # both sides are built from configs: never download

import torch  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, _REPO_ROOT)

from dinodet2.benchmarking import (CpuContentionMeter, device_name, make_synthetic_batch,  # noqa: E402
                                   run_benchmark, seed_everything, summary_stats, time_iterations)
from dinodet2.benchmarking.training_runs import write_json  # noqa: E402
from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.engine.cpu_allocator import (KEPT_MEMORY_ENVIRONMENT, allocator_settings_from_environment,  # noqa: E402
                                           keep_freed_memory)

BASE_CONFIG = os.path.join(_REPO_ROOT, "configs", "COCO-Detection", "detr_dinov2_base_lora4_sfp_improved.yaml")
WORKER = os.path.join(_REPO_ROOT, "benchmarks", "rfdetr_worker.py")
DEFAULT_VENV = os.path.join(_REPO_ROOT, ".venv-rfdetr")
RFDETR_VERSION = "1.11.2"
#: RF-DETR projector levels -> our simple feature pyramid scale factors (relative to the patch grid)
PROJECTOR_SCALE_FACTORS = {"P3": 2.0, "P4": 1.0, "P5": 0.5}
#: the issue's goals: RF-DETR time / our time at least this
GOALS = {"inference_pytorch": 1.0, "inference_onnx": 2.0}


# ----------------------------------------------------------------------------------------------
# RF-DETR's virtualenv and worker
# ----------------------------------------------------------------------------------------------
def _torch_requirements() -> List[str]:
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]


def ensure_rfdetr_venv(venv: str, version: str) -> str:
    """The Python of ``venv``, creating it and installing ``rfdetr==version`` (with our torch and
    torchvision versions, so both sides run the same kernels) when it cannot import that version."""
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", f"import importlib.metadata as m, sys; sys.exit(m.version('rfdetr') != '{version}')"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not os.path.exists(python):
        print(f"[compare_rfdetr] creating the virtualenv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    requirements = _torch_requirements() + [f"rfdetr=={version}", "scipy"]
    print(f"[compare_rfdetr] installing {' '.join(requirements)} into {venv} (minutes, once)", flush=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *requirements], check=True)
    return python


def run_worker(python: str, args, extra: Sequence[str], env: Optional[Dict[str, str]] = None) -> Dict:
    """Run ``rfdetr_worker.py`` with ``python`` (``env`` added to the environment) and return the
    JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rfdetr.json")
        cmd = [python, WORKER, "--variant", args.variant, "--overrides", json.dumps(rfdetr_overrides(args)),
               "--threads", str(args.threads), "--seed", str(args.seed), "--output", out, *extra]
        env = dict(os.environ, **(env or {}))
        if args.threads > 0:
            env["OMP_NUM_THREADS"] = str(args.threads)
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"rfdetr_worker.py failed (exit {done.returncode}): {' '.join(cmd)}")
        with open(out) as f:
            return json.load(f)


def rfdetr_overrides(args) -> Dict:
    """RF-DETR ``ModelConfig`` fields set from the command line (the variant's values otherwise)."""
    overrides = {"num_classes": args.num_classes}
    if args.resolution:
        overrides["resolution"] = args.resolution
    if args.group_detr:
        overrides["group_detr"] = args.group_detr
    return overrides


def save_shared_batch(path: str, args, cfg) -> None:
    """The training images / targets both sides use: our synthetic batch with RF-DETR's targets
    (labels, normalised cx cy w h boxes) and our solver settings."""
    from torchvision.ops import box_convert

    size = args.resolution_used
    batch = make_synthetic_batch((size, size), args.batch_size, args.num_classes, seed=args.seed)
    targets = []
    for item in batch:
        inst = item["instances"]
        boxes = inst.gt_boxes.tensor / torch.tensor([size, size, size, size], dtype=torch.float32)
        targets.append({"labels": inst.gt_classes, "boxes": box_convert(boxes, "xyxy", "cxcywh")})
    clip = cfg.SOLVER.CLIP_GRADIENTS
    solver = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
              "clip_norm": clip.CLIP_VALUE if clip.ENABLED and clip.CLIP_TYPE == "full_model" else 0.0}
    torch.save({"images": torch.stack([x["image"] for x in batch]), "targets": targets, "solver": solver}, path)


# ----------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------
def our_overrides(rf: Dict, num_classes: int, denoising: bool) -> List[str]:
    """Config overrides (on :data:`BASE_CONFIG`) that build our closest model to RF-DETR's
    description ``rf`` (``rfdetr_worker.py --describe``)."""
    levels = [PROJECTOR_SCALE_FACTORS[p] for p in rf["projector_scale"]]
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.DINOV2.RANDOM_INIT", "True",
        "MODEL.DINOV2.HIDDEN_SIZE", str(rf["vit_hidden_size"]),
        "MODEL.DINOV2.NUM_LAYERS", str(rf["vit_layers"]),
        "MODEL.DINOV2.NUM_HEADS", str(rf["vit_heads"]),
        "MODEL.DINOV2.MLP_RATIO", str(float(rf["vit_mlp_ratio"])),
        "MODEL.DINOV2.PATCH_SIZE", str(rf["patch_size"]),
        "MODEL.DINOV2.PRETRAIN_IMAGE_SIZE", str(rf["positional_encoding_size"] * rf["patch_size"]),
        "MODEL.DINOV2.NUM_REGISTER_TOKENS", str(rf["vit_register_tokens"]),
        "MODEL.DINOV2.WINDOW_BLOCK_INDEXES", str(list(rf["window_block_indexes"]) if rf["windowed"] else []),
        "MODEL.DINOV2.NUM_WINDOWS", str(rf["num_windows"]),
        "MODEL.DINOV2.OUT_INDICES", "[-1]",
        "MODEL.DINOV2.FREEZE", str(bool(rf["freeze_encoder"])),
        "MODEL.DINOV2.DROP_PATH_RATE", "0.0",
        "MODEL.LORA.ENABLED", str(bool(rf["backbone_lora"])),
        "MODEL.SFP.SCALE_FACTORS", str(levels),
        "MODEL.SFP.OUT_CHANNELS", str(rf["hidden_dim"]),
        "MODEL.DETR.NUM_CLASSES", str(num_classes),
        "MODEL.DETR.HIDDEN_DIM", str(rf["hidden_dim"]),
        "MODEL.DETR.ENC_LAYERS", "0",
        "MODEL.DETR.DEFORMABLE.ENCODER", "False",
        "MODEL.DETR.DEFORMABLE.DECODER", "True",
        "MODEL.DETR.DEC_LAYERS", str(rf["dec_layers"]),
        "MODEL.DETR.NHEADS", str(rf["sa_nheads"]),
        "MODEL.DETR.DEFORMABLE.NHEADS", str(rf["ca_nheads"]),
        "MODEL.DETR.DEFORMABLE.NUM_POINTS", str(rf["dec_n_points"]),
        "MODEL.DETR.DIM_FEEDFORWARD", str(rf["dim_feedforward"]),
        "MODEL.DETR.DROPOUT", str(float(rf["dropout"])),
        "MODEL.DETR.NUM_QUERIES", str(rf["num_queries"]),
        "MODEL.DETR.TWO_STAGE", str(bool(rf["two_stage"])),
        "MODEL.DETR.CLASS_LOSS", "varifocal" if rf["ia_bce_loss"] else "focal",
        "MODEL.DETR.DEEP_SUPERVISION", str(bool(rf["aux_loss"])),
        "MODEL.DETR.DN.ENABLED", str(bool(denoising)),
        "TEST.DETECTIONS_PER_IMAGE", str(rf["num_select"]),
    ]


def matching_rows(rf: Dict, cfg) -> List[Dict]:
    """The settings of both sides, one row each: ``setting``, ``rfdetr``, ``ours`` and ``match``
    (``"same"``, ``"similar"`` or ``"differs"``), from RF-DETR's description and our built config."""
    d, v, sfp = cfg.MODEL.DETR, cfg.MODEL.DINOV2, cfg.MODEL.SFP
    windows = f"{v.NUM_WINDOWS}x{v.NUM_WINDOWS} windows in blocks {list(v.WINDOW_BLOCK_INDEXES)}"
    rf_windows = (f"{rf['num_windows']}x{rf['num_windows']} windows in blocks {rf['window_block_indexes']}"
                  if rf["windowed"] else "none")
    rows = [
        ("ViT (random init)", f"DINOv2 {rf['vit_hidden_size']}-d, {rf['vit_layers']} blocks, {rf['vit_heads']} heads, "
                              f"MLP x{rf['vit_mlp_ratio']}, {rf['vit_register_tokens']} registers",
         f"DINOv2 {v.HIDDEN_SIZE}-d, {v.NUM_LAYERS} blocks, {v.NUM_HEADS} heads, MLP x{v.MLP_RATIO:g}, "
         f"{v.NUM_REGISTER_TOKENS} registers"),
        ("patch / position table", f"{rf['patch_size']} px / {rf['positional_encoding_size']}^2",
         f"{v.PATCH_SIZE} px / {v.PRETRAIN_IMAGE_SIZE // v.PATCH_SIZE}^2"),
        ("windowed attention", rf_windows, windows if list(v.WINDOW_BLOCK_INDEXES) else "none"),
        ("ViT training", "frozen" if rf["freeze_encoder"] else ("LoRA" if rf["backbone_lora"] else "all weights"),
         "frozen" if v.FREEZE and not cfg.MODEL.LORA.ENABLED else ("LoRA" if cfg.MODEL.LORA.ENABLED else "all weights")),
        ("input", f"{rf['resolution']}x{rf['resolution']}", None),
        ("transformer encoder", "none", f"{d.ENC_LAYERS} layers" if d.ENC_LAYERS else "none"),
        ("decoder layers / width / FFN", f"{rf['dec_layers']} / {rf['hidden_dim']} / {rf['dim_feedforward']}",
         f"{d.DEC_LAYERS} / {d.HIDDEN_DIM} / {d.DIM_FEEDFORWARD}"),
        ("self-attn heads; deformable cross-attn heads x points",
         f"{rf['sa_nheads']}; {rf['ca_nheads']} x {rf['dec_n_points']}",
         f"{d.NHEADS}; {d.DEFORMABLE.NHEADS or d.NHEADS} x {d.DEFORMABLE.NUM_POINTS}"),
        ("queries / two-stage / detections", f"{rf['num_queries']} / {rf['two_stage']} / {rf['num_select']}",
         f"{d.NUM_QUERIES} / {d.TWO_STAGE} / {cfg.TEST.DETECTIONS_PER_IMAGE}"),
        ("dropout", f"{rf['dropout']:g}", f"{d.DROPOUT:g}"),
        ("auxiliary losses", f"{rf['aux_loss']}", f"{d.DEEP_SUPERVISION}"),
    ]
    out = [{"setting": s, "rfdetr": r, "ours": o if o is not None else r, "match": "same" if o in (None, r) else
            "differs"} for s, r, o in rows]
    out.append({"setting": "classes", "rfdetr": f"{rf['num_classes']} (+1 unused logit)", "ours": f"{d.NUM_CLASSES}",
                "match": "same" if rf["num_classes"] == d.NUM_CLASSES else "differs"})
    out.append({"setting": "ViT features -> decoder levels",
                "rfdetr": f"outputs of blocks {rf['out_feature_indexes']} (counted from 1) concatenated, C2f projector -> "
                          f"{'/'.join(rf['projector_scale'])}",
                "ours": f"last block, simple feature pyramid scales {list(sfp.SCALE_FACTORS)} "
                        f"(strides {[round(v.PATCH_SIZE / s, 2) for s in sfp.SCALE_FACTORS]})",
                "match": "differs"})
    out.append({"setting": "box refinement", "rfdetr": "lite refpoint refine, box reparametrisation",
                "ours": f"iterative refinement {d.ITERATIVE_REFINEMENT}, look forward twice {d.LOOK_FORWARD_TWICE}",
                "match": "differs"})
    out.append({"setting": "classification loss", "rfdetr": "IoU-aware BCE" if rf["ia_bce_loss"] else "focal",
                "ours": d.CLASS_LOSS, "match": "similar"})
    out.append({"setting": "training-only extra queries",
                "rfdetr": f"group DETR: {rf['group_detr']} groups x {rf['num_queries']} queries",
                "ours": f"contrastive denoising, {d.DN.NUM_QUERIES} queries" if d.DN.ENABLED else "none",
                "match": "same" if rf["group_detr"] == 1 and not d.DN.ENABLED else "differs"})
    return out


def cpu_int8_flags() -> List[str]:
    """The CPU's int8 dot-product extensions (VNNI / AMX) from ``/proc/cpuinfo``: what INT8 speed depends on."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if "vnni" in f or f.startswith("amx"))


def onnxruntime_session(path: str, threads: int):
    """The ONNX Runtime CPU session both of our ONNX rows use: ``threads`` intra-op threads (0: its
    default), one inter-op thread, all graph optimisations (the INT8 fusions need them)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_our_onnx(cfg, args) -> Dict[str, Dict]:
    """Export our model (same seed as the PyTorch runs) with ``export_onnx``, quantise it with
    ``quantize_int8``, and time both through ONNX Runtime on the same image with the same session
    options (:func:`onnxruntime_session`): ``{"inference_onnx": ..., "inference_onnx_int8": ...}``."""
    import numpy as np
    import onnxruntime
    from detectron2.modeling import build_model

    from dinodet2.export import export_onnx, quantize_int8
    from dinodet2.modeling.backbone.lora import merge_lora_

    seed_everything(args.seed)
    model = build_model(cfg).eval()
    merge_lora_(model)
    size = args.resolution_used
    image = make_synthetic_batch((size, size), 1, args.num_classes, with_instances=False, seed=args.seed)[0]["image"]
    feed = {"image": image[None].numpy().astype(np.float32)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        start = time.perf_counter()
        export_onnx(model, path, size, size)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        quantized = quantize_int8(path)
        quantize_s = time.perf_counter() - start
        int8_extra = {"quantize_s": quantize_s, "cpu_int8_flags": cpu_int8_flags(),
                      **{k: v for k, v in quantized.items() if k != "path"}}
        files = (("inference_onnx", path, {"export_s": export_s}),
                 ("inference_onnx_int8", quantized["path"], int8_extra))
        for mode, onnx_path, extra in files:
            print(f"[compare_rfdetr] ours: {mode} ...", flush=True)
            session = onnxruntime_session(onnx_path, args.threads)
            with CpuContentionMeter() as contention:
                times = time_iterations(lambda: session.run(None, feed), args.iters, args.warmup, "cpu")
            out[mode] = {"mode": mode, "batch_size": 1, **summary_stats(times, 1), **extra,
                         "onnx_bytes": os.path.getsize(onnx_path), "onnxruntime_version": onnxruntime.__version__,
                         "other_processes_cpu_cores": contention.rounded_other_cores}
    return out


def run_our_training(cfg, args) -> Dict:
    """Our PyTorch train step in this process: with glibc's default allocator (``train``), then, with
    ``--allocator-rows``, after :func:`keep_freed_memory` (``train_kept``; what our tools do with
    ``CPU_ALLOCATOR.KEEP_FREED_MEMORY``). Run after :func:`run_our_onnx` (which wants the default)."""
    out = {}
    size = (args.resolution_used, args.resolution_used)
    for suffix in ("", "_kept") if args.allocator_rows else ("",):
        if suffix and not keep_freed_memory():
            print("[compare_rfdetr] the environment already sets the allocator: no 'train_kept' row", flush=True)
            break
        print(f"[compare_rfdetr] ours: train{suffix} ...", flush=True)
        r = run_benchmark(cfg, "train", size, args.batch_size, args.iters, args.warmup, seed=args.seed)
        r.pop("peak_memory_mib", None)  # the process's RSS peak covers every model measured before
        r.pop("peak_memory_kind", None)
        out["train" + suffix] = r
    return out


def our_inference_command(args, overrides: Sequence[str], keep: bool, output: str) -> List[str]:
    """``tools/benchmark.py`` timing our inference (batch 1, no FLOP count) in a fresh process."""
    return [sys.executable, os.path.join(_REPO_ROOT, "tools", "benchmark.py"), "--config-file", BASE_CONFIG,
            "--mode", "inference", "--image-size", str(args.resolution_used), "--batch-size", "1",
            "--iters", str(args.iters), "--warmup", str(args.warmup), "--seed", str(args.seed),
            *(["--threads", str(args.threads)] if args.threads > 0 else []), "--no-flops", "--output", output,
            *overrides, "CPU_ALLOCATOR.KEEP_FREED_MEMORY", str(keep)]


def inference_rounds(python: str, args, overrides: Sequence[str], batch_file: str) -> Dict[str, Dict]:
    """Batch-1 PyTorch inference of both sides, each measurement in a fresh process: ``--rounds``
    rounds of RF-DETR's worker and our ``tools/benchmark.py``, each with glibc's default allocator and
    (``--allocator-rows``) keeping freed memory, interleaved so that drift in the machine's speed (a
    shared VM's is several per cent over minutes) hits every row alike. Returns ``{"rfdetr": {mode:
    stats}, "ours": {mode: stats}}`` with ``mode`` in ``inference`` / ``inference_kept``, the stats over
    the pooled iterations of all rounds."""
    keeps = (False, True) if args.allocator_rows and allocator_settings_from_environment() is None else (False,)
    times = {side: {} for side in ("rfdetr", "ours")}
    busy = {side: {} for side in ("rfdetr", "ours")}
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads > 0 else {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for keep in keeps:
                mode = "inference_kept" if keep else "inference"
                print(f"[compare_rfdetr] round {round_index + 1}/{args.rounds}: {mode}, RF-DETR then ours ...",
                      flush=True)
                rf = run_worker(python, args, ["--batch", batch_file, "--modes", "inference", "--iters",
                                               str(args.iters), "--warmup", str(args.warmup)],
                                env=KEPT_MEMORY_ENVIRONMENT if keep else None)["inference"]
                out = os.path.join(tmp, "ours.json")
                subprocess.run(our_inference_command(args, overrides, keep, out), check=True,
                               env=dict(os.environ, **env), stdout=subprocess.DEVNULL)
                with open(out) as f:
                    ours = json.load(f)
                for side, r in (("rfdetr", rf), ("ours", ours)):
                    times[side].setdefault(mode, []).extend(r["times_s"])
                    busy[side][mode] = max(busy[side].get(mode, 0.0), r.get("other_processes_cpu_cores") or 0.0)
    return {side: {mode: {"mode": mode, "batch_size": 1, "rounds": args.rounds, **summary_stats(t, 1),
                          "other_processes_cpu_cores": busy[side][mode]} for mode, t in modes.items()}
            for side, modes in times.items()}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _median(r: Optional[Dict]) -> Optional[float]:
    return r["median_s_per_iter"] if r else None


def ratio_rows(rf: Dict, ours: Dict, batch_size: int) -> List[Dict]:
    """One row per comparison: RF-DETR's and our median seconds, ratio = RF-DETR / ours, the goal."""
    specs = [
        (f"training step, batch {batch_size}, PyTorch", "train", "train", None),
        (f"training step, batch {batch_size}, PyTorch, both keeping freed memory", "train_kept", "train_kept", None),
        ("inference, batch 1, PyTorch", "inference", "inference", GOALS["inference_pytorch"]),
        ("inference, batch 1, PyTorch, both keeping freed memory", "inference_kept", "inference_kept",
         GOALS["inference_pytorch"]),
        ("inference, batch 1, PyTorch, as shipped: ours keeping freed memory, RF-DETR glibc's default",
         "inference", "inference_kept", GOALS["inference_pytorch"]),
        ("inference, batch 1: ours ONNX Runtime vs RF-DETR PyTorch", "inference", "inference_onnx",
         GOALS["inference_onnx"]),
        ("inference, batch 1: ours ONNX Runtime INT8 vs RF-DETR PyTorch", "inference", "inference_onnx_int8",
         GOALS["inference_onnx"]),
    ]
    rows = []
    for name, rf_key, our_key, goal in specs:
        rf_s, our_s = _median(rf.get(rf_key)), _median(ours.get(our_key))
        ratio = rf_s / our_s if rf_s and our_s else None
        busy = [r.get("other_processes_cpu_cores") for r in (rf.get(rf_key), ours.get(our_key)) if r]
        rows.append({"comparison": name, "rfdetr_s": rf_s, "ours_s": our_s, "ratio": ratio, "goal": goal,
                     "goal_met": None if goal is None or ratio is None else ratio >= goal,
                     "contended": any(b is not None and b >= 0.25 for b in busy)})
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def speed_table(rows: Sequence[Dict]) -> str:
    def sec(x):
        return "-" if x is None else f"{x:.4f}"

    cells = []
    for r in rows:
        goal = "-" if r["goal"] is None else f">= {r['goal']:g}x ({'met' if r['goal_met'] else 'not met'})"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x" + (" *" if r["contended"] else "")
        cells.append([r["comparison"], sec(r["rfdetr_s"]), sec(r["ours_s"]), ratio, goal])
    return markdown_table(["comparison", "RF-DETR s", "ours s", "RF-DETR / ours", "goal"], cells)


def settings_table(rows: Sequence[Dict]) -> str:
    return markdown_table(["setting", "RF-DETR", "dinodet2", "match"],
                          [[r["setting"], r["rfdetr"], r["ours"], r["match"]] for r in rows])


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="nano", help="RF-DETR variant with patch 16: nano, small, medium, large")
    p.add_argument("--resolution", type=int, default=0, help="input side in pixels (0: the variant's)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--group-detr", type=int, default=0,
                   help="RF-DETR's training query groups (0: the variant's, 13; 1: none)")
    p.add_argument("--denoising", choices=("on", "off"), default="on",
                   help="our contrastive denoising queries in training (MODEL.DETR.DN.ENABLED; our recipe: on)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (0: their defaults)")
    p.add_argument("--batch-size", type=int, default=2, help="training batch (inference always uses 1 image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rfdetr-venv", default=DEFAULT_VENV, help="RF-DETR's virtualenv (created when missing)")
    p.add_argument("--rfdetr-version", default=RFDETR_VERSION)
    p.add_argument("--no-allocator-rows", dest="allocator_rows", action="store_false",
                   help="skip the second PyTorch measurement of both sides with glibc keeping freed memory "
                        "(CPU_ALLOCATOR.KEEP_FREED_MEMORY; environment variables for RF-DETR's process)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of the inference measurements (each a fresh process per side)")
    p.add_argument("--output", default=None, metavar="JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    python = ensure_rfdetr_venv(args.rfdetr_venv, args.rfdetr_version)
    with tempfile.TemporaryDirectory() as tmp:
        description = run_worker(python, args, ["--describe"])["describe"]
        args.resolution_used = description["resolution"]
        multiple = description["patch_size"] * description["num_windows"]
        if args.resolution_used % multiple:
            sys.exit(f"error: --resolution {args.resolution_used} must be a multiple of {multiple} (patch "
                     f"{description['patch_size']} x {description['num_windows']} windows), so that neither side pads.")
        cfg = load_dinodet2_config(BASE_CONFIG, our_overrides(description, args.num_classes, args.denoising == "on"))
        matching = matching_rows(description, cfg)
        print("\n" + settings_table(matching) + "\n", flush=True)
        batch_file = os.path.join(tmp, "batch.pt")
        save_shared_batch(batch_file, args, cfg)
        print(f"[compare_rfdetr] RF-DETR ({description['config_class']}): train, inference ...", flush=True)
        train = ["--batch", batch_file, "--modes", "train", "--iters", str(args.iters), "--warmup", str(args.warmup)]
        rf = run_worker(python, args, train)
        if args.allocator_rows and allocator_settings_from_environment() is None:
            print("[compare_rfdetr] RF-DETR, keeping freed memory: train ...", flush=True)
            rf["train_kept"] = run_worker(python, args, train, env=KEPT_MEMORY_ENVIRONMENT)["train"]
        overrides = our_overrides(description, args.num_classes, args.denoising == "on")
        rounds = inference_rounds(python, args, overrides, batch_file)
    rf.update(rounds["rfdetr"])
    ours = {**rounds["ours"], **run_our_onnx(cfg, args), **run_our_training(cfg, args)}
    rows = ratio_rows(rf, ours, args.batch_size)
    print("\n" + speed_table(rows))
    print("times: medians in seconds; ratio > 1: ours is faster; * = other processes kept >= 0.25 CPU cores "
          "busy during a measurement (unreliable)")
    result = {
        "settings": vars(args),
        "device_name": device_name("cpu"),
        "torch_version": torch.__version__,
        "rfdetr_torch_version": rf.get("torch_version"),
        "torch_threads": torch.get_num_threads(),
        "rfdetr_torch_threads": rf.get("torch_threads"),
        "rfdetr_description": description,
        "our_overrides": our_overrides(description, args.num_classes, args.denoising == "on"),
        "matching": matching,
        "rfdetr": {k: rf[k] for k in ("train", "inference", "train_kept", "inference_kept") if k in rf},
        "ours": ours,
        "comparisons": rows,
        "markdown": {"settings": settings_table(matching), "speed": speed_table(rows)},
    }
    if args.output:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
