"""Eager vs ``torch.compile`` (``MODEL.COMPILE``) speed of a dinodet2 config on a synthetic batch:
training seconds per iteration and inference images per second, the first call (where compilation
happens) timed apart, and what compiling produced (graphs, graph breaks, eager fallbacks).

Both variants start from the same weights (one model, copied before either runs) and are timed by
:func:`~.model_benchmark.run_benchmark` on its fixed-seed batch: per mode first a single call without
warm-up (``first_call_s``: compilation + the call), then ``warmup`` + ``iters`` iterations. Train runs
before inference, so inference compiles anew (``eval()`` makes new graphs).

Example::

    from dinodet2.benchmarking.compile_speed import measure_compile
    from dinodet2.config import load_dinodet2_config

    cfg = load_dinodet2_config("configs/Demo/detr_shapes_tiny_improved.yaml", ["MODEL.DEVICE", "cpu"])
    result = measure_compile(cfg, batch_size=2, iters=5, warmup=2, image_size=224)
"""
import copy
from typing import Dict, Sequence, Union

import torch

from .measurement import BenchmarkSetupError
from .model_benchmark import DEFAULT_SEED, parse_image_size, run_benchmark, seed_everything

__all__ = ["format_compile_summary", "measure_compile"]

_KEPT = ("median_s_per_iter", "mean_s_per_iter", "min_s_per_iter", "max_s_per_iter", "images_per_s", "times_s",
         "other_processes_cpu_cores")


def _compiled_cfg(cfg, enabled: bool):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.COMPILE.ENABLED = enabled
    cfg.freeze()
    return cfg


def _time_variant(cfg, model, modes, image_size, batch_size, iters, warmup, seed) -> Dict:
    out = {}
    for mode in modes:
        first = run_benchmark(cfg, mode, image_size, batch_size, iters=1, warmup=0, seed=seed, count_flops=False,
                              model=model)
        steady = run_benchmark(cfg, mode, image_size, batch_size, iters, warmup, seed=seed, count_flops=False,
                               model=model)
        out[mode] = {"first_call_s": first["median_s_per_iter"], **{k: steady[k] for k in _KEPT}}
    return out


def measure_compile(cfg, batch_size: int, iters: int, warmup: int, *,
                    image_size: Union[int, Sequence[int]] = 224, modes: Sequence[str] = ("train", "inference"),
                    seed: int = DEFAULT_SEED) -> Dict:
    """Eager vs compiled (``cfg.MODEL.COMPILE``'s backend / mode / dynamic / modules, switched on here)
    train s/iter and inference images/s of ``cfg``'s model; a JSON-able dict (see the module docstring).

    Per mode: ``eager`` and ``compiled`` timings (``first_call_s``, ``median_s_per_iter``,
    ``images_per_s``, ...), ``speedup`` (eager median / compiled median) and ``compile_s`` (compiled
    first call minus its median: about what compiling cost). ``compile_report``: graphs, graph breaks
    and their reasons per compiled module, and whether one fell back to eager."""
    from detectron2.modeling import build_model

    from ..engine.compilation import compile_model, compile_report

    modes = tuple(modes)
    if not modes or any(m not in ("train", "inference") for m in modes):
        raise BenchmarkSetupError(f"modes must be 'train' and/or 'inference', got {list(modes)}.")
    h, w = parse_image_size(image_size)
    eager_cfg, compiled_cfg = _compiled_cfg(cfg, False), _compiled_cfg(cfg, True)
    seed_everything(seed)
    eager = build_model(eager_cfg)
    compiled = compile_model(compiled_cfg, copy.deepcopy(eager))
    timings = {"eager": _time_variant(eager_cfg, eager, modes, (h, w), batch_size, iters, warmup, seed),
               "compiled": _time_variant(compiled_cfg, compiled, modes, (h, w), batch_size, iters, warmup, seed)}
    report = compile_report(compiled)
    c = cfg.MODEL.COMPILE
    result = {"image_size": [h, w], "batch_size": batch_size, "iters": iters, "warmup": warmup, "seed": seed,
              "backend": c.BACKEND, "mode": c.MODE, "dynamic": c.DYNAMIC, "modules": list(c.MODULES)}
    for mode in modes:
        e, k = timings["eager"][mode], timings["compiled"][mode]
        result[mode] = {"eager": e, "compiled": k, "speedup": e["median_s_per_iter"] / k["median_s_per_iter"],
                        "compile_s": k["first_call_s"] - k["median_s_per_iter"]}
    result.update({"graphs": report.totals()["graphs"], "graph_breaks": report.totals()["graph_breaks"],
                   "compile_report": report.as_dict(), "device": str(cfg.MODEL.DEVICE),
                   "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__})
    return result


def format_compile_summary(r: Dict) -> str:
    """A few human-readable lines of a :func:`measure_compile` result."""
    lines = [f"torch.compile backend={r['backend']} mode={r['mode']} dynamic={r['dynamic']} modules={r['modules']}  "
             f"image={r['image_size'][0]}x{r['image_size'][1]} batch={r['batch_size']} iters={r['iters']} "
             f"(+{r['warmup']} warm-up)"]
    for mode in ("train", "inference"):
        if mode not in r:
            continue
        m = r[mode]
        e, k = m["eager"], m["compiled"]
        lines.append(f"  {mode:9s} eager {e['median_s_per_iter']:.4f} s/iter ({e['images_per_s']:.2f} img/s), "
                     f"compiled {k['median_s_per_iter']:.4f} s/iter ({k['images_per_s']:.2f} img/s): "
                     f"x{m['speedup']:.2f}; first call {e['first_call_s']:.2f} s eager, {k['first_call_s']:.2f} s "
                     f"compiled (compile ~{m['compile_s']:.1f} s); other processes' CPU cores: "
                     f"{e['other_processes_cpu_cores']} / {k['other_processes_cpu_cores']}")
    report = r["compile_report"]
    lines.append(f"  {r['graphs']} graphs, {r['graph_breaks']} graph breaks, "
                 f"{report['eager_fallbacks']} eager fallbacks")
    for name, module in report["modules"].items():
        for reason, count in module["graph_break_reasons"].items():
            lines.append(f"    {name}: {count} x {reason}")
        if module["eager_fallback"]:
            lines.append(f"    {name}: runs eagerly ({module['eager_fallback']})")
    return "\n".join(lines)
