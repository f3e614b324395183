"""The agent's own cost (CPU fraction of one core, RSS) from /proc and ``os.times``, no psutil needed."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Final

_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process); peak RSS where there is no /proc."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        if pid is not None:
            raise
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used, in seconds."""
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU fraction of one core between successive ``sample()`` calls."""

    def __init__(self) -> None:
        self._cpu = cpu_seconds()
        self._at = time.monotonic()

    def sample(self) -> float:
        """The fraction of one core used since the previous sample."""
        cpu, at = cpu_seconds(), time.monotonic()
        wall = at - self._at
        fraction = (cpu - self._cpu) / wall if wall > 0 else 0.0
        self._cpu, self._at = cpu, at
        return max(0.0, fraction)
