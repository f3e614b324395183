"""A small process supervisor for the demo: child processes in their own process groups, logs in
files, and a stop that always ends every process it started (SIGTERM to the group, then SIGKILL)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cloud.errors import SupervisorError
from shared.private_broker import log_tail, wait_port

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0  # a child gets this long after SIGTERM before its group is killed
PORT_TIMEOUT_S = 20.0


@dataclass
class Child:
    """One started process: its command line, process, log file, and how to stop and restart it."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    started_at: float = field(default_factory=time.monotonic)
    stop_signal: int = signal.SIGTERM
    env: dict[str, str] = field(default_factory=dict)  # the overrides it was started with
    cwd: Path | None = None

    @property
    def pid(self) -> int:
        """The child's pid, which is also its process group id (each child leads its own session)."""
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.proc.poll() is None


class Supervisor:
    """Starts children (each the leader of a new session, so a signal reaches its whole tree)."""

    def __init__(self, log_dir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = dict(os.environ if env is None else env)
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Child:
        """Start ``argv`` as ``name`` in a new session, output appended to ``<log_dir>/<name>.log``,
        with ``env`` over the supervisor's environment."""
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        merged = {**self.env, **(env or {})}
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=merged,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            log.close()
            raise SupervisorError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        child = Child(
            name, list(argv), proc, log_path, log, stop_signal=stop_signal, env=dict(env or {}), cwd=cwd
        )
        self.children.append(child)
        logger.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return child

    def get(self, name: str) -> Child:
        """The running child called ``name`` (``KeyError`` if there is none)."""
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def dead(self) -> list[Child]:
        """Children that exited although nobody asked them to."""
        return [c for c in self.children if not c.running]

    def wait_port(self, child: Child, port: int, timeout: float = PORT_TIMEOUT_S) -> None:
        """Wait until ``child`` listens on ``port``; ``SupervisorError`` with the tail of its log if it
        exits first or ``timeout`` passes."""
        if wait_port(port, timeout=timeout, alive=lambda: child.running):
            return
        if not child.running:
            raise SupervisorError(
                f"{child.name} exited with {child.proc.returncode} before listening on {port}: "
                f"see {child.log_path}\n{tail(child.log_path)}"
            )
        raise SupervisorError(f"{child.name} does not listen on 127.0.0.1:{port} after {timeout:.0f} s")

    def stop(self, names: Sequence[str] | None = None, *, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the named children (default: all, newest first): signal, wait, then kill the group."""
        chosen = [c for c in reversed(self.children) if names is None or c.name in names]
        for child in chosen:
            self._signal(child, child.stop_signal)
        deadline = time.monotonic() + timeout
        for child in chosen:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) ignored SIGTERM for %.0f s: killing it", child.name, child.pid, timeout
                )
                self._signal(child, signal.SIGKILL)
                child.proc.wait()
            # Anything the child left in its process group goes too (no orphans).
            self._signal(child, signal.SIGKILL)
            child.log.close()
        self.children = [c for c in self.children if c not in chosen]

    def kill(self, name: str, signum: int = signal.SIGKILL) -> Child:
        """Send ``signum`` to one child's process group and forget it once it has exited (fault
        injection: ``kill -9`` an edge, stop the broker). Returns it, so that it can be started again
        with the same command line (``restart``)."""
        child = self.get(name)
        self._signal(child, signum)
        try:
            child.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal(child, signal.SIGKILL)
            child.proc.wait()
        self._signal(child, signal.SIGKILL)
        child.log.close()
        self.children = [c for c in self.children if c is not child]
        return child

    def restart(self, child: Child) -> Child:
        """Start a child again (same name, command line, environment and directory)."""
        return self.start(child.name, child.argv, env=child.env, cwd=child.cwd, stop_signal=child.stop_signal)

    @staticmethod
    def _signal(child: Child, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, or '' if it cannot be read (for error messages)."""
    return log_tail(path, lines)
