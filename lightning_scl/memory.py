"""CPU training: keep freed memory in the process instead of returning it to the system at every step.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc's ``malloc`` hands large freed blocks back to the
operating system (it unmaps them, or trims the top of its heap) and tunes when it does so from what was freed
before, so whether a training loop pays for this depends on the order and sizes of its allocations. When it does,
every step unmaps megabytes of activations and faults them back in page by page (4 KiB at a time), which costs
system time on every step. Measured with ``benchmarks/step_time.py`` (batch 128, 2 threads, glibc's defaults): a
dense ResNet-20 faulted about 11,000-12,000 pages per step (32-35 ms of system time in a 327-363 ms step), a dense
LeNet-5-Caffe none, and LeNet-5-Caffe with SCL's masks about 2,800 per mask-training step, or with
``torch.nn.utils.prune``'s masks 2,900-4,300. With freed memory kept, none of them faulted.

:func:`retain_freed_memory` sets glibc's two thresholds so a training loop's freed blocks stay in the heap and are
reused. The cost: memory freed during training is not returned to the system until the process ends.
"""

from __future__ import annotations

import ctypes

__all__ = ["retain_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems
_MAX_MMAP_THRESHOLD = 32 * 2**20


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (the only ``malloc`` these thresholds exist in), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # Windows: no C library is loaded under the name None
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # macOS, musl...: other allocators, other rules
    return libc


def retain_freed_memory(mmap_threshold: int = _MAX_MMAP_THRESHOLD, trim_threshold: int = 2**30) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the system; process-wide.

    Call it once, before training on the CPU (it changes nothing on accelerators' memory). It applies to every
    thread and lasts until the process ends; it cannot be undone, since glibc has no way to read the thresholds
    back. The same effect, set before the process starts: ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=1073741824``; an allocator such as jemalloc or tcmalloc preloaded with ``LD_PRELOAD``
    avoids the problem too.

    Args:
        mmap_threshold: blocks up to this size (bytes) come from the heap, where freed ones are reused, instead of
            their own mapping, which is unmapped when freed. glibc caps it at 32 MiB on 64-bit systems.
        trim_threshold: the heap keeps up to this much free memory at its top (bytes) instead of returning it.

    Returns:
        True when both thresholds were set; False when the C library is not glibc (macOS, Windows, musl), where
        nothing was changed.

    Raises:
        ValueError: a threshold is negative, or ``mmap_threshold`` is above 32 MiB.

    Example:
        >>> from lightning_scl.memory import retain_freed_memory
        >>> retain_freed_memory()  # on Linux (glibc); False elsewhere  # doctest: +SKIP
        True
    """
    if mmap_threshold < 0 or trim_threshold < 0:
        raise ValueError(f"thresholds must be >= 0 bytes, got {mmap_threshold=} and {trim_threshold=}")
    if mmap_threshold > _MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"mmap_threshold={mmap_threshold} is above glibc's limit of {_MAX_MMAP_THRESHOLD} bytes (32 MiB on 64-bit "
            "systems); larger blocks always get a mapping of their own. Pass at most 33554432."
        )
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success, 0 on failure
    set_mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
    set_trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    return bool(set_mmap) and bool(set_trim)
