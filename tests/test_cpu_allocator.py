"""CPU_ALLOCATOR.KEEP_FREED_MEMORY: glibc keeps freed memory, so a step's tensors stop page-faulting."""
import os
import subprocess
import sys
import textwrap

import pytest

from dinodet2.engine.cpu_allocator import KEPT_MEMORY_ENVIRONMENT, allocator_settings_from_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Four 30 MiB tensors per step. glibc's defaults either mmap each one or serve them from the heap and
# trim the 120 MiB back to the OS when they are freed (its adaptive trim threshold is at most 64 MiB),
# so every step page-faults them in again; kept, they come from the retained heap.
_FAULTS_PER_STEP = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {repo!r})
    from dinodet2.engine.cpu_allocator import keep_freed_memory
    applied = keep_freed_memory({enabled})
    def step():
        tensors = [torch.ones(30 << 18) for _ in range(4)]
        del tensors
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_step(enabled: bool, extra_env=None):
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES"))}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP.format(repo=REPO, enabled=enabled)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[-2] == "True", float(out[-1])


def _is_glibc() -> bool:
    import platform
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _is_glibc(), reason="the setting is glibc's (mallopt); elsewhere it does nothing")
def test_keeping_freed_memory_stops_the_page_faults_of_every_step():
    # ~30 000 pages of 4 KiB per step with glibc's defaults (the most of 3 tries: a rare process shows
    # none, for reasons outside it)
    runs = [_faults_per_step(False) for _ in range(3)]
    assert not any(applied for applied, _ in runs)
    assert max(faults for _, faults in runs) > 10000
    applied, kept_faults = _faults_per_step(True)
    assert applied
    assert kept_faults < 100


@pytest.mark.skipif(not _is_glibc(), reason="the setting is glibc's (mallopt); elsewhere it does nothing")
def test_an_allocator_chosen_in_the_environment_is_left_alone():
    applied, faults = _faults_per_step(True, {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert not applied
    # the same setting for a child process, through the environment: no faults either
    applied, faults = _faults_per_step(False, KEPT_MEMORY_ENVIRONMENT)
    assert faults < 100


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
