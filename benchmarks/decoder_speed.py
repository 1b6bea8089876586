"""Speed / memory / FLOPs of the decoder variants of benchmarks/decoder_convergence.py on CPU.

Runs ``tools/benchmark.py`` once per variant and mode, each in its own process (so that the peak
RSS is the variant's own), and prints / writes a Markdown table and JSON::

    python benchmarks/decoder_speed.py                        # demo variants, 224x224, batch 8
    python benchmarks/decoder_speed.py --image-size 448 --batch-size 2 --threads 2

Run it on an otherwise idle machine: each result records ``other_processes_cpu_cores``.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_convergence import VARIANTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--image-size", type=int, nargs="+", default=[224])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="output/decoder_speed")
    args = parser.parse_args()

    out_root = REPO / args.output_dir
    out_root.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.variants:
        config, overrides = VARIANTS[name]
        for mode in args.modes:
            out = out_root / f"{name}_{mode}.json"
            cmd = [sys.executable, "tools/benchmark.py", "--config-file", config, "--mode", mode,
                   "--image-size", *map(str, args.image_size), "--batch-size", str(args.batch_size),
                   "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--output", str(out), *overrides]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
            results[(name, mode)] = json.loads(out.read_text())

    lines = ["| variant | params (trainable) | GFLOPs/img | train s/iter | train img/s | train peak RSS | "
             "infer s/batch | infer img/s | infer peak RSS |", "|---|" + "--:|" * 8]
    for name in args.variants:
        tr, inf = results.get((name, "train"), {}), results.get((name, "inference"), {})
        ref = tr or inf
        cells = [f"{ref['params_total'] / 1e6:.2f} M ({ref['params_trainable'] / 1e6:.2f} M)",
                 f"{ref['gflops_per_image']:.2f}"]
        for r in (tr, inf):
            cells += ([f"{r['median_s_per_iter']:.3f}", f"{r['images_per_s']:.1f}", f"{r['peak_memory_mib']:.0f} MiB"]
                      if r else ["–"] * 3)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (out_root / "results.json").write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=2))
    (out_root / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
