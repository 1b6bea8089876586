"""Speed / memory / FLOPs of a dinodet2 config's model on a fixed-seed synthetic batch: what
``tools/benchmark.py`` reports.

* ``"train"``: one iteration = forward -> sum of the loss dict -> ``zero_grad`` -> ``backward`` ->
  ``optimizer.step`` with dinodet2's optimizer (``SOLVER.*``, gradient clipping included). With
  ``SOLVER.AMP.ENABLED`` the forward runs under the autocast ``SOLVER.AMP.PRECISION`` names, as in
  training (:class:`dinodet2.engine.precision.MixedPrecision`: fp16 with a ``GradScaler`` on CUDA, bf16
  without one on CUDA or the CPU); a precision the device cannot run is refused with the keys named.
* ``"inference"``: ``model.eval()`` and ``torch.no_grad()`` forward (post-processing included).
"""
import contextlib
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

from ..engine.precision import MixedPrecision
from .measurement import (BenchmarkSetupError, CpuContentionMeter, contention_warning, count_gflops_per_image,
                          device_name, parameter_counts, peak_memory_mib, summary_stats, time_iterations)

__all__ = ["DEFAULT_NUM_BOXES", "DEFAULT_SEED", "format_summary", "make_synthetic_batch", "parse_image_size",
           "run_benchmark", "seed_everything"]

DEFAULT_SEED = 0
DEFAULT_NUM_BOXES = 5
FLOPS_NOTE = ("torch.utils.flop_counter.FlopCounterMode total of one eval forward (no_grad) on a 1-image "
              "batch, divided by 1e9; 2 FLOPs per multiply-accumulate; ops without a FLOP formula "
              "(grid_sample, softmax, norms, elementwise) are not counted")


def parse_image_size(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """``448`` or ``[448]`` -> (448, 448); ``[H, W]`` -> (H, W)."""
    if isinstance(size, int):
        return size, size
    size = [int(s) for s in size]
    if len(size) == 1:
        return size[0], size[0]
    if len(size) == 2:
        return size[0], size[1]
    raise BenchmarkSetupError(f"--image-size takes one (square) or two (H W) integers, got {size}.")


def make_synthetic_batch(image_size: Tuple[int, int], batch_size: int, num_classes: int, *,
                         with_instances: bool = True, num_boxes: int = DEFAULT_NUM_BOXES,
                         seed: int = DEFAULT_SEED) -> List[Dict]:
    """Detectron2 inputs: ``image`` (float CHW in [0, 255]), ``height``, ``width`` and optionally
    ``instances`` with ``num_boxes`` random valid XYXY ``gt_boxes`` inside the image and int64
    ``gt_classes`` in ``range(num_classes)``. Uses its own generator: same ``seed``, same batch.
    """
    h, w = image_size
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        item = {"image": image, "height": h, "width": w}
        if with_instances:
            # Box sizes 5%..50% of the image side, centres anywhere the box fits.
            bw = (0.05 + 0.45 * torch.rand(num_boxes, generator=g)) * w
            bh = (0.05 + 0.45 * torch.rand(num_boxes, generator=g)) * h
            x0 = torch.rand(num_boxes, generator=g) * (w - bw)
            y0 = torch.rand(num_boxes, generator=g) * (h - bh)
            boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g, dtype=torch.int64)
            item["instances"] = inst
        batch.append(item)
    return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_benchmark(cfg, mode: str, image_size: Union[int, Sequence[int]], batch_size: int, iters: int,
                  warmup: int, *, seed: int = DEFAULT_SEED, num_boxes: int = DEFAULT_NUM_BOXES,
                  count_flops: bool = True, model: Optional[torch.nn.Module] = None) -> Dict:
    """Build the model of ``cfg`` (unless ``model`` is given; compiled with ``MODEL.COMPILE.ENABLED``,
    its compilation then happens in the warm-up) and time ``mode`` ("train" or "inference") on a
    synthetic batch; return the measurements as a JSON-able dict."""
    from detectron2.modeling import build_model

    from ..engine.compilation import compile_model
    from ..engine.optimizer import build_optimizer

    if mode not in ("train", "inference"):
        raise BenchmarkSetupError(f"mode must be 'train' or 'inference', got '{mode}'.")
    if batch_size < 1:
        raise BenchmarkSetupError(f"batch_size must be >= 1, got {batch_size}.")
    h, w = parse_image_size(image_size)
    device = torch.device(cfg.MODEL.DEVICE)
    precision = None
    if mode == "train":
        try:
            precision = MixedPrecision.from_config(cfg)
        except ValueError as e:
            raise BenchmarkSetupError(str(e)) from e
    use_amp = precision is not None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkSetupError(f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' but CUDA is not available.")

    seed_everything(seed)
    if model is None:
        model = compile_model(cfg, build_model(cfg))
    model.to(device)
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    batch = make_synthetic_batch((h, w), batch_size, num_classes, with_instances=(mode == "train"),
                                 num_boxes=num_boxes, seed=seed)

    if mode == "train":
        model.train()
        optimizer = build_optimizer(cfg, model)
        scaler = precision.grad_scaler() if use_amp else None
        autocast = precision.autocast if use_amp else contextlib.nullcontext

        last_losses: Dict[str, float] = {}

        def step():
            with autocast():
                loss_dict = model(batch)
                losses = sum(loss_dict.values()) if isinstance(loss_dict, dict) else loss_dict
            last_losses.clear()
            last_losses.update({k: float(v) for k, v in loss_dict.items()} if isinstance(loss_dict, dict)
                               else {"loss": float(losses)})
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(losses).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                losses.backward()
                optimizer.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(batch)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with CpuContentionMeter() as contention:
        times = time_iterations(step, iters, warmup, device)
    peak_mib, peak_kind = peak_memory_mib(device)

    gflops = None
    if count_flops:
        was_training = model.training
        model.eval()
        one = [{k: v for k, v in batch[0].items() if k != "instances"}]
        with torch.compiler.set_stance("force_eager"):  # FLOPs of the eager ops, compiled or not
            gflops = count_gflops_per_image(lambda: model(one), model)
        model.train(was_training)

    result = {
        "mode": mode,
        "image_size": [h, w],
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "seed": seed,
        "boxes_per_image": num_boxes if mode == "train" else 0,
        **summary_stats(times, batch_size),
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": peak_kind,
        **parameter_counts(model),
        "gflops_per_image": gflops,
        "gflops_note": FLOPS_NOTE,
        # the last timed training step's losses, and whether every one was finite
        "losses": dict(last_losses) if mode == "train" else None,
        "losses_finite": all(np.isfinite(v) for v in last_losses.values()) if mode == "train" else None,
        "amp": use_amp,
        "amp_precision": precision.name if use_amp else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Average CPU cores used by other processes during warm-up + timed loop (Linux; else None).
        "other_processes_cpu_cores": contention.rounded_other_cores,
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
    }
    return result


def format_summary(r: Dict) -> str:
    """A few human-readable lines of a :func:`run_benchmark` result (+ a contention warning)."""
    lines = [
        f"{r.get('config_file', '<cfg>')}  mode={r['mode']}  image={r['image_size'][0]}x{r['image_size'][1]}  "
        f"batch={r['batch_size']}  iters={r['iters']} (+{r['warmup']} warm-up)  amp={r.get('amp_precision') or r['amp']}",
        f"  {r['median_s_per_iter']:.4f} s/iter median, {r['mean_s_per_iter']:.4f} mean "
        f"(min {r['min_s_per_iter']:.4f}, max {r['max_s_per_iter']:.4f})  ->  {r['images_per_s']:.2f} images/s",
        f"  peak memory {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind'].split(':')[0].split(' (')[0]})",
        f"  params {r['params_total']:,} total, {r['params_trainable']:,} trainable"
        + (f";  {r['gflops_per_image']:.2f} GFLOPs/image (forward, FlopCounterMode)"
           if r.get("gflops_per_image") is not None else ""),
        f"  {r['device_name']}, torch {r['torch_version']}, {r['torch_threads']} threads",
    ]
    warning = contention_warning(r)
    if warning:
        lines.append("  " + warning)
    return "\n".join(lines)
