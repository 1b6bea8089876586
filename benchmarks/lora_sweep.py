"""LoRA sweep on the embedded demo dataset: ranks, module families, selective blocks, AdaLoRA,
full fine-tuning, with a fixed iteration budget.

Every variant starts from ``configs/Demo/detr_shapes_tiny_improved.yaml`` with the ViT *frozen*
(``MODEL.DINOV2.FREEZE True``; only the adapters adapt it; the neck and decoder always train),
except the full fine-tuning reference. For each variant it

1. trains with ``tools/train_net.py`` and reads the final COCOEvaluator AP / AP50 from
   ``metrics.json``;
2. measures seconds per training iteration and peak RSS with ``tools/benchmark.py`` (synthetic
   224x224 images, batch 8, 2 threads);
3. reports trainable parameters and the size of a trainable-only checkpoint
   (``SOLVER.CHECKPOINT_TRAINABLE_ONLY``) and of the full model state dict.

::

    python benchmarks/lora_sweep.py                     # all variants, 300 iterations each
    python benchmarks/lora_sweep.py --iters 100 --variants "r4 q,v" "full fine-tuning (no LoRA)"
    python benchmarks/lora_sweep.py --variants "r4 q,v" --output-dir output/lora_sweep_seed1 SEED 1

Writes ``output/lora_sweep/results.{md,json}``.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dinodet2.benchmarking import (bbox_metrics, checkpoint_sizes, fixed_budget_overrides,  # noqa: E402
                                   read_metrics_records, train_net_command)

CONFIG = "configs/Demo/detr_shapes_tiny_improved.yaml"
FROZEN = ["MODEL.DINOV2.FREEZE", "True"]

VARIANTS = {
    "r4 q,v": FROZEN + ["MODEL.LORA.RANK", "4", "MODEL.LORA.ALPHA", "4.0"],
    "r8 q,v": FROZEN + ["MODEL.LORA.RANK", "8", "MODEL.LORA.ALPHA", "8.0"],
    "r16 q,v": FROZEN + ["MODEL.LORA.RANK", "16", "MODEL.LORA.ALPHA", "16.0"],
    "r32 q,v": FROZEN + ["MODEL.LORA.RANK", "32", "MODEL.LORA.ALPHA", "32.0"],
    "r8 attention (q,k,v,o)": FROZEN + ["MODEL.LORA.RANK", "8", "MODEL.LORA.ALPHA", "8.0",
                                        "MODEL.LORA.TARGET_MODULES", "['query','key','value','attn_out']"],
    "r8 FFN (fc1,fc2)": FROZEN + ["MODEL.LORA.RANK", "8", "MODEL.LORA.ALPHA", "8.0",
                                  "MODEL.LORA.TARGET_MODULES", "['fc1','fc2']"],
    "r8 attention + FFN": FROZEN + ["MODEL.LORA.RANK", "8", "MODEL.LORA.ALPHA", "8.0", "MODEL.LORA.TARGET_MODULES",
                                    "['query','key','value','attn_out','fc1','fc2']"],
    "r8 q,v last half of the blocks": FROZEN + ["MODEL.LORA.RANK", "8", "MODEL.LORA.ALPHA", "8.0",
                                                "MODEL.LORA.LAST_N_LAYERS", "2"],
    "AdaLoRA 12 -> 4, attention + FFN": FROZEN + ["MODEL.LORA.ADALORA.ENABLED", "True", "MODEL.LORA.ALPHA", "4.0",
                                                  "MODEL.LORA.TARGET_MODULES",
                                                  "['query','key','value','attn_out','fc1','fc2']"],
    "no adapters, frozen ViT": FROZEN + ["MODEL.LORA.ENABLED", "False"],
    "full fine-tuning (no LoRA)": ["MODEL.DINOV2.FREEZE", "False", "MODEL.LORA.ENABLED", "False"],
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _checkpoint_bytes(config_file: Path, weights: Path) -> dict:
    """Bytes of the torch.save'd trainable-only and full model state dicts after loading ``weights``
    (the demo's DINOv2 is random-init, so its checkpoints on disk stay complete)."""
    from detectron2.modeling import build_model

    from dinodet2.config import load_dinodet2_config
    from dinodet2.engine import Dinodet2Checkpointer

    model = build_model(load_dinodet2_config(str(config_file)))
    Dinodet2Checkpointer(model).load(str(weights))
    sizes = checkpoint_sizes(model)
    return {"checkpoint_trainable_only_bytes": sizes["trainable_only"], "full_state_dict_bytes": sizes["full"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"names from {list(VARIANTS)}")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--output-dir", default="output/lora_sweep")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for every run (e.g. SEED 1)")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    out_root = REPO / args.output_dir
    results = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in args.variants:
        run_dir = out_root / _slug(name)
        overrides = VARIANTS[name]
        train = train_net_command(CONFIG, [*overrides, *fixed_budget_overrides(args.iters, run_dir), *args.opts])
        print("$", " ".join(train[1:]), flush=True)
        subprocess.run(train, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
        bench_json = run_dir / "benchmark_train.json"
        bench = [sys.executable, "tools/benchmark.py", "--config-file", CONFIG, "--mode", "train", "--image-size",
                 "224", "--batch-size", "8", "--iters", "5", "--warmup", "2", "--threads", "2", "--no-flops",
                 "--output", str(bench_json), *overrides, "SOLVER.MAX_ITER", str(args.iters)]
        subprocess.run(bench, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
        bench_result = json.loads(bench_json.read_text())
        weights = run_dir / "model_final.pth"
        results[name] = {
            **{k: bbox_metrics(read_metrics_records(run_dir)).get(k) for k in ("AP", "AP50")},
            "params_trainable": bench_result["params_trainable"],
            "params_total": bench_result["params_total"],
            **_checkpoint_bytes(run_dir / "config.yaml", weights),
            "train_s_per_iter": bench_result["median_s_per_iter"],
            "train_peak_rss_mib": bench_result["peak_memory_mib"],
            "command": " ".join(train[1:]),
        }
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "command"}), flush=True)

    lines = ["| variant | trainable params | trainable-only checkpoint | full checkpoint | s/iter | peak RSS | AP | AP50 |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params_trainable']:,} | {r['checkpoint_trainable_only_bytes'] / 2**20:.2f} MiB | "
                     f"{r['full_state_dict_bytes'] / 2**20:.2f} MiB | {r['train_s_per_iter']:.3f} | "
                     f"{r['train_peak_rss_mib']:.0f} MiB | {r['AP']:.2f} | {r['AP50']:.2f} |")
    table = "\n".join(lines)
    print(table)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.json").write_text(json.dumps(results, indent=2))
    (out_root / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
