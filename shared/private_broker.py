"""A private mosquitto, or redis-server, on a free loopback port, for benchmarks, tests and the demo.

One generated config (``set_tcp_nodelay true``: without it QoS1 round trips sit at 44-88 ms on
loopback; a listener on 127.0.0.1 only; anonymous clients), a log file next to it, and a clear
``BrokerError`` (binary, port, the log's last lines) when mosquitto is missing or does not come up.

- ``PrivateMosquitto``: start / stop (SIGTERM: mosquitto writes its persistence file on the way
  out) / kill / ``restart`` on the same port and persistence directory; a context manager.
- ``write_config``: the same config for a caller that runs the process itself (the demo's
  supervisor starts, kills and restarts mosquitto like any other child).
- ``PrivateRedis``: a throwaway redis-server (no RDB, no AOF) for Celery's broker and results; a
  context manager. ``redis_argv`` is its command line for a caller that runs the process itself.
- ``free_port``, ``port_open``, ``wait_port``: the loopback-port helpers every launcher needs.

Standard library only: ``shared`` is installed on devices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from shared.errors import BrokerError

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 10.0
LOG_TAIL_LINES: Final = 20
CONFIG_NAME: Final = "mosquitto.conf"
LOG_NAME: Final = "mosquitto.log"
# Where Debian and source installs put the binary when /usr/sbin is not on PATH (non-root shells).
_BINARY_PLACES: Final = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_REDIS_PLACES: Final = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
REDIS_LOG_NAME: Final = "redis.log"
_POLL_S: Final = 0.02


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_port(
    port: int,
    *,
    host: str = LOOPBACK,
    timeout: float = START_TIMEOUT_S,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Poll until ``host:port`` accepts connections; ``False`` on timeout or once ``alive()`` is false."""
    deadline = time.monotonic() + timeout
    while True:
        if port_open(port, host):
            return True
        if (alive is not None and not alive()) or time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable (PATH first, then the usual sbin places), or ``None``."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _BINARY_PLACES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def redis_binary() -> str | None:
    """Path of the redis-server executable (PATH first, then /usr/bin and /usr/local/bin), or ``None``."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in _REDIS_PLACES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def terminate(
    proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S, *, name: str = "mosquitto"
) -> None:
    """SIGTERM a broker (mosquitto saves its persistence file on the way out), SIGKILL if it ignores
    it for ``timeout`` seconds; a process that has exited already is left alone."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("%s (pid %d) ignored SIGTERM for %g s: killing it", name, proc.pid, timeout)
        proc.kill()
        proc.wait()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ("" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class MosquittoOptions:
    """The tunable part of a private mosquitto's config; ``None`` keeps mosquitto's default."""

    persistence: bool = False  # sessions and retained messages kept in the workdir across restarts
    autosave_interval_s: int = 1  # with persistence: how often the in-memory state is saved
    max_inflight_messages: int | None = None  # per client, QoS1 messages sent but not PUBACKed; 0 = no limit
    max_queued_messages: int | None = None  # per client, beyond those in flight; 0 = no limit
    max_queued_bytes: int | None = None  # per client; 0 = no limit
    max_connections: int | None = None  # clients at once; -1 = no limit (also mosquitto's default)
    sys_interval_s: int | None = None  # how often $SYS/broker/... is published; 0 = never
    log_types: tuple[str, ...] = ("error", "warning")
    extra_conf: str = ""  # appended verbatim: bridges, more listeners, plugins


# Benchmarks: nothing kept across restarts, mosquitto's limits.
EPHEMERAL: Final = MosquittoOptions()
# Tests and the demo: sessions and queued messages survive a restart; edges PUBACK only after
# deciding, so nothing caps the messages in flight, and persistent sessions of absent subscribers
# queue whatever arrives meanwhile.
DURABLE: Final = MosquittoOptions(
    persistence=True, max_inflight_messages=0, max_queued_messages=1_000_000, max_queued_bytes=0
)


def render_config(options: MosquittoOptions, *, port: int, workdir: Path, host: str = LOOPBACK) -> str:
    """The text of a private mosquitto's config file."""
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        f"persistence {'true' if options.persistence else 'false'}",
    ]
    if options.persistence:
        lines += [f"persistence_location {workdir}/", f"autosave_interval {options.autosave_interval_s}"]
    for key in ("max_inflight_messages", "max_queued_messages", "max_queued_bytes", "max_connections"):
        value = getattr(options, key)
        if value is not None:
            lines.append(f"{key} {value}")
    if options.sys_interval_s is not None:
        lines.append(f"sys_interval {options.sys_interval_s}")
    lines += [f"log_type {kind}" for kind in options.log_types]
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to user "mosquitto", which cannot read or write a private
        # (0700) workdir: the persistence file would silently never be saved, password / ACL files
        # given in extra_conf could not be read.
        lines.append("user root")
    text = "\n".join(lines) + "\n"
    if options.extra_conf:
        text += options.extra_conf if options.extra_conf.endswith("\n") else options.extra_conf + "\n"
    return text


def write_config(
    workdir: Path, port: int, options: MosquittoOptions = EPHEMERAL, *, host: str = LOOPBACK
) -> Path:
    """Write ``workdir/mosquitto.conf`` (creating ``workdir``) and return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_NAME
    path.write_text(render_config(options, port=port, workdir=workdir.resolve(), host=host))
    return path


class _ChildServer:
    """What the private servers share: a child process on a (free) loopback port, its work directory,
    SIGTERM-then-SIGKILL on ``stop()``, usable as a context manager."""

    server_name = "server"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        binary: str | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port(host)
        self.host = host
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers; ``BrokerError`` otherwise."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop cleanly (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``); a no-op when not running."""
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, name=self.server_name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class PrivateMosquitto(_ChildServer):
    """A mosquitto child process on a generated config; ``restart()`` keeps its port and its state.

    ``with PrivateMosquitto(workdir) as broker: ... broker.url ...`` or ``start()`` / ``stop()``.
    Its output goes to ``workdir/mosquitto.log`` (appended across restarts).
    """

    server_name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        options: MosquittoOptions = EPHEMERAL,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        binary: str | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(workdir, port=port, host=host, binary=binary, start_timeout_s=start_timeout_s)
        self.options = options

    @property
    def url(self) -> str:
        """The ``mqtt://host:port`` URL clients connect to."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where mosquitto's output goes."""
        return self.workdir / LOG_NAME

    @property
    def conf_path(self) -> Path:
        """The generated config file."""
        return self.workdir / CONFIG_NAME

    def start(self) -> None:
        """Write the config, start mosquitto and wait until it listens; ``BrokerError`` otherwise."""
        if self.running:
            return
        binary = self.binary or mosquitto_binary()
        if binary is None:
            raise BrokerError(
                "mosquitto is not installed (not on PATH, not in /usr/sbin or /usr/local/sbin): "
                "install it, e.g. apt-get install mosquitto"
            )
        conf = write_config(self.workdir, self.port, self.options, host=self.host)
        try:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        except OSError as exc:
            raise BrokerError(f"cannot run {binary}: {exc}") from exc
        proc = self.proc

        def alive() -> bool:
            return proc.poll() is None

        # Both checks: a port another process took meanwhile answers too, but our mosquitto exits.
        if wait_port(self.port, host=self.host, timeout=self.start_timeout_s, alive=alive) and alive():
            logger.debug("mosquitto (pid %d) listens on %s:%d", proc.pid, self.host, self.port)
            return
        if proc.poll() is None:
            self.kill()
            problem = f"did not listen on {self.host}:{self.port} within {self.start_timeout_s:g} s"
        else:
            problem = f"exited with code {proc.returncode} before listening on {self.host}:{self.port}"
            self.proc = None
        raise BrokerError(f"mosquitto ({binary}) {problem}; {self.log_path}:\n{log_tail(self.log_path)}")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (nothing saved since the last autosave)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop cleanly, stay down ``down_for`` seconds, start again on the same port and config."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start()


# -- redis-server ----------------------------------------------------------------------------------


def redis_argv(
    binary: str, *, port: int, workdir: Path, host: str = LOOPBACK, logfile: Path | None = None
) -> list[str]:
    """The command line of a throwaway redis-server: ``host:port`` only, nothing saved (no RDB
    snapshots, no AOF), ``workdir`` as its directory; its log to ``logfile`` (default: stdout)."""
    argv = [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir)]
    if logfile is not None:
        argv += ["--logfile", str(logfile)]
    return argv


def redis_ping(port: int, *, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether a redis server answers PING on ``host:port`` (RESP over a plain socket)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis(_ChildServer):
    """A redis-server child process on a free loopback port, nothing persisted: Celery's broker and
    result backend for a benchmark, a test session or a demo run.

    ``with PrivateRedis(workdir) as redis: ... redis.url ...`` or ``start()`` / ``stop()``. Its log
    goes to ``workdir/redis.log``; a missing binary or a server that does not come up raises
    ``BrokerError`` (with the log's last lines).
    """

    server_name = "redis-server"

    @property
    def url(self) -> str:
        """The ``redis://host:port/0`` URL clients connect to."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """Where redis-server writes its log."""
        return self.workdir / REDIS_LOG_NAME

    def start(self) -> None:
        """Start redis-server and wait until it listens; ``BrokerError`` otherwise."""
        if self.running:
            return
        binary = self.binary or redis_binary()
        if binary is None:
            raise BrokerError(
                "redis-server is not installed (not on PATH, not in /usr/bin or /usr/local/bin): "
                "install it, e.g. apt-get install redis-server"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = redis_argv(
            binary,
            port=self.port,
            workdir=self.workdir.resolve(),
            host=self.host,
            logfile=self.log_path.resolve(),
        )
        try:
            self.proc = subprocess.Popen(argv)
        except OSError as exc:
            raise BrokerError(f"cannot run {binary}: {exc}") from exc
        proc = self.proc
        # PONG, not just an open port: another process may hold the port (then our server exits).
        deadline = time.monotonic() + self.start_timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            if redis_ping(self.port, host=self.host):
                logger.debug("redis-server (pid %d) answers on %s:%d", proc.pid, self.host, self.port)
                return
            time.sleep(_POLL_S)
        if proc.poll() is None:
            self.stop()
            problem = f"did not listen on {self.host}:{self.port} within {self.start_timeout_s:g} s"
        else:
            problem = f"exited with code {proc.returncode} before listening on {self.host}:{self.port}"
            self.proc = None
        raise BrokerError(f"redis-server ({binary}) {problem}; {self.log_path}:\n{log_tail(self.log_path)}")
