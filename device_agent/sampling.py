"""Sampling on a monotonic clock, and cutting the sample stream into windows (length, hop)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from device_agent.sensors.base import Row


class SampleClock:
    """Which samples are due: sample ``i`` is taken at ``t0 + i / rate`` on the monotonic clock.

    Nothing accumulates error: a late wake-up finds more samples due and reads them in one go.
    ``epoch_of(i)`` maps a sample index to wall-clock time for window timestamps.
    """

    def __init__(self, rate_hz: float, *, now: float | None = None) -> None:
        self.rate_hz = rate_hz
        self.t0 = time.monotonic() if now is None else now
        self.epoch0 = time.time() - (time.monotonic() - self.t0)
        self.taken = 0

    def due(self, now: float | None = None) -> int:
        """How many samples are due by ``now`` and not taken yet."""
        elapsed = (time.monotonic() if now is None else now) - self.t0
        return max(0, math.floor(elapsed * self.rate_hz) + 1 - self.taken)

    def time_of(self, index: int) -> float:
        """Monotonic time of sample ``index``."""
        return self.t0 + index / self.rate_hz

    def epoch_of(self, index: int) -> float:
        """Wall-clock time of sample ``index``."""
        return self.epoch0 + index / self.rate_hz

    def skip(self, count: int) -> None:
        """Count ``count`` samples as taken without reading them (a gap)."""
        self.taken += count


class Windower:
    """Collects rows; emits a window of ``window`` rows every ``hop`` rows (hop > window skips)."""

    def __init__(self, window: int, hop: int) -> None:
        self.window = window
        self.hop = hop
        self._buf: list[Row] = []
        self._skip = 0

    def needed(self) -> int:
        """Rows still needed to complete the next window."""
        return self._skip + self.window - len(self._buf)

    def feed(self, rows: Sequence[Row]) -> list[list[Row]]:
        """Add rows; return every window they complete."""
        if self._skip:
            dropped = min(self._skip, len(rows))
            rows = rows[dropped:]
            self._skip -= dropped
        self._buf.extend(rows)
        out: list[list[Row]] = []
        while len(self._buf) >= self.window and not self._skip:
            out.append(self._buf[: self.window])
            advance = min(self.hop, len(self._buf))
            del self._buf[:advance]
            self._skip = self.hop - advance
            if self._skip and self._buf:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
        return out

    def reset(self) -> None:
        """Forget the partial window (after a gap or a settings change)."""
        self._buf.clear()
        self._skip = 0
