#!/usr/bin/env python
"""Side-by-side speed of dinodet2 and HuggingFace ``transformers`` DETR detectors with the same
DINOv2 + LoRA backbone, on the same synthetic data.

Pairs (``--pairs``):

* ``detr``: HF ``DetrForObjectDetection`` vs our seed baseline
  (``configs/COCO-Detection/detr_dinov2_base_lora4.yaml``) with ``MODEL.DETR.ENC_LAYERS`` set to
  HF's encoder depth (``--encoder-layers``, default 0 = the seed baseline; HF's own default is 6).
* ``deformable``: HF ``DeformableDetrForObjectDetection`` (3 feature levels: the DINOv2 stride-14
  map + two stride-2 conv levels; no two-stage, no box refinement) vs our deformable model with a
  3-level simple feature pyramid (scale factors 1, 0.5, 0.25 -> the same token counts). If our
  config does not know a key (YACS' "Non-existent key" assertion) or a registry lacks a name
  (``KeyError``), our side is reported as skipped with the error and the HF side still runs.
  ``--hf-levels 4`` additionally measures HF at its default 4 levels (an extra, unmatched row).

Both sides share: a randomly initialised DINOv2 (``--dinov2-hidden/-layers/-heads``, patch 14,
MLP ratio 4, position-embedding table for 518 px as our ``PRETRAIN_IMAGE_SIZE``), LoRA
(``--lora-rank``/``--lora-alpha``, dropout 0) on the query and value projections of every DINOv2
attention block, the rest of the DINOv2 frozen (the rest of the detector trains); a 256-d
transformer with 8 heads, ``--dec-layers`` decoder layers, the same FFN width on both sides
(``--detr-ffn`` 2048 / ``--deformable-ffn`` 1024), ``--num-queries`` queries, ``--num-classes``
classes, auxiliary (deep-supervision) losses on both sides (``--aux-loss off`` to drop them),
dropout 0.1 on sub-layer outputs and ``--hf-attention-dropout`` (default 0.0, HF's default) on
attention weights on both sides (ours: ``MODEL.DETR.ATTENTION_DROPOUT``), fp32.

Protocol (``tools/benchmark.py``'s: :mod:`dinodet2.benchmarking`, which measures our side): a fixed-seed batch of random
uint8-range images with 5 random boxes each; train step = forward + loss + ``zero_grad`` +
backward + AdamW step (lr 1e-4, weight decay 1e-4, full-model gradient clipping at norm 0.1, as
our base config); inference = ``no_grad`` forward of the batch in eval mode. Median over
``--iters`` timed iterations after ``--warmup`` untimed ones; ratio = HF time / our time (> 1: we
are faster). GFLOPs/image: ``FlopCounterMode`` over one eval forward of a 1-image batch.

Examples::

    HF_HUB_OFFLINE=1 python benchmarks/compare_hf.py                          # both pairs, 5 iters
    HF_HUB_OFFLINE=1 python benchmarks/compare_hf.py --pairs detr --iters 2 --warmup 1 --output hf.json
    HF_HUB_OFFLINE=1 python benchmarks/compare_hf.py --pairs deformable --hf-levels 4 --threads 8
"""
import argparse
import json
import os
import sys
import traceback
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built from configs: never download

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, _REPO_ROOT)

from dinodet2.benchmarking import (CpuContentionMeter, count_gflops_per_image, device_name,  # noqa: E402
                                   make_synthetic_batch, parameter_counts, parse_image_size, run_benchmark,
                                   summary_stats, time_iterations)
from dinodet2.config import load_dinodet2_config  # noqa: E402

SEED_CONFIG = os.path.join(_REPO_ROOT, "configs", "COCO-Detection", "detr_dinov2_base_lora4.yaml")

# DINOv2 attention projections to adapt, per transformers version (5.x first).
LORA_TARGET_SUFFIXES = {"query": ("attention.q_proj", "attention.attention.query"),
                        "value": ("attention.v_proj", "attention.attention.value")}


# ----------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------
def backbone_overrides(args) -> List[str]:
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.DINOV2.RANDOM_INIT", "True",
        "MODEL.DINOV2.HIDDEN_SIZE", str(args.dinov2_hidden),
        "MODEL.DINOV2.NUM_LAYERS", str(args.dinov2_layers),
        "MODEL.DINOV2.NUM_HEADS", str(args.dinov2_heads),
        "MODEL.DINOV2.PATCH_SIZE", "14",
        "MODEL.DINOV2.FREEZE", "True",
        "MODEL.LORA.ENABLED", "True",
        "MODEL.LORA.RANK", str(args.lora_rank),
        "MODEL.LORA.ALPHA", str(float(args.lora_alpha)),
        "MODEL.LORA.DROPOUT", "0.0",
        "MODEL.LORA.TARGET_MODULES", "['query', 'value']",
        "MODEL.DETR.HIDDEN_DIM", "256",
        "MODEL.DETR.NHEADS", "8",
        "MODEL.DETR.DEC_LAYERS", str(args.dec_layers),
        "MODEL.DETR.NUM_QUERIES", str(args.num_queries),
        "MODEL.DETR.NUM_CLASSES", str(args.num_classes),
        "MODEL.DETR.DEEP_SUPERVISION", str(args.aux_loss == "on"),
    ]


def our_overrides(pair: str, args) -> List[str]:
    opts = backbone_overrides(args) + ["MODEL.DETR.ATTENTION_DROPOUT", str(args.hf_attention_dropout or 0.0)]
    if pair == "detr":
        return opts + [
            "MODEL.DETR.ENC_LAYERS", str(args.encoder_layers),
            "MODEL.DETR.DIM_FEEDFORWARD", str(args.detr_ffn),
        ]
    return opts + [
        "MODEL.BACKBONE.NAME", "build_dinov2_sfp_backbone",
        "MODEL.SFP.SCALE_FACTORS", "[1.0, 0.5, 0.25]",
        "MODEL.SFP.OUT_CHANNELS", "256",
        "MODEL.DETR.ENC_LAYERS", str(args.deformable_encoder_layers),
        "MODEL.DETR.DEFORMABLE.ENCODER", "True",
        "MODEL.DETR.DEFORMABLE.DECODER", "True",
        "MODEL.DETR.DEFORMABLE.NUM_POINTS", "4",
        "MODEL.DETR.ITERATIVE_REFINEMENT", "False",
        "MODEL.DETR.TWO_STAGE", "False",
        "MODEL.DETR.CLASS_LOSS", "focal",
        "MODEL.DETR.DIM_FEEDFORWARD", str(args.deformable_ffn),
    ]


# ----------------------------------------------------------------------------------------------
# HF side
# ----------------------------------------------------------------------------------------------
def hf_dinov2_config(args):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=args.dinov2_hidden, num_hidden_layers=args.dinov2_layers,
        num_attention_heads=args.dinov2_heads, mlp_ratio=4, patch_size=14, image_size=518,
        out_features=[f"stage{args.dinov2_layers}"],  # the last block, like our OUT_INDICES [-1]
    )


def find_dinov2(model: nn.Module) -> nn.Module:
    """The DINOv2 backbone module inside an HF detector."""
    for module in model.modules():
        if type(module).__name__ in ("Dinov2Backbone", "Dinov2WithRegistersBackbone"):
            return module
    raise RuntimeError(f"No Dinov2Backbone found in {type(model).__name__}.")


def apply_lora_and_freeze(model: nn.Module, rank: int, alpha: float) -> List[str]:
    """LoRA on DINOv2's q/v projections (names resolved from the built model) with ``peft``;
    then freeze every non-LoRA DINOv2 parameter (as our backbone does). Returns the targets."""
    from peft import LoraConfig, inject_adapter_in_model

    dinov2 = find_dinov2(model)
    suffixes = tuple(s for fam in LORA_TARGET_SUFFIXES.values() for s in fam)
    targets = [n for n, m in dinov2.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]
    if not targets:
        raise RuntimeError(f"No DINOv2 q/v projections (names ending in {suffixes}) found in the HF model.")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), dinov2)
    for name, param in dinov2.named_parameters():
        param.requires_grad = "lora_" in name
    return targets


def _hf_dropout_kwargs(args) -> Dict:
    """HF's default dropout (0.1 on sub-layer outputs, 0.0 on attention weights) unless overridden;
    our side gets the same attention dropout through MODEL.DETR.ATTENTION_DROPOUT."""
    return {} if args.hf_attention_dropout is None else {"attention_dropout": args.hf_attention_dropout}


def _hf_config_kwargs(args, encoder_layers: int, ffn: int) -> Dict:
    """What HF's DETR and Deformable DETR configs share: our sizes, the DINOv2 backbone, dropout."""
    return dict(
        backbone_config=hf_dinov2_config(args), use_timm_backbone=False, use_pretrained_backbone=False,
        num_labels=args.num_classes, num_queries=args.num_queries, d_model=256,
        encoder_layers=encoder_layers, decoder_layers=args.dec_layers,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        auxiliary_loss=args.aux_loss == "on", **_hf_dropout_kwargs(args),
    )


def _hf_model_with_lora(model_class, config, args, seed: int):
    """(``model_class(config)`` seeded with ``seed``, with LoRA; its LoRA target names)."""
    torch.manual_seed(seed)
    model = model_class(config)
    targets = apply_lora_and_freeze(model, args.lora_rank, args.lora_alpha)
    return model, targets


def build_hf_detr(args, seed: int):
    from transformers import DetrConfig, DetrForObjectDetection

    config = DetrConfig(**_hf_config_kwargs(args, args.encoder_layers, args.detr_ffn))
    return _hf_model_with_lora(DetrForObjectDetection, config, args, seed)


def build_hf_deformable(args, seed: int, levels: int):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(**_hf_config_kwargs(args, args.deformable_encoder_layers, args.deformable_ffn),
                                  num_feature_levels=levels, encoder_n_points=4, decoder_n_points=4,
                                  two_stage=False, with_box_refine=False)
    return _hf_model_with_lora(DeformableDetrForObjectDetection, config, args, seed)


def hf_inputs(batch: Sequence[Dict], pixel_mean, pixel_std):
    """Our synthetic Detectron2 batch -> HF (raw images, labels with normalised cxcywh boxes)."""
    from torchvision.ops import box_convert

    images = torch.stack([x["image"] for x in batch])
    labels = []
    for x in batch:
        inst = x.get("instances")
        if inst is None:
            continue
        h, w = inst.image_size
        boxes = inst.gt_boxes.tensor / torch.tensor([w, h, w, h], dtype=torch.float32)
        labels.append({"class_labels": inst.gt_classes, "boxes": box_convert(boxes, "xyxy", "cxcywh")})
    mean = torch.tensor(pixel_mean).view(1, -1, 1, 1)
    std = torch.tensor(pixel_std).view(1, -1, 1, 1)
    return images, labels or None, mean, std


def run_hf_benchmark(build, mode: str, args, base_cfg) -> Dict:
    """Time an HF detector with the protocol of ``tools/benchmark.py``."""
    model, targets = build()
    h, w = args.image_size
    batch = make_synthetic_batch((h, w), args.batch_size, args.num_classes,
                                       with_instances=(mode == "train"), seed=args.seed)
    images, labels, mean, std = hf_inputs(batch, base_cfg.MODEL.PIXEL_MEAN, base_cfg.MODEL.PIXEL_STD)
    solver = base_cfg.SOLVER

    if mode == "train":
        model.train()
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                      lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY,
                                      betas=tuple(solver.BETAS))
        params = decay + no_decay
        clip = solver.CLIP_GRADIENTS
        clip_norm = clip.CLIP_VALUE if clip.ENABLED and clip.CLIP_TYPE == "full_model" else None

        def step():
            out = model(pixel_values=(images - mean) / std, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm, clip.NORM_TYPE)
            optimizer.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(pixel_values=(images - mean) / std)

    with CpuContentionMeter() as contention:
        times = time_iterations(step, args.iters, args.warmup, "cpu")
    model.eval()
    one = (images[:1] - mean) / std
    gflops = count_gflops_per_image(lambda: model(pixel_values=one), model)
    return {
        "mode": mode,
        **summary_stats(times, args.batch_size),
        **parameter_counts(model),
        "gflops_per_image": gflops,
        "other_processes_cpu_cores": contention.rounded_other_cores,
        "lora_targets": len(targets),
        "lora_target_example": targets[0],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dinov2_attn_implementation": getattr(find_dinov2(model).config, "_attn_implementation", None),
    }


def run_ours(pair: str, mode: str, args) -> Dict:
    opts = our_overrides(pair, args)
    try:
        cfg = load_dinodet2_config(SEED_CONFIG, opts)
    except AssertionError as e:  # YACS' merge_from_list asserts "Non-existent key: ..." (no KeyError)
        if "Non-existent key" in str(e):
            raise KeyError(str(e)) from e
        raise
    r = run_benchmark(cfg, mode, args.image_size, args.batch_size, args.iters, args.warmup, seed=args.seed)
    r.pop("peak_memory_mib", None)  # the process's RSS peak covers every model measured before
    r.pop("peak_memory_kind", None)
    r["overrides"] = opts
    return r


# ----------------------------------------------------------------------------------------------
def measure(label: str, fn, modes: Sequence[str]) -> Dict:
    """{"status": "ok", mode: result, ...} or a skipped / failed entry."""
    entry: Dict = {"model": label}
    for mode in modes:
        print(f"[compare_hf] {label}: {mode} ...", flush=True)
        try:
            r = fn(mode)
        except KeyError as e:  # config key (or registry name) that this dinodet2 does not have yet
            entry.update(status="skipped", error=f"KeyError: {e.args[0] if e.args else e}")
            print(f"[compare_hf]   skipped ({entry['error']})", flush=True)
            return entry
        except Exception as e:  # noqa: BLE001  (report and go on with the other models)
            traceback.print_exc()
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
            print(f"[compare_hf]   failed ({entry['error']})", flush=True)
            return entry
        print(f"[compare_hf]   {r['median_s_per_iter']:.4f} s median  (times {[round(t, 4) for t in r['times_s']]}; "
              f"other processes used {r.get('other_processes_cpu_cores')} cores)", flush=True)
        entry[mode] = r
    entry["status"] = "ok"
    return entry


def _fmt_time(entry: Dict, mode: str) -> str:
    if entry.get("status") != "ok" or mode not in entry:
        return "-"
    other = entry[mode].get("other_processes_cpu_cores")
    mark = "*" if other is not None and other >= 0.25 else " "  # timed while other processes used the CPU
    return f"{entry[mode]['median_s_per_iter']:.4f}{mark}"


def _ratio(hf: Dict, ours: Dict, mode: str) -> Optional[float]:
    if hf.get("status") != "ok" or ours.get("status") != "ok" or mode not in hf or mode not in ours:
        return None
    return hf[mode]["median_s_per_iter"] / ours[mode]["median_s_per_iter"]


def print_table(rows: List[Dict], modes: Sequence[str]) -> None:
    head = f"{'model':<52} {'train s/step':>13} {'infer s/batch':>14} {'params (trainable)':>24} {'GFLOPs/img':>11}"
    print("\n" + head + "\n" + "-" * len(head))
    for row in rows:
        if row.get("kind") == "ratio":
            cells = [f"{row[m]:.2f}x" if row.get(m) is not None else "-" for m in ("train", "inference")]
            print(f"{row['model']:<52} {cells[0]:>13} {cells[1]:>14}")
            continue
        any_mode = next((row[m] for m in modes if m in row), None)
        params = (f"{any_mode['params_total'] / 1e6:.2f}M ({any_mode['params_trainable'] / 1e6:.2f}M)"
                  if any_mode else "-")
        gf = f"{any_mode['gflops_per_image']:.1f}" if any_mode and any_mode.get("gflops_per_image") else "-"
        line = f"{row['model']:<52} {_fmt_time(row, 'train'):>13} {_fmt_time(row, 'inference'):>14} {params:>24} {gf:>11}"
        if row.get("status") not in ("ok", None):
            line += f"   [{row['status']}: {row.get('error', '')[:120]}]"
        print(line)
    print("ratio = HF time / our time (> 1: ours is faster); times are medians in seconds;\n"
          "* = other processes kept >= 0.25 CPU cores busy during that measurement (unreliable)")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="detr,deformable", help="comma list of: detr, deformable")
    p.add_argument("--modes", default="train,inference", help="comma list of: train, inference")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--image-size", type=int, nargs="+", default=[448], metavar="N", help="N or H W")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dinov2-hidden", type=int, default=192)
    p.add_argument("--dinov2-layers", type=int, default=4)
    p.add_argument("--dinov2-heads", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=4.0)
    p.add_argument("--encoder-layers", type=int, default=0,
                   help="DETR pair: encoder layers on both sides (0: the seed baseline has no encoder)")
    p.add_argument("--deformable-encoder-layers", type=int, default=6)
    p.add_argument("--dec-layers", type=int, default=6)
    p.add_argument("--detr-ffn", type=int, default=2048, help="DETR pair: FFN width (HF default 2048)")
    p.add_argument("--deformable-ffn", type=int, default=1024, help="deformable pair: FFN width (HF default 1024)")
    p.add_argument("--num-queries", type=int, default=100)
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--aux-loss", choices=("on", "off"), default="on",
                   help="auxiliary decoder losses on both sides (ours: DEEP_SUPERVISION, HF: auxiliary_loss)")
    p.add_argument("--hf-levels", type=int, default=3,
                   help="deformable pair: also measure HF Deformable DETR with this many levels when != 3 "
                        "(e.g. 4 = HF's default); the matched comparison always uses 3")
    p.add_argument("--hf-attention-dropout", type=float, default=None,
                   help="HF attention_dropout (default: HF's 0.0; ours drops attention weights at "
                        "MODEL.DETR.DROPOUT=0.1 like the original DETR; 0.1 makes HF do the same)")
    p.add_argument("--output", default=None, metavar="JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    args.image_size = parse_image_size(args.image_size)
    pairs = [s.strip() for s in args.pairs.split(",") if s.strip()]
    modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    bad = [x for x in pairs if x not in ("detr", "deformable")] + [x for x in modes if x not in ("train", "inference")]
    if bad:
        sys.exit(f"error: unknown pair/mode {bad}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import transformers

    base_cfg = load_dinodet2_config(SEED_CONFIG, backbone_overrides(args))  # pixel statistics, solver
    rows: List[Dict] = []
    for pair in pairs:
        if pair == "detr":
            ours = measure(f"ours: DETR seed baseline (enc {args.encoder_layers})",
                           lambda m: run_ours("detr", m, args), modes)
            hf = measure(f"HF DetrForObjectDetection (enc {args.encoder_layers})",
                         lambda m: run_hf_benchmark(lambda: build_hf_detr(args, args.seed), m, args, base_cfg), modes)
            extra = []
        else:
            ours = measure("ours: deformable DETR, SFP 3 levels", lambda m: run_ours("deformable", m, args), modes)
            hf = measure("HF DeformableDetrForObjectDetection (3 levels)",
                         lambda m: run_hf_benchmark(lambda: build_hf_deformable(args, args.seed, 3), m, args,
                                                    base_cfg), modes)
            extra = []
            if args.hf_levels != 3:
                extra.append(measure(f"HF DeformableDetr ({args.hf_levels} levels, extra)",
                                     lambda m: run_hf_benchmark(
                                         lambda: build_hf_deformable(args, args.seed, args.hf_levels), m, args,
                                         base_cfg), modes))
        for e in (ours, hf, *extra):
            e["pair"] = pair
        rows += [ours, hf]
        rows.append({"kind": "ratio", "pair": pair, "model": f"  speed-up of ours ({pair}: HF / ours)",
                     **{m: _ratio(hf, ours, m) for m in ("train", "inference")}})
        for e in extra:
            rows.append(e)
            rows.append({"kind": "ratio", "pair": pair, "model": f"  HF {args.hf_levels} levels / ours",
                         **{m: _ratio(e, ours, m) for m in ("train", "inference")}})

    print_table(rows, modes)
    result = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "device_name": device_name("cpu"),
        "rows": rows,
    }
    skipped = [r for r in rows if r.get("status") in ("skipped", "failed")]
    for r in skipped:
        print(f"NOTE: {r['model']} {r['status']}: {r['error']}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
