"""Keep freed memory in the process instead of handing it back to the OS (glibc ``malloc``).

PyTorch's CPU tensors come straight from ``malloc``. With glibc's defaults, freed blocks at the top of
the heap and blocks above the (adaptive) mmap threshold go back to the operating system, so the next
forward pass allocates fresh pages and page-faults on every one of them when the first kernel writes
its output (the ``copy_`` of a linear layer's bias into a new output shows up in profiles as a slow
copy). On the 2-core VM this project is developed on, a DINOv2-S detector at 384 px takes some 13 000 -
23 000 minor page faults per inference forward (RF-DETR the same), which costs 10-20 % of the forward's
time. :func:`keep_freed_memory` sets glibc's trim threshold to 1 GiB and fixes the mmap threshold at
its maximum (32 MiB), which takes the faults to ~0 after the first iterations; the price is that the
process's resident memory stays at its peak instead of shrinking between steps (the peak itself
does not grow).

It is what ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` in the environment or a
``LD_PRELOAD``-ed jemalloc / tcmalloc do, applied from Python after start-up; if the user chose any of
those, it leaves them alone. It only affects allocations made after the call, and only on Linux with
glibc (elsewhere it does nothing). The tools (``train_net``, ``demo``, ``export_model``, ``benchmark``)
call it when ``CPU_ALLOCATOR.KEEP_FREED_MEMORY`` is on (default).
"""
import ctypes
import ctypes.util
import logging
import os
from typing import Optional

__all__ = ["apply_allocator_config", "keep_freed_memory", "allocator_settings_from_environment", "KEPT_MEMORY_ENVIRONMENT"]

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # bytes of free memory at the top of the heap kept before trimming
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)

# The same setting as environment variables, for a child process (glibc reads them at start-up).
KEPT_MEMORY_ENVIRONMENT = {"MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD), "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}

_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_GLIBC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_GLIBC_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold", "glibc.malloc.top_pad",
                   "glibc.malloc.mmap_max")
_applied: Optional[bool] = None


def allocator_settings_from_environment(environ=None) -> Optional[str]:
    """What the user already chose for ``malloc``'s trimming / mmap use through the environment (a
    string saying so), or None: ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TOP_PAD_`` / ``MALLOC_MMAP_MAX_``, the same in ``GLIBC_TUNABLES``, or an allocator in
    ``LD_PRELOAD``."""
    environ = os.environ if environ is None else environ
    tuned = sorted(k for k in _GLIBC_VARIABLES if k in environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    tuned += [t for t in _GLIBC_TUNABLES if t in tunables]
    if tuned:
        return f"glibc malloc tuned by the environment ({', '.join(tuned)})"
    preload = environ.get("LD_PRELOAD", "")
    for name in _PRELOADED_ALLOCATORS:
        if name in preload:
            return f"{name} preloaded (LD_PRELOAD={preload})"
    return None


def _glibc():
    """The C library if it is glibc (has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        libc = ctypes.CDLL(path)
        libc.gnu_get_libc_version
        libc.mallopt
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(enabled: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (module docstring); True if this process now does.

    Idempotent; with ``enabled`` False, or when the environment already chose an allocator setting
    (:func:`allocator_settings_from_environment`), or off glibc, it changes nothing and returns False.
    The first call logs what it did.
    """
    global _applied
    if not enabled:
        return False
    if _applied is not None:
        return _applied
    chosen = allocator_settings_from_environment()
    libc = None if chosen else _glibc()
    if chosen:
        logger.info("CPU_ALLOCATOR.KEEP_FREED_MEMORY: left alone, %s.", chosen)
        _applied = False
    elif libc is None:
        logger.info("CPU_ALLOCATOR.KEEP_FREED_MEMORY: not glibc; nothing to do.")
        _applied = False
    else:
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) & bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        if ok:
            logger.info("CPU_ALLOCATOR.KEEP_FREED_MEMORY: glibc malloc keeps freed memory (trim threshold 1 GiB, "
                        "mmap threshold 32 MiB); fewer page faults, resident memory stays at its peak.")
        else:
            logger.warning("CPU_ALLOCATOR.KEEP_FREED_MEMORY: glibc's mallopt refused the setting; allocator unchanged.")
        _applied = ok
    return _applied


def apply_allocator_config(cfg) -> bool:
    """:func:`keep_freed_memory` as ``cfg.CPU_ALLOCATOR.KEEP_FREED_MEMORY`` says (the tools call this
    right after building their config)."""
    return keep_freed_memory(bool(cfg.CPU_ALLOCATOR.KEEP_FREED_MEMORY))
