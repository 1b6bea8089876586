"""Backbone forward time and peak memory of a DINOv2 with global attention vs windowed attention in
some blocks (``MODEL.DINOV2.WINDOW_BLOCK_INDEXES`` / ``NUM_WINDOWS``), on a randomly initialised ViT.

Each variant runs in its own fresh Python process (:func:`measure_windowed_vit` starts them), so that
one variant's allocations, allocator caches and peak cannot hide or inflate the other's.
"""
import json
import os
import re
import resource
import statistics
import subprocess
import sys
from typing import Dict, Optional, Sequence

from ..modeling.backbone.windowed_attention import resolve_window_blocks
from .measurement import tensor_peak_mib

__all__ = ["VITDET_WINDOWED_BLOCKS", "format_windowed_vit", "measure_windowed_vit"]

# ViTDet's choice for a 12-block ViT: global attention in blocks 2, 5, 8 and 11, windows elsewhere.
VITDET_WINDOWED_BLOCKS = (0, 1, 3, 4, 6, 7, 9, 10)
PATCH_SIZE = 14


def measure_windowed_vit(image_size: int = 896, hidden: int = 384, layers: int = 12, heads: int = 6,
                         windowed_blocks: Sequence[int] = VITDET_WINDOWED_BLOCKS, num_windows: int = 4,
                         batch: int = 1, iters: int = 5, warmup: int = 2, threads: Optional[int] = None,
                         device: str = "cpu", attn_implementation: str = "sdpa",
                         training_memory: bool = True) -> Dict:
    """Time a ``Dinov2Backbone`` forward (eval, ``no_grad``, last block's map, fp32) on a random
    ``batch x 3 x image_size x image_size`` input, with global attention everywhere and with
    ``windowed_blocks`` attending in ``num_windows x num_windows`` windows; same random weights.

    Returns ``{"config": ..., "global": ..., "windowed": ..., "speedup": global / windowed median
    seconds, "memory_ratio": windowed / global peak forward memory}``; each variant's record holds
    the median / min / max seconds per forward, every time, the other processes' CPU use during the
    timed loop (and a warning when it makes the timings unreliable) and the memory numbers.

    Peak memory is the peak *forward* memory: what the forwards needed on top of the built model.
    * CPU: resident memory (RSS), as the OS counts it. After the model and the input are built the
      process's RSS is read (``VmRSS``) and its peak-RSS mark (``VmHWM``) is reset through
      ``/proc/self/clear_refs``; after the warm-up and timed forwards, ``peak_forward_mib`` =
      ``VmHWM - that RSS``. This counts every allocation the forwards made (activations, attention
      buffers, oneDNN / OpenMP scratch, allocator slack), not only tensors. Where ``clear_refs``
      cannot be written (non-Linux, restricted containers), the fallback is the growth of
      ``getrusage(RUSAGE_SELF).ru_maxrss`` over the forwards, which reads 0 when building the model
      had a higher transient peak than the forwards; ``memory_method`` says which one was used.
    * CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the forwards
      (tensors only, not the caching allocator's reserve).
    ``peak_total_mib`` is the absolute peak (CPU: VmHWM after the reset; CUDA: max allocated). RSS also
    holds what the C allocator keeps after frees, so CPU numbers vary between runs by tens of MiB
    (two global-attention runs of the default ViT-S at 896 measured 185 and 136 MiB): read small
    ratios as "no difference".

    The RSS numbers hold allocator slack; ``tensor_peak`` holds exact, repeatable numbers: the peak bytes
    of live tensors other than the parameters (activations, temporaries, gradients), counted by PyTorch's
    ``MemTracker`` over one inference forward (``no_grad``) and one training step (``train()``, forward
    and backward of the mean of the output), ``{"inference_mib": ..., "training_mib": ...}`` (None
    where the tracker is unavailable); ``tensor_memory_ratio`` is windowed / global of each.
    ``training_memory=False`` skips the training step (with eager attention and global blocks it holds
    every block's attention matrix: about 6.7 GB for the default ViT-S at 896).

    ``attn_implementation`` is HF's attention kernel for the ViT: ``sdpa`` (default, PyTorch's fused
    attention; on CPU and GPU it does not materialise the token x token matrix) or ``eager`` (softmax
    of an explicit matrix, memory quadratic in the tokens per window).
    """
    base = dict(image_size=image_size, hidden=hidden, layers=layers, heads=heads, batch=batch, iters=iters,
                warmup=warmup, threads=threads, device=device, attn_implementation=attn_implementation,
                training_memory=training_memory)
    grid = image_size // PATCH_SIZE
    if image_size % (PATCH_SIZE * num_windows):
        raise ValueError(f"image_size {image_size} must be a multiple of {PATCH_SIZE * num_windows} "
                         f"(patch size {PATCH_SIZE} x num_windows {num_windows}).")
    windowed_blocks = sorted(resolve_window_blocks(windowed_blocks, layers))
    results = {name: _run_in_subprocess({**base, "windowed_blocks": blocks, "num_windows": num_windows})
               for name, blocks in (("global", []), ("windowed", windowed_blocks))}
    g, w = results["global"], results["windowed"]
    return {
        "config": {**base, "patch_size": PATCH_SIZE, "grid": [grid, grid], "windowed_blocks": windowed_blocks,
                   "num_windows": num_windows, "tokens_per_window": (grid // num_windows) ** 2,
                   "torch": g.get("torch"), "device_name": g.get("device_name")},
        **results,
        "speedup": g["median_s"] / w["median_s"],
        "memory_ratio": (w["peak_forward_mib"] / g["peak_forward_mib"]) if g["peak_forward_mib"] > 0 else None,
        "memory_method": g["memory_method"],
        "tensor_memory_ratio": {k: (w["tensor_peak"][k] / g["tensor_peak"][k]) if g["tensor_peak"].get(k) else None
                                for k in ("inference_mib", "training_mib")},
    }


def format_windowed_vit(result: Dict) -> str:
    """A markdown table of :func:`measure_windowed_vit`'s result (plus contention warnings)."""
    c = result["config"]
    lines = [
        f"DINOv2 {c['hidden']}-d, {c['layers']} blocks, {c['heads']} heads at {c['image_size']}x{c['image_size']} "
        f"(grid {c['grid'][0]}x{c['grid'][1]}), batch {c['batch']}, {c['device']} ({c['device_name']}), "
        f"threads {result['global']['threads']}, attention {c['attn_implementation']}, "
        f"median of {c['iters']} (warm-up {c['warmup']})",
        "",
        "| attention | windowed blocks | s / forward (median) | min / max | peak forward memory (MiB) | "
        "peak total (MiB) | tensor peak, inference (MiB) | tensor peak, training step (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("global", "windowed"):
        r = result[name]
        blocks = (f"{c['windowed_blocks']} in {c['num_windows']}x{c['num_windows']} windows "
                  f"({c['tokens_per_window']} patches each)" if name == "windowed" else "none")
        lines.append(f"| {name} | {blocks} | {r['median_s']:.3f} | {r['min_s']:.3f} / {r['max_s']:.3f} | "
                     f"{r['peak_forward_mib']:.1f} | {r['peak_total_mib']:.1f} | "
                     f"{_mib(r['tensor_peak']['inference_mib'])} | {_mib(r['tensor_peak']['training_mib'])} |")
    ratio = result["memory_ratio"]
    lines += ["", f"speedup (global / windowed): {result['speedup']:.2f}x; peak forward memory windowed / global: "
              + (f"{ratio:.2f}" if ratio is not None else "n/a") + f" ({result['memory_method']})"]
    tensor = result["tensor_memory_ratio"]
    lines += ["tensor peak windowed / global (activations, temporaries and gradients; PyTorch's MemTracker): "
              f"inference {_ratio(tensor['inference_mib'])}, training step {_ratio(tensor['training_mib'])}"]
    lines += [r["contention_warning"] for r in (result["global"], result["windowed"]) if r.get("contention_warning")]
    return "\n".join(lines)


def _mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _run_in_subprocess(spec: Dict) -> Dict:
    """One variant in a fresh interpreter (its own peak memory); its JSON record."""
    code = "import sys; from dinodet2.benchmarking.windowed_vit import _worker; _worker(sys.argv[1])"
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"windowed-ViT benchmark worker failed ({spec}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _worker(spec_json: str) -> None:
    """Build one variant, measure it, print its record as the last stdout line."""
    import gc

    import torch

    from ..modeling.backbone.dinov2 import Dinov2Backbone, load_dinov2_model
    from .measurement import CpuContentionMeter, contention_warning, device_name, time_iterations

    s = json.loads(spec_json)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    torch.manual_seed(0)
    vit = load_dinov2_model("random", random_init=True, size_kwargs=dict(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        patch_size=PATCH_SIZE, image_size=518))
    if s["attn_implementation"] != vit.config._attn_implementation:
        vit.set_attn_implementation(s["attn_implementation"])
    backbone = Dinov2Backbone(vit, out_indices=(-1,), window_block_indexes=s["windowed_blocks"],
                              num_windows=s["num_windows"]).to(device).eval()
    x = torch.randn(s["batch"], 3, s["image_size"], s["image_size"], device=device)
    gc.collect()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2 ** 20
        method = "CUDA max_memory_allocated minus memory allocated before the forwards"
    elif _reset_peak_rss():
        before = _proc_status_kib("VmRSS") / 1024
        method = "peak RSS (VmHWM, reset after the model was built) minus the RSS before the forwards"
    else:
        before = _maxrss_kib() / 1024
        method = "growth of getrusage ru_maxrss over the forwards (0 if building had a higher peak)"

    with torch.no_grad(), CpuContentionMeter() as meter:
        times = time_iterations(lambda: backbone(x), s["iters"], s["warmup"], device)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    elif method.startswith("peak RSS"):
        peak = _proc_status_kib("VmHWM") / 1024
    else:
        peak = _maxrss_kib() / 1024
    def inference_step():
        with torch.no_grad():
            backbone(x)

    def training_step():
        backbone.train()
        out = backbone(x)
        sum(v.float().mean() for v in out.values()).backward()
        backbone.eval()

    tensor_peak = {"inference_mib": tensor_peak_mib(inference_step, backbone),
                   "training_mib": tensor_peak_mib(training_step, backbone) if s["training_memory"] else None}
    record = {
        "tensor_peak": tensor_peak,
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
        "peak_forward_mib": max(0.0, peak - before), "peak_total_mib": peak, "memory_method": method,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "device_name": device_name(device),
        "device": device.type, "cpu_count": os.cpu_count(), "other_processes_cpu_cores": meter.rounded_other_cores,
    }
    record["contention_warning"] = contention_warning(record)
    print(json.dumps(record))
