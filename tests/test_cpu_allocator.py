"""CPU_ALLOCATOR.KEEP_FREED_MEMORY: glibc keeps freed memory, so a step's tensors stop page-faulting."""
import os
import subprocess
import sys
import textwrap

import pytest

from dinodet2.engine.cpu_allocator import KEPT_MEMORY_ENVIRONMENT, allocator_settings_from_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Four 30 MiB blocks per step (malloc + memset + free through ctypes, what PyTorch's CPU allocator
# does for tensors of that size; the module is loaded from its file, so the child imports no torch).
# glibc's defaults either mmap each one or serve them from the heap and trim the 120 MiB back to the
# OS when they are freed (its adaptive trim threshold is at most 64 MiB), so every step page-faults
# them in again; kept, they come from the retained heap.
_FAULTS_PER_STEP = textwrap.dedent("""
    import ctypes, ctypes.util, importlib.util, resource
    spec = importlib.util.spec_from_file_location("cpu_allocator", {path!r})
    cpu_allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_allocator)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 30 << 20
    def faults_per_step():
        def step():
            blocks = [libc.malloc(size) for _ in range(4)]
            for block in blocks:
                ctypes.memset(block, 1, size)
            for block in blocks:
                libc.free(block)
        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    default = faults_per_step()
    applied = cpu_allocator.keep_freed_memory({enabled})
    print(default, applied, faults_per_step())
""")
_MODULE = os.path.join(REPO, "dinodet2", "engine", "cpu_allocator.py")


def _faults_per_step(enabled: bool, extra_env=None):
    """(faults per step with glibc's defaults, whether keep_freed_memory(enabled) applied, faults per
    step after it), measured in a child process with ``extra_env``."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES"))}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP.format(path=_MODULE, enabled=enabled)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[-3]), out[-2] == "True", float(out[-1])


def _is_glibc() -> bool:
    import platform
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _is_glibc(), reason="the setting is glibc's (mallopt); elsewhere it does nothing")
def test_keeping_freed_memory_stops_the_page_faults_of_every_step():
    # ~30 000 pages of 4 KiB per step with glibc's defaults; the most of up to 3 processes (a rare
    # process shows none, for reasons outside it)
    runs = []
    while len(runs) < 3 and max((r[0] for r in runs), default=0.0) <= 10000:
        runs.append(_faults_per_step(True))
    assert max(default for default, _, _ in runs) > 10000
    assert all(applied for _, applied, _ in runs)
    assert all(kept < 100 for _, _, kept in runs)
    _, applied, faults = _faults_per_step(False)  # CPU_ALLOCATOR.KEEP_FREED_MEMORY False: unchanged
    assert not applied


@pytest.mark.skipif(not _is_glibc(), reason="the setting is glibc's (mallopt); elsewhere it does nothing")
def test_an_allocator_chosen_in_the_environment_is_left_alone():
    _, applied, _ = _faults_per_step(True, {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert not applied
    # the same setting for a child process, through the environment: no faults from the start
    default, _, _ = _faults_per_step(False, KEPT_MEMORY_ENVIRONMENT)
    assert default < 100


def test_environment_settings_are_recognised():
    assert allocator_settings_from_environment({}) is None
    assert allocator_settings_from_environment({"PATH": "/bin", "LD_PRELOAD": ""}) is None
    assert allocator_settings_from_environment({"MALLOC_ARENA_MAX": "2"}) is None  # not about trimming
    assert "MALLOC_TRIM_THRESHOLD_" in allocator_settings_from_environment({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert "glibc.malloc.mmap_threshold" in allocator_settings_from_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert "jemalloc" in allocator_settings_from_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert "tcmalloc" in allocator_settings_from_environment({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})


def test_the_key_is_on_by_default_and_read_by_the_tools():
    from detectron2.config import get_cfg

    from dinodet2.config import add_dinodet2_config

    assert add_dinodet2_config(get_cfg()).CPU_ALLOCATOR.KEEP_FREED_MEMORY is True
    for tool in ("train_net.py", "demo.py", "export_model.py", "benchmark.py"):
        with open(os.path.join(REPO, "tools", tool)) as f:
            assert "apply_allocator_config(cfg)" in f.read(), tool
