#!/usr/bin/env python
"""Speed / memory / FLOPs benchmark of any dinodet2 config on synthetic data.

The config is built exactly as ``tools/train_net.py`` builds it (``get_cfg()`` + dinodet2
defaults + YAML file + ``KEY VALUE`` overrides) and the model with Detectron2's ``build_model``.
Inputs are a fixed-seed synthetic batch: random uint8-range images of the requested size and,
for training, 5 random valid boxes per image with random classes. No dataset is needed.

* ``--mode train``: one iteration = forward -> sum of the loss dict -> ``zero_grad`` ->
  ``backward`` -> ``optimizer.step`` with dinodet2's optimizer (``SOLVER.*``, gradient clipping
  included). With ``SOLVER.AMP.ENABLED`` on CUDA the step runs like Detectron2's ``AMPTrainer``
  (fp16 autocast + ``GradScaler``); AMP on CPU is refused.
* ``--mode inference``: ``model.eval()`` and ``torch.no_grad()`` forward (post-processing included).

Reported: median and mean seconds per iteration after warm-up, images/s (batch / median), peak
memory (CUDA: ``max_memory_allocated`` of the timed loop; CPU: the process's peak RSS from
``getrusage``, i.e. the peak over the whole process, model building included), parameter counts,
forward GFLOPs per image (``torch.utils.flop_counter.FlopCounterMode`` over one eval forward of a
1-image batch; it counts 2 FLOPs per multiply-accumulate and only ops it has formulas for --
matmuls, convolutions, attention -- so e.g. ``grid_sample``, softmax and norms are not counted).

Examples::

    python tools/benchmark.py --config-file configs/Demo/detr_shapes_tiny.yaml --mode train \\
        --image-size 224 --batch-size 2 --iters 10 --warmup 2
    python tools/benchmark.py --config-file configs/COCO-Detection/detr_dinov2_base_lora4.yaml \\
        --mode inference --image-size 800 1216 --batch-size 1 --threads 4 --output bench.json \\
        MODEL.DEVICE cuda
    # a random-init model, no Hub download:
    HF_HUB_OFFLINE=1 python tools/benchmark.py --config-file configs/COCO-Detection/detr_dinov2_base_lora4.yaml \\
        --mode train --image-size 448 MODEL.DINOV2.RANDOM_INIT True MODEL.DEVICE cpu

From another script (``tools/`` is not a package)::

    import importlib.util
    spec = importlib.util.spec_from_file_location("dinodet2_benchmark", "tools/benchmark.py")
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    cfg = bench.setup_cfg("configs/Demo/detr_shapes_tiny.yaml", ["MODEL.DEVICE", "cpu"])
    result = bench.run_benchmark(cfg, "train", (224, 224), batch_size=2, iters=5, warmup=1)

(or ``sys.path.insert(0, "tools"); import benchmark``). Importing the module has no side effects
beyond importing torch, detectron2 and dinodet2.
"""
import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

# Allow running from a source checkout without `pip install -e .`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import dinodet2  # noqa: E402,F401  (registers backbones / meta-architecture)
from dinodet2.config import load_dinodet2_config  # noqa: E402

__all__ = [
    "BenchmarkSetupError", "setup_cfg", "parse_image_size", "make_synthetic_batch", "time_iterations",
    "count_gflops_per_image", "CpuContentionMeter", "contention_warning",
    "peak_memory_mib", "device_name", "run_benchmark",
]

DEFAULT_SEED = 0
DEFAULT_NUM_BOXES = 5
FLOPS_NOTE = ("torch.utils.flop_counter.FlopCounterMode total of one eval forward (no_grad) on a 1-image "
              "batch, divided by 1e9; 2 FLOPs per multiply-accumulate; ops without a FLOP formula "
              "(grid_sample, softmax, norms, elementwise) are not counted")


class BenchmarkSetupError(ValueError):
    """Invalid benchmark request (bad mode / size / device / AMP combination)."""


# ----------------------------------------------------------------------------------------------
# Config and inputs
# ----------------------------------------------------------------------------------------------
def setup_cfg(config_file: str, opts: Sequence[str] = ()):
    """Config as ``tools/train_net.py`` builds it: defaults + dinodet2 keys + file + overrides."""
    return load_dinodet2_config(config_file, opts)


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


# ----------------------------------------------------------------------------------------------
# Measurement helpers (shared with benchmarks/compare_hf.py)
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(step: Callable[[], None], iters: int, warmup: int, device) -> List[float]:
    """Run ``step`` ``warmup`` times untimed, then ``iters`` times; seconds of each timed call
    (CUDA synchronised before and after every call)."""
    device = torch.device(device)
    if iters < 1:
        raise BenchmarkSetupError(f"iters must be >= 1, got {iters}.")
    for _ in range(max(warmup, 0)):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def count_gflops_per_image(forward: Callable[[], object], module: Optional[torch.nn.Module] = None) -> float:
    """GFLOPs of ``forward()`` (which must process one image) as counted by FlopCounterMode.

    The parameters of ``module`` are made ``requires_grad=False`` while counting (and restored):
    FlopCounterMode's module tracker registers gradient hooks on module inputs that require grad,
    which fails under ``no_grad`` for views of trainable parameters (e.g. expanded query embeddings).
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            forward()
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter.get_total_flops() / 1e9


def peak_memory_mib(device) -> Tuple[float, str]:
    """(MiB, what it is): CUDA max_memory_allocated, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, (
            "torch.cuda.max_memory_allocated during the timed loop (after reset_peak_memory_stats)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    return rss_bytes / 2 ** 20, ("process peak RSS (getrusage ru_maxrss): peak over the whole process "
                                 "lifetime, imports and model building included, not just the model")


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name})"


def _summary_stats(times: Sequence[float], batch_size: int) -> Dict:
    median = statistics.median(times)
    return {
        "median_s_per_iter": median,
        "mean_s_per_iter": statistics.fmean(times),
        "min_s_per_iter": min(times),
        "max_s_per_iter": max(times),
        "images_per_s": batch_size / median,
        "times_s": list(times),
    }


def _system_busy_seconds() -> Optional[float]:
    """CPU seconds spent busy by all processes since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is already counted in user)
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class CpuContentionMeter:
    """Average number of cores that *other* processes kept busy while the block ran.

    With all cores busy, OpenMP threads that wait on each other slow down by one to two orders
    of magnitude (measured: 0.018 s -> 1.8 s per iteration at 2 threads on 2 cores while another
    2-thread PyTorch process ran), so CPU timings taken under contention are meaningless.
    """

    def __enter__(self):
        self._busy, self._own, self._wall = _system_busy_seconds(), time.process_time(), time.perf_counter()
        self.other_cores = None
        return self

    def __exit__(self, *exc):
        busy = _system_busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            own = time.process_time() - self._own
            self.other_cores = max(0.0, (busy - self._busy) - own) / wall
        return False


def contention_warning(r: Dict, threshold: float = 0.25) -> Optional[str]:
    """A warning when other processes used CPU cores during a CPU benchmark's timed loop."""
    other = r.get("other_processes_cpu_cores")
    if r.get("device") != "cpu" or other is None or other < threshold:
        return None
    return (f"WARNING: other processes kept {other:.2f} CPU cores busy (of {r.get('cpu_count')}) during the "
            "timed loop; these timings may be far too slow (use an idle machine or fewer --threads).")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def run_benchmark(cfg, mode: str, image_size: Union[int, Sequence[int]], batch_size: int, iters: int,
                  warmup: int, *, seed: int = DEFAULT_SEED, num_boxes: int = DEFAULT_NUM_BOXES,
                  count_flops: bool = True, model: Optional[torch.nn.Module] = None) -> Dict:
    """Build the model of ``cfg`` (unless ``model`` is given) and time ``mode`` ("train" or
    "inference") on a synthetic batch; return the measurements as a JSON-able dict."""
    from detectron2.modeling import build_model

    from dinodet2.engine.optimizer import build_optimizer

    if mode not in ("train", "inference"):
        raise BenchmarkSetupError(f"mode must be 'train' or 'inference', got '{mode}'.")
    if batch_size < 1:
        raise BenchmarkSetupError(f"batch_size must be >= 1, got {batch_size}.")
    h, w = parse_image_size(image_size)
    device = torch.device(cfg.MODEL.DEVICE)
    use_amp = mode == "train" and bool(cfg.SOLVER.AMP.ENABLED)
    if use_amp and device.type != "cuda":
        raise BenchmarkSetupError("SOLVER.AMP.ENABLED=True needs a CUDA device (MODEL.DEVICE is "
                         f"'{cfg.MODEL.DEVICE}'); set SOLVER.AMP.ENABLED False to benchmark on CPU.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkSetupError(f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' but CUDA is not available.")

    seed_everything(seed)
    if model is None:
        model = build_model(cfg)
    model.to(device)
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    batch = make_synthetic_batch((h, w), batch_size, num_classes, with_instances=(mode == "train"),
                                 num_boxes=num_boxes, seed=seed)

    if mode == "train":
        model.train()
        optimizer = build_optimizer(cfg, model)
        scaler = torch.amp.GradScaler("cuda") if use_amp else None
        autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else contextlib.nullcontext

        def step():
            with autocast():
                loss_dict = model(batch)
                losses = sum(loss_dict.values()) if isinstance(loss_dict, dict) else loss_dict
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
        **_summary_stats(times, batch_size),
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": peak_kind,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gflops_per_image": gflops,
        "gflops_note": FLOPS_NOTE,
        "amp": use_amp,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Average CPU cores used by other processes during warm-up + timed loop (Linux; else None).
        "other_processes_cpu_cores": (None if contention.other_cores is None
                                      else round(contention.other_cores, 3)),
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
    }
    return result


def format_summary(r: Dict) -> str:
    lines = [
        f"{r.get('config_file', '<cfg>')}  mode={r['mode']}  image={r['image_size'][0]}x{r['image_size'][1]}  "
        f"batch={r['batch_size']}  iters={r['iters']} (+{r['warmup']} warm-up)  amp={r['amp']}",
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


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--mode", choices=("train", "inference"), default="inference")
    p.add_argument("--image-size", type=int, nargs="+", default=[448], metavar="N",
                   help="one integer (square) or two (H W); should be a multiple of the patch size")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--output", default=None, metavar="JSON", help="also write the JSON here")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides as KEY VALUE pairs, e.g. MODEL.DEVICE cpu")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        image_size = parse_image_size(args.image_size)
    except BenchmarkSetupError as e:
        sys.exit(f"error: {e}")
    cfg = setup_cfg(args.config_file, args.opts)
    try:
        result = run_benchmark(cfg, args.mode, image_size, args.batch_size, args.iters, args.warmup,
                               seed=args.seed, count_flops=not args.no_flops)
    except BenchmarkSetupError as e:
        sys.exit(f"error: {e}")
    result = {"config_file": args.config_file, "overrides": list(args.opts), **result}
    print(format_summary(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
