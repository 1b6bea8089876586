"""Training signals on the hard embedded dataset: the improved recipe alone and with EMA, knowledge
distillation, token alignment and their combinations, at a fixed iteration budget and over several
seeds (``tools/train_net.py`` runs, one after the other), as in the README's table:

    python benchmarks/training_signals.py --iters 300 --seeds 1 2 --reuse --speed \
        --variants "improved recipe" "+ EMA" "+ distillation" "+ token alignment" \
        "+ distillation + token alignment" --output output/training_signals/result.json SOLVER.IMS_PER_BATCH 4

Runs of different seeds can run side by side (one invocation per ``--seeds`` value, each with
``OMP_NUM_THREADS=1``, then the command above with ``--reuse`` collects them); their logged s/iter
then reflect the sharing, and ``--speed`` (or ``--speed-only``) times one step of every variant alone.

1. The teacher, a larger model (the same config with ``TEACHER_OVERRIDES``: a 6-block 192-d
   DINOv2 and 6 decoder layers), is trained first for ``--teacher-iters`` (its own AP is reported),
   unless ``--teacher-weights`` names one already trained.
2. Its LoRA-merged ViT is written as a Hugging Face DINOv2 (``save_pretrained``): the frozen model that
   token alignment aligns to (``MODEL.TOKEN_ALIGNMENT.TEACHER``). The demo's own ViT is randomly
   initialised, so aligning to its frozen copy would teach nothing; a ViT trained on this data stands in
   for a pretrained DINOv2.
3. Every variant x seed trains ``--iters`` iterations and is evaluated on ``shapes_hard_val``:
   AP, AP50, AP75, APs (COCOEvaluator), median s/iter and the run's peak resident memory.

Timings are only comparable on an otherwise idle machine; each row records how long it took.
"""
import argparse
import copy
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)

from dinodet2.benchmarking.training_runs import fixed_budget_run, mean_over_seeds, write_json  # noqa: E402

HARD_CONFIG = os.path.join(_REPO_ROOT, "configs", "Demo", "detr_shapes_hard_improved.yaml")
# The teacher: the same recipe and pyramid (feature distillation pairs levels of equal stride) with a
# larger ViT and more decoder layers.
TEACHER_OVERRIDES = ["MODEL.DINOV2.HIDDEN_SIZE", "192", "MODEL.DINOV2.NUM_LAYERS", "6", "MODEL.DINOV2.NUM_HEADS", "6",
                     "MODEL.DETR.DEC_LAYERS", "6"]


def variants(teacher_config: str, teacher_weights: str, teacher_opts: Sequence[str], teacher_vit: str,
             iters: int) -> Dict[str, List[str]]:
    """Name -> config overrides of every variant measured."""
    ema = ["SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.998", "SOLVER.EMA.TAU", str(float(max(iters // 10, 1)))]
    distill = ["MODEL.DISTILL.ENABLED", "True", "MODEL.DISTILL.TEACHER_CONFIG", teacher_config,
               "MODEL.DISTILL.TEACHER_WEIGHTS", teacher_weights, "MODEL.DISTILL.TEACHER_OPTS",
               json.dumps(list(teacher_opts))]
    align = ["MODEL.TOKEN_ALIGNMENT.ENABLED", "True", "MODEL.TOKEN_ALIGNMENT.TEACHER", teacher_vit]
    return {
        "improved recipe": [],
        "+ EMA": ema,
        "+ distillation": distill,
        "+ token alignment": align,
        "+ distillation + token alignment": distill + align,
        "+ EMA + distillation": ema + distill,
        "+ EMA + distillation + token alignment": ema + distill + align,
    }


def train(config: str, overrides: Sequence[str], out: str, iters: int, seed: int, reuse: bool = False) -> Dict:
    return fixed_budget_run(config, overrides, out, iters, seed, cwd=_REPO_ROOT, reuse=reuse, label="training_signals")


def export_teacher_vit(config: str, overrides: Sequence[str], weights: str, folder: str) -> str:
    """The teacher's ViT, LoRA merged, as a Hugging Face DINOv2 directory (``save_pretrained``)."""
    from detectron2.modeling import build_model

    from dinodet2.config import load_dinodet2_config
    from dinodet2.engine.checkpoint import Dinodet2Checkpointer
    from dinodet2.modeling.backbone.lora import merge_lora_
    from dinodet2.modeling.training_signals import find_dinov2_backbone

    cfg = load_dinodet2_config(config, [*overrides, "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    Dinodet2Checkpointer(model).load(weights)
    merge_lora_(model)
    vit = copy.deepcopy(find_dinov2_backbone(model.backbone).vit)
    vit.config.num_hidden_layers = len(vit.encoder.layer)  # the backbone keeps the blocks up to its last output
    vit.config.drop_path_rate = 0.0
    vit.save_pretrained(folder)
    return folder


def measure_speed(config: str, table: Dict[str, List[str]], opts: Sequence[str], image_size: Sequence[int],
                  batch: int, iters: int, warmup: int) -> Dict[str, Dict]:
    """Training-step time and peak memory of every variant on one synthetic batch
    (``dinodet2.benchmarking.run_benchmark``), in this process: comparable only on an idle machine."""
    from dinodet2.benchmarking import run_benchmark
    from dinodet2.config import load_dinodet2_config

    speed = {}
    for name, overrides in table.items():
        cfg = load_dinodet2_config(config, [*overrides, *opts, "MODEL.DEVICE", "cpu"])
        print(f"[training_signals] speed: {name} ...", file=sys.stderr, flush=True)
        r = run_benchmark(cfg, "train", list(image_size), batch, iters, warmup, count_flops=False)
        speed[name] = {"s_per_iter": r["median_s_per_iter"], "other_processes_cpu_cores": r["other_processes_cpu_cores"]}
    return speed


def format_markdown(result: Dict) -> str:
    t = result["teacher"]
    lines = [f"Teacher ({' '.join(TEACHER_OVERRIDES)}, {t['iters']} iterations, seed {t['seed']}): AP {_f(t.get('AP'))}, "
             f"AP50 {_f(t.get('AP50'))}, APs {_f(t.get('APs'))}, {_f(t.get('s_per_iter'), 3)} s/iter", "",
             f"{result['iters']} iterations per run, seeds {result['seeds']} (mean; per seed in brackets):", "",
             "| variant | AP | AP50 | AP75 | APs | s/iter | peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in result.get("summary", []):
        per = "/".join(_f(v) for v in r["AP_per_seed"])
        lines.append(f"| {r['variant']} | {_f(r['AP'])} ({per}) | {_f(r['AP50'])} | {_f(r['AP75'])} | {_f(r['APs'])} | "
                     f"{_f(r['s_per_iter'], 3)} | {_f(r['peak_rss_mib'], 0)} |")
    if result.get("speed"):
        # (memory: the runs' own peak RSS above; one process times every variant here, so its RSS peak
        # only grows from row to row)
        lines += ["", "One training step on a synthetic batch (idle machine, median):", "",
                  "| variant | s/iter |", "|---|---|"]
        for name, r in result["speed"].items():
            lines.append(f"| {name} | {r['s_per_iter']:.3f} |")
    return "\n".join(lines)


def _f(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=HARD_CONFIG)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--teacher-iters", type=int, default=None, help="default: 2 x --iters")
    p.add_argument("--teacher-weights", default=None, help="a teacher already trained (skips its training)")
    p.add_argument("--variants", nargs="+", default=None, help="names of the variants to run (default: all)")
    p.add_argument("--work-dir", default=os.path.join(_REPO_ROOT, "output", "training_signals"))
    p.add_argument("--output", default=None, metavar="JSON")
    p.add_argument("--speed", action="store_true",
                   help="also time one training step of every variant on a synthetic batch (idle machine)")
    p.add_argument("--speed-only", action="store_true",
                   help="only --speed (no training runs; the teacher is still read or trained)")
    p.add_argument("--speed-image-size", type=int, nargs=2, default=[352, 480])
    p.add_argument("--speed-iters", type=int, default=5)
    p.add_argument("--reuse", action="store_true", help="read runs already finished in --work-dir instead of "
                                                         "running them again (to complete an interrupted measurement)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run, the teacher's included")
    args = p.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    config = os.path.abspath(args.config)

    teacher_iters = args.teacher_iters or 2 * args.iters
    teacher_out = os.path.join(args.work_dir, "teacher")
    teacher = {"iters": teacher_iters, "seed": args.seeds[0]}
    if args.teacher_weights:
        teacher_weights = os.path.abspath(args.teacher_weights)
    else:
        teacher.update(train(config, [*TEACHER_OVERRIDES, *args.opts], teacher_out, teacher_iters, args.seeds[0],
                             args.reuse))
        teacher_weights = os.path.join(teacher_out, "model_final.pth")
    teacher_vit = export_teacher_vit(config, [*TEACHER_OVERRIDES, *args.opts], teacher_weights,
                                     os.path.join(args.work_dir, "teacher_vit"))
    table = variants(config, teacher_weights, [*TEACHER_OVERRIDES, *args.opts], teacher_vit, args.iters)
    names = args.variants or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"error: unknown variants {unknown}; choose from {list(table)}")
    result = {"command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "iters": args.iters, "seeds": args.seeds,
              "opts": args.opts,
              "teacher": teacher, "rows": []}
    args.speed = args.speed or args.speed_only
    for seed in ([] if args.speed_only else args.seeds):
        for name in names:
            out = os.path.join(args.work_dir, f"seed{seed}_" + "".join(c if c.isalnum() else "_" for c in name))
            row = {"variant": name, "seed": seed, "overrides": table[name],
                   **train(config, [*table[name], *args.opts], out, args.iters, seed, args.reuse)}
            result["rows"].append(row)
            print(f"[training_signals] {name} seed {seed}: AP {_f(row.get('AP'))} s/iter {_f(row['s_per_iter'], 3)}",
                  file=sys.stderr, flush=True)
            result["summary"] = mean_over_seeds(result["rows"])
            if args.output:
                write_json(args.output, result)
    if args.speed:
        batch = int(dict(zip(args.opts[::2], args.opts[1::2])).get("SOLVER.IMS_PER_BATCH", 8))
        result["speed"] = measure_speed(config, {n: table[n] for n in names}, args.opts, args.speed_image_size, batch,
                                        args.speed_iters, warmup=2)
        if args.output:
            write_json(args.output, result)
    print(format_markdown(result))
    return result


if __name__ == "__main__":
    main()
