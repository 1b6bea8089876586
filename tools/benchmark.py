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
    # torch.compile'd (compiled in the warm-up; eager vs compiled side by side, compile time apart:
    # dinodet2.benchmarking.measure_compile):
    python tools/benchmark.py --config-file configs/Demo/detr_shapes_tiny_improved.yaml --mode inference \\
        --image-size 224 --warmup 2 MODEL.COMPILE.ENABLED True

This file is the command line of :func:`dinodet2.benchmarking.run_benchmark`; import that from
another script (the package docstring shows how).
"""
import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

# Allow running from a source checkout without `pip install -e .`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from dinodet2.benchmarking import (  # noqa: E402
    DEFAULT_SEED,
    BenchmarkSetupError,
    format_summary,
    parse_image_size,
    run_benchmark,
)
from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.engine.cpu_allocator import apply_allocator_config  # noqa: E402


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
    cfg = load_dinodet2_config(args.config_file, args.opts)
    kept = apply_allocator_config(cfg)
    try:
        result = run_benchmark(cfg, args.mode, image_size, args.batch_size, args.iters, args.warmup,
                               seed=args.seed, count_flops=not args.no_flops)
    except BenchmarkSetupError as e:
        sys.exit(f"error: {e}")
    result = {"config_file": args.config_file, "overrides": list(args.opts),
              "cpu_allocator": "keeps freed memory" if kept else "unchanged", **result}
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
