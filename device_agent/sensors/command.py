"""``command``: run a program and parse samples from its stdout, one per line.

Numbers on a line are separated by whitespace and/or commas; a line must carry exactly
``channels`` numbers. Bad lines are counted, never fatal. The program runs continuously at its
own pace (the agent takes whatever arrived at each tick); if it exits, or prints nothing for
``timeout_s``, it is (re)started after ``restart_delay_s``.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import subprocess
import threading
import time
from typing import Final

from pydantic import Field, field_validator

from device_agent.errors import SensorError
from device_agent.sensors.base import Row, Sensor, SensorOptions, register_sensor

logger = logging.getLogger(__name__)

_SPLIT: Final = re.compile(r"[\s,;]+")
WATCHDOG_INTERVAL_S: Final = 0.5
STOP_GRACE_S: Final = 2.0


class CommandOptions(SensorOptions):
    """Options of the ``command`` sensor: the program to run and how to read its output."""

    argv: list[str] = Field(min_length=1, max_length=256, description="program and arguments (no shell)")
    channels: int | list[str] = Field(default=3, description="number of channels or their names")
    timeout_s: float = Field(
        default=5.0, gt=0, le=86_400, description="restart the program after this long silent"
    )
    restart_delay_s: float = Field(default=1.0, ge=0, le=3600)
    max_buffer: int = Field(
        default=100_000, ge=1, le=10_000_000, description="samples kept between reads; oldest dropped"
    )

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: int | list[str]) -> int | list[str]:
        count = value if isinstance(value, int) else len(value)
        if not 1 <= count <= 64:
            raise ValueError("1..64 channels")
        return value


@register_sensor("command")
class CommandSensor(Sensor):
    """Reads samples from a program's standard output, one line per sample; restarts it when it stops."""

    Options = CommandOptions
    self_paced = True

    def __init__(self, options: SensorOptions, *, rate_hz: float) -> None:
        super().__init__(options, rate_hz=rate_hz)
        assert isinstance(options, CommandOptions)
        self._opts = options
        ch = options.channels
        self._channels = tuple(f"c{i}" for i in range(ch)) if isinstance(ch, int) else tuple(ch)
        self._buffer: collections.deque[Row] = collections.deque(maxlen=options.max_buffer)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._last_line = time.monotonic()
        self.lines = 0
        self.bad_lines = 0
        self.overflow = 0
        self.starts = 0
        self.timeouts = 0

    @property
    def channels(self) -> tuple[str, ...]:
        """The channel names."""
        return self._channels

    def open(self) -> None:
        """Start the program and the thread that reads and supervises it."""
        self._stop.clear()
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="sensor-command", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        try:
            self._proc = subprocess.Popen(
                self._opts.argv,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as exc:
            raise SensorError(f"command sensor cannot run {self._opts.argv[0]!r}: {exc}") from exc
        self.starts += 1
        self._last_line = time.monotonic()
        reader = threading.Thread(
            target=self._read_lines, args=(self._proc,), name="sensor-stdout", daemon=True
        )
        reader.start()

    def _read_lines(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        width = len(self._channels)
        with proc.stdout:
            for line in proc.stdout:
                self._last_line = time.monotonic()
                text = line.strip()
                if not text:
                    continue
                try:
                    row = tuple(float(v) for v in _SPLIT.split(text) if v)
                except ValueError:
                    row = ()
                with self._lock:
                    self.lines += 1
                    if len(row) != width or not all(map(math.isfinite, row)):
                        self.bad_lines += 1
                        if self.bad_lines <= 10 or self.bad_lines % 1000 == 0:
                            logger.warning("command sensor: bad line %d: %.80r", self.bad_lines, text)
                        continue
                    if len(self._buffer) == self._buffer.maxlen:
                        self.overflow += 1
                    self._buffer.append(row)

    def _supervise(self) -> None:
        """Restart the program when it exits or goes silent for ``timeout_s``."""
        while not self._stop.wait(WATCHDOG_INTERVAL_S):
            proc = self._proc
            if proc is None:
                continue
            silent = time.monotonic() - self._last_line
            if proc.poll() is None and silent < self._opts.timeout_s:
                continue
            if proc.poll() is None:
                self.timeouts += 1
                logger.warning(
                    "command sensor: no output for %.1f s; restarting %s", silent, self._opts.argv[0]
                )
            else:
                logger.warning(
                    "command sensor: %s exited with %s; restarting", self._opts.argv[0], proc.returncode
                )
            self._terminate(proc)
            if self._stop.wait(self._opts.restart_delay_s):
                return
            try:
                self._spawn()
            except SensorError:
                logger.exception("command sensor: restart failed")
                self._last_line = time.monotonic()

    @staticmethod
    def _terminate(proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def read(self, n_samples: int) -> list[Row]:
        """Up to ``n_samples`` rows received since the last read (fewer when the program is slower)."""
        with self._lock:
            count = min(n_samples, len(self._buffer))
            return [self._buffer.popleft() for _ in range(count)]

    def close(self) -> None:
        """Stop the program and its reader thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S + WATCHDOG_INTERVAL_S + 1)
            self._thread = None
        if self._proc is not None:
            self._terminate(self._proc)
            self._proc = None

    def stats(self) -> dict[str, int]:
        """Counts of lines read, bad lines and restarts."""
        with self._lock:
            return {
                "lines": self.lines,
                "bad_lines": self.bad_lines,
                "overflow": self.overflow,
                "starts": self.starts,
                "timeouts": self.timeouts,
            }
