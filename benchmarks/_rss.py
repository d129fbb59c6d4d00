"""Resident-memory readings shared by the benchmark scripts (Linux ``/proc``).

The scripts run as ``python benchmarks/<name>.py`` (their folder is first on ``sys.path``), so they import this
module as ``from _rss import rss_kib, reset_peak``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["reset_peak", "rss_environment", "rss_kib"]


def rss_environment() -> dict[str, str]:
    """This process's environment, with glibc told to return every freed block above 64 KiB to the OS at once
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): a worker measuring with :func:`rss_kib` then sees its
    resident set follow the live tensors. For memory workers only; timing workers keep the default allocator."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def rss_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB, e.g. ``"VmRSS"`` (now) or ``"VmHWM"`` (high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set size (``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")
