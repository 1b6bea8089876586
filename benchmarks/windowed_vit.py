"""Backbone forward time and peak memory of DINOv2 with global vs windowed attention (CPU or CUDA).

Every (variant, NUM_WINDOWS) runs in its own process (``dinodet2.benchmarking.measure_windowed_vit``)
on a randomly initialised ViT (no download); prints a Markdown table per NUM_WINDOWS and the JSON::

    python benchmarks/windowed_vit.py                                   # ViT-S at 896, windows 2 and 4
    python benchmarks/windowed_vit.py --image-size 896 --num-windows 4 --threads 2 --output out.json
    python benchmarks/windowed_vit.py --attn-implementation eager       # explicit attention matrices

Default: ViT-S (384-d, 12 blocks, 6 heads) at 896x896 (a 64x64 patch grid), windows in 8 of the 12
blocks (all but 2, 5, 8, 11, as ViTDet). Run it on an otherwise idle machine: each record has
``other_processes_cpu_cores`` and a warning when other processes made the timings unreliable.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dinodet2.benchmarking.windowed_vit import (  # noqa: E402
    VITDET_WINDOWED_BLOCKS,
    format_windowed_vit,
    measure_windowed_vit,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=896)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--windowed-blocks", type=int, nargs="+", default=list(VITDET_WINDOWED_BLOCKS))
    parser.add_argument("--num-windows", type=int, nargs="+", default=[2, 4], help="windows per side; one run each")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--output", help="write the JSON results here")
    args = parser.parse_args()

    results = []
    for n in args.num_windows:
        result = measure_windowed_vit(
            image_size=args.image_size, hidden=args.hidden, layers=args.layers, heads=args.heads,
            windowed_blocks=args.windowed_blocks, num_windows=n, batch=args.batch, iters=args.iters,
            warmup=args.warmup, threads=args.threads, device=args.device,
            attn_implementation=args.attn_implementation)
        results.append(result)
        print(format_windowed_vit(result), end="\n\n", flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
