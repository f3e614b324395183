"""``edgefleet broker run``: mosquitto as a child process, its users and ACLs kept equal to the registry.

``BrokerRunner.start()`` generates the broker's internal secrets (claim handler, health check) into the
data dir, renders the password and ACL files from the registry and ``mosquitto.conf`` (all 0600),
starts mosquitto, waits until every listener accepts connections, then starts the sync loop
(``cloud.broker.sync``: SIGHUP on every change) and the claim handler (``claim_bridge``).
``wait()`` returns when asked to stop or when mosquitto exits; ``stop()`` stops everything
(SIGTERM: mosquitto saves its persistence file on the way out).

mosquitto's output goes to ``<data dir>/mosquitto.log`` (and to stderr with ``echo``); the last lines
are kept for the error raised when it does not come up or dies.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Final

from pydantic import SecretStr

from cloud.broker.claim_bridge import ClaimBridge, ClaimHandler, registry_claim_handler
from cloud.broker.config import (
    CLAIMS_USER,
    CONFIG_NAME,
    HEALTH_USER,
    SYNC_USER,
    BrokerLayout,
    InternalUsers,
    render_config,
)
from cloud.broker.sync import INTERNAL_HASH_ITERATIONS, RELOAD_CONFIRM_S, AuthSync, write_private
from shared.errors import BrokerError
from shared.identity import broker_hash, new_secret
from shared.mqtt_packets import DISCONNECT, connack_accepted, connect_packet, read_connack
from shared.mqtt_packets import packet as mqtt_packet
from shared.private_broker import mosquitto_binary, terminate, wait_port
from shared.settings.base import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import Topics

logger = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 10.0
LOG_NAME: Final = "mosquitto.log"
CLAIMS_SECRET_NAME: Final = "claims.secret"  # noqa: S105  (a file name)
HEALTH_SECRET_NAME: Final = "health.secret"  # noqa: S105  (a file name)
LOG_TAIL_LINES: Final = 30
RELOAD_PROBE_PAUSE_S: Final = 0.02
PROBE_TIMEOUT_S: Final = 2.0
_USE_REGISTRY: Final = object()


class BrokerRunner:
    """One ``broker run``: mosquitto, the auth sync loop and the claim handler."""

    def __init__(
        self,
        *,
        settings: CloudSettings,
        database_url: str,
        layout: BrokerLayout,
        binary: str | None = None,
        claim_handler: ClaimHandler | object | None = _USE_REGISTRY,
        echo: bool = False,
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.layout = layout
        self.topics = Topics(settings.broker.topic_prefix)
        self.binary = binary
        self.echo = echo
        self._claim_handler = claim_handler
        self.proc: subprocess.Popen[bytes] | None = None
        self.sync: AuthSync | None = None
        self.claims: ClaimBridge | None = None
        self.claims_secret = ""
        self.health_secret = ""
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._log_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def data_dir(self) -> Path:
        """Where the config, the auth files, the secrets, the log and the persistence file go."""
        return self.layout.data_dir

    @property
    def log_path(self) -> Path:
        """mosquitto's output."""
        return self.data_dir / LOG_NAME

    @property
    def running(self) -> bool:
        """Whether mosquitto is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def applied_revision(self) -> int:
        """The registry auth revision the broker's files reflect (-1 before the first sync)."""
        return self.sync.applied_revision if self.sync is not None else -1

    def log_tail(self) -> str:
        """mosquitto's last lines of output."""
        return "\n".join(self._tail)

    # -- start --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Write every file, start mosquitto, the sync loop and the claim handler; ``BrokerError``
        (with mosquitto's last lines) when mosquitto is missing or does not listen."""
        binary = self.binary or mosquitto_binary()
        if binary is None:
            raise BrokerError(
                "mosquitto is not installed (not on PATH, not in /usr/sbin or /usr/local/sbin): "
                "install it, e.g. apt-get install mosquitto"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.claims_secret = new_secret()
        self.health_secret = new_secret()
        write_private(self.data_dir / CLAIMS_SECRET_NAME, self.claims_secret + "\n")
        write_private(self.data_dir / HEALTH_SECRET_NAME, self.health_secret + "\n")
        internal = InternalUsers(
            claims_hash=broker_hash(self.claims_secret, iterations=INTERNAL_HASH_ITERATIONS),
            health_hash=broker_hash(self.health_secret, iterations=INTERNAL_HASH_ITERATIONS),
        )
        self.sync = AuthSync(
            database_url=self.database_url,
            layout=self.layout,
            topics=self.topics,
            internal=internal,
            reload=self.reload,
            lock=self._lock,
            confirm=self.confirm_reload,
        )
        self.sync.sync_once(force=True)
        conf = self.data_dir / CONFIG_NAME
        write_private(conf, render_config(self.layout))
        self._start_mosquitto(binary, conf)
        try:
            self._start_rest()
        except BaseException:
            self.stop()
            raise
        listeners = ", ".join(
            f"{name} {self.layout.host}:{self.layout.port_of(name)}" for name in self.layout.listeners
        )
        logger.info(
            "broker running (mosquitto pid %d; %s; TLS %s; auth revision %d)",
            self.proc.pid if self.proc else -1,
            listeners,
            "on" if self.layout.tls else "off",
            self.applied_revision,
        )

    def _start_rest(self) -> None:
        """Once mosquitto listens: the sync loop and the claim handler."""
        assert self.sync is not None
        self.sync.broker_started()
        self.sync.sync_once()  # a change between the first render and mosquitto's start
        self.sync.start()
        handler = self._resolve_handler()
        if handler is not None:
            self.claims = ClaimBridge(
                mqtt=self.internal_mqtt(), topics=self.topics, handler=handler, lock=self._lock
            )
            self.claims.start()
            if not self.claims.wait_ready(START_TIMEOUT_S):
                raise BrokerError(
                    f"the claim handler could not log in to its own broker as {CLAIMS_USER} within "
                    f"{START_TIMEOUT_S:g} s; {self.log_path}:\n{self.log_tail()}"
                )

    def _resolve_handler(self) -> ClaimHandler | None:
        if self._claim_handler is _USE_REGISTRY:
            return registry_claim_handler(self.settings)
        return self._claim_handler  # type: ignore[return-value]

    def _start_mosquitto(self, binary: str, conf: Path) -> None:
        try:
            self.proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group: a terminal's Ctrl-C reaches only ``broker run``, which stops
                # mosquitto with SIGTERM (it saves its persistence file) after the rest.
                start_new_session=True,
            )
        except OSError as exc:
            raise BrokerError(f"cannot run {binary}: {exc}") from exc
        proc = self.proc
        assert proc.stdout is not None
        self._log_thread = threading.Thread(
            target=self._copy_log, args=(proc.stdout,), name="mosquitto-log", daemon=True
        )
        self._log_thread.start()

        def alive() -> bool:
            return proc.poll() is None

        for listener in self.layout.listeners:
            port = self.layout.port_of(listener)
            host = self.layout.connect_host
            if not (wait_port(port, host=host, timeout=START_TIMEOUT_S, alive=alive) and alive()):
                if alive():
                    self._terminate()
                    problem = f"did not listen on {host}:{port} ({listener}) within {START_TIMEOUT_S:g} s"
                else:
                    problem = f"exited with code {proc.returncode} before listening on {host}:{port}"
                self._join_log()
                self.proc = None
                raise BrokerError(f"mosquitto ({binary}) {problem}; {self.log_path}:\n{self.log_tail()}")

    def _copy_log(self, stream: IO[bytes]) -> None:
        with stream, self.log_path.open("ab") as log:
            for raw in stream:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                self._tail.append(line)
                if self.echo:
                    print(line, file=sys.stderr, flush=True)

    def _join_log(self) -> None:
        if self._log_thread is not None:
            self._log_thread.join(2.0)

    def internal_mqtt(self) -> MqttSettings:
        """How the broker's own claim handler connects to it (loopback; TLS when the listeners are)."""
        listener = self.layout.claims_listener
        host = self.layout.connect_host
        tls = self.layout.tls
        return MqttSettings(
            url=f"{'mqtts' if tls else 'mqtt'}://{host}:{self.layout.port_of(listener)}",
            username=CLAIMS_USER,
            password=SecretStr(self.claims_secret),
            tls_ca=tls.ca if tls else None,
            # The server certificate chains to the CA but need not name the loopback address.
            tls_insecure=tls is not None,
            topic_prefix=self.settings.broker.topic_prefix,
            reconnect_min_s=0.5,
            reconnect_max_s=2.0,
        )

    def health_mqtt(self) -> MqttSettings:
        """How a health check logs in (``health`` reads ``$SYS/#`` on the site listener)."""
        host = self.layout.connect_host
        tls = self.layout.tls
        return MqttSettings(
            url=f"{'mqtts' if tls else 'mqtt'}://{host}:{self.layout.port}",
            username=HEALTH_USER,
            password=SecretStr(self.health_secret),
            tls_ca=tls.ca if tls else None,
            tls_insecure=tls is not None,
        )

    def confirm_reload(self, marker: str) -> bool:
        """Whether mosquitto lets ``broker-sync`` in with ``marker`` within ``RELOAD_CONFIRM_S`` (then it
        has loaded the files written with it). A raw MQTT CONNECT, then DISCONNECT."""
        listener = self.layout.claims_listener
        port = self.layout.port_of(listener)
        packet = connect_packet(
            f"{SYNC_USER}-{os.getpid()}", keepalive_s=10, username=SYNC_USER, password=marker
        )
        context = None
        if self.layout.tls is not None:
            context = ssl.create_default_context(cafile=str(self.layout.tls.ca))
            context.check_hostname = False  # loopback: the certificate need not name it
        deadline = time.monotonic() + RELOAD_CONFIRM_S
        while True:
            try:
                if _connack_accepted(self.layout.connect_host, port, packet, context):
                    return True
            except (OSError, ssl.SSLError) as exc:
                logger.debug("reload probe on port %d: %s", port, exc)
            if time.monotonic() >= deadline or not self.running:
                return False
            time.sleep(RELOAD_PROBE_PAUSE_S)

    # -- running ------------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password and ACL files and drops users that are gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def wait(self, stop: threading.Event, poll_s: float = 0.2) -> int | None:
        """Block until ``stop`` is set (None) or mosquitto exits (its exit code)."""
        while not stop.is_set():
            proc = self.proc
            if proc is None:
                return None
            code = proc.poll()
            if code is not None:
                self._join_log()
                return code
            stop.wait(poll_s)
        return None

    def stop(self) -> None:
        """Stop the claim handler, the sync loop and mosquitto (SIGTERM, then SIGKILL)."""
        if self.claims is not None:
            self.claims.stop()
            self.claims = None
        if self.sync is not None:
            self.sync.stop()
        self._terminate()
        self._join_log()
        self.proc = None

    def _terminate(self) -> None:
        if self.proc is not None:
            terminate(self.proc, STOP_TIMEOUT_S)

    def __enter__(self) -> BrokerRunner:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _connack_accepted(host: str, port: int, packet: bytes, context: ssl.SSLContext | None) -> bool:
    """Send ``packet`` (a CONNECT); whether the broker answered CONNACK "accepted"."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw:
        sock = context.wrap_socket(raw, server_hostname=host) if context is not None else raw
        try:
            sock.sendall(packet)
            accepted = connack_accepted(read_connack(sock))
            if accepted:
                sock.sendall(mqtt_packet(DISCONNECT, b""))  # no will, no "connection lost" noise
            return accepted
        finally:
            if sock is not raw:
                sock.close()
