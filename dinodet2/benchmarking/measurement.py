"""What a model costs, measured: seconds per call, FLOPs, peak memory, checkpoint bytes, and how
busy the other processes kept the CPU meanwhile. Model-agnostic (dinodet2's models and HF's alike)."""
import io
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "BenchmarkSetupError", "CpuContentionMeter", "checkpoint_sizes", "contention_warning", "count_gflops_per_image",
    "device_name", "parameter_counts", "peak_memory_mib", "summary_stats", "tensor_peak_mib", "time_iterations",
]


class BenchmarkSetupError(ValueError):
    """Invalid benchmark request (bad mode / size / device / AMP combination)."""


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


def summary_stats(times: Sequence[float], batch_size: int) -> Dict:
    """Median / mean / min / max seconds per iteration, images per second (batch / median), every time."""
    median = statistics.median(times)
    return {
        "median_s_per_iter": median,
        "mean_s_per_iter": statistics.fmean(times),
        "min_s_per_iter": min(times),
        "max_s_per_iter": max(times),
        "images_per_s": batch_size / median,
        "times_s": list(times),
    }


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


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    """``params_total`` and ``params_trainable`` (``requires_grad``) of ``model``."""
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def checkpoint_sizes(model: torch.nn.Module) -> Dict[str, int]:
    """Bytes of the torch.save'd ``{"model": state dict}`` of the full model (``full``) and of its
    trainable parameters only (``trainable_only``, as ``SOLVER.CHECKPOINT_TRAINABLE_ONLY`` writes)."""
    from ..engine.checkpoint import trainable_state_dict

    sizes = {}
    for kind, state in (("full", model.state_dict()), ("trainable_only", trainable_state_dict(model))):
        buffer = io.BytesIO()
        torch.save({"model": state}, buffer)
        sizes[kind] = buffer.tell()
    return sizes


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


def tensor_peak_mib(step, module, inference: bool = False) -> Optional[float]:
    """Peak MiB of live tensors other than ``module``'s parameters and buffers while ``step()`` runs
    (activations, temporaries, gradients), from PyTorch's ``MemTracker``; None if it is unavailable.
    ``inference``: ``step`` runs without gradients; the parameters are marked as not requiring them
    meanwhile (the tracker's module hooks otherwise fail on views of trainable parameters). Also None
    when the tracker's module hooks reject the graph (an ``AssertionError`` inside ``MemTracker`` on some
    training graphs with torch 2.14): the caller reports "not counted" rather than a wrong number."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception:  # a torch build without torch.distributed
        return None

    class _Tracker(MemTracker):
        # MemTracker hooks every parameter's gradient to label it, which fails on frozen parameters;
        # gradients are counted without the label (only the total is read here).
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    tracker = _Tracker()
    tracker.track_external(module)
    trainable = [p for p in module.parameters() if p.requires_grad] if inference else []
    try:
        for p in trainable:
            p.requires_grad_(False)
        with tracker:
            step()
    except AssertionError:
        return None
    finally:
        for p in trainable:
            p.requires_grad_(True)
    peak = 0
    for by_kind in tracker.get_tracker_snapshot("peak").values():
        peak += sum(v for k, v in by_kind.items() if k != "Total" and getattr(k, "value", k) not in
                    ("Parameter", "Buffer"))
    return peak / 2 ** 20


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

    @property
    def rounded_other_cores(self) -> Optional[float]:
        """``other_cores`` to 3 decimals (None where /proc/stat cannot be read), as results record it."""
        return None if self.other_cores is None else round(self.other_cores, 3)


def contention_warning(r: Dict, threshold: float = 0.25) -> Optional[str]:
    """A warning when other processes used CPU cores during a CPU benchmark's timed loop."""
    other = r.get("other_processes_cpu_cores")
    if r.get("device") != "cpu" or other is None or other < threshold:
        return None
    return (f"WARNING: other processes kept {other:.2f} CPU cores busy (of {r.get('cpu_count')}) during the "
            "timed loop; these timings may be far too slow (use an idle machine or fewer --threads).")
