"""Smoke check of the docker-compose topology (the ``smoke`` service of docker-compose.smoke.yml).

Passes (exit 0) when, within ``SMOKE_TIMEOUT_S``:

0. the web console's sign-in page (``SMOKE_CONSOLE_URL``, when set) answers HTTP 200, and the API's
   description (``SMOKE_DOCS_URL``, when set, e.g. /openapi.json) refuses a request without
   credentials (HTTP 401);
1. every expected edge reports online with a deployed model version (retained edge status), the
   first model having gone cloud -> desired state -> artifact download -> signature check -> swap;
2. at least ``SMOKE_DEVICES`` devices are online and their telemetry windows flow;
3. both edges process windows (their EdgeMetrics ``windows_total`` grows: the shared subscription
   splits the devices between them);
4. the closed loop works: a bearing fault injected into one device (an ``inject_fault`` command,
   acked by the device) makes an edge decide (rule ``stop_on_bearing_fault`` of
   deploy/config/rules.yaml) and send that device an ``actuate`` command, which the device acks.

Otherwise it exits 1 naming what did not happen. Topics and messages come from ``shared.topics``
and ``shared.schemas`` only. Environment: SMOKE_BROKER (mqtt://mosquitto:1883), SMOKE_ENROLLMENT_FILE
(an operator's enrollment bundle: its username and password log in; else SMOKE_USERNAME and
SMOKE_PASSWORD), SMOKE_EDGES ("edge-1 edge-2"), SMOKE_DEVICES (1), SMOKE_RULE, SMOKE_TIMEOUT_S (600),
SMOKE_CONSOLE_URL (e.g. http://cloud-api:8080/signin; unset: not checked), SMOKE_DOCS_URL (unset: not
checked).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import JsonValue, SecretStr

from shared.enrollment import load_bundle
from shared.errors import EdgefleetError
from shared.mqtt import MqttLink, Received
from shared.schemas import (
    Command,
    CommandAck,
    CommandName,
    Decision,
    DeviceStatus,
    EdgeMetrics,
    EdgeStatus,
    OnlineState,
    decode_message,
    encode_message,
)
from shared.settings.base import MqttSettings
from shared.topics import DeviceTopic, EdgeTopic, Topics

logger = logging.getLogger("edgefleet.smoke")

POLL_S = 0.5
PROGRESS_EVERY_S = 15.0
FAULT = "bearing_fault"
SENDER = "compose-smoke"


class SmokeError(Exception):
    """A stage did not complete in time; the message says which and what was seen."""


@dataclass
class Observed:
    """What the smoke check has seen on the broker so far, per edge and per device."""

    edge_versions: dict[str, str | None] = field(default_factory=dict)
    edge_online: set[str] = field(default_factory=set)
    edge_windows: dict[str, int] = field(default_factory=dict)
    devices_online: set[str] = field(default_factory=set)
    windows: dict[str, int] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    commands: dict[str, Command] = field(default_factory=dict)
    acks: dict[str, CommandAck] = field(default_factory=dict)
    bad_messages: int = 0


class Smoke:
    """One smoke run: a subscriber on the fleet's topics that waits for each stage in turn."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        edges: list[str],
        devices: int,
        rule: str,
        console_url: str | None = None,
        docs_url: str | None = None,
    ) -> None:
        self.topics: Topics = settings.topics
        self.console_url = console_url
        self.console_status: int | None = None
        self.docs_url = docs_url
        self.docs_status: int | None = None
        self.edges = edges
        self.min_devices = devices
        self.rule = rule
        self.seen = Observed()
        self.link = MqttLink(settings, client_id=f"{SENDER}-{os.getpid()}")
        self.started = time.monotonic()
        self._last_progress = 0.0

    # -- wire ----------------------------------------------------------------------------------
    def connect(self, timeout: float) -> None:
        """Subscribe to the topics the stages read and connect (``SmokeError`` on timeout)."""
        for kind in (DeviceTopic.STATUS, DeviceTopic.TELEMETRY, DeviceTopic.CMD, DeviceTopic.ACK):
            self.link.subscribe(self.topics.all_devices(kind), qos=1)
        for edge_kind in (EdgeTopic.STATUS, EdgeTopic.DECISION, EdgeTopic.METRICS):
            self.link.subscribe(self.topics.all_edges(edge_kind), qos=1)
        self.link.start()
        if not self.link.wait_connected(timeout):
            raise SmokeError(
                f"could not connect to the broker at {self.link.settings.url} in {timeout:.0f} s"
            )

    def drain(self, wait_s: float = POLL_S) -> None:
        """Record every message that arrives within ``wait_s``; undecodable ones are counted, not fatal."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                message = self.link.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            try:
                self._handle(message)
            except (EdgefleetError, ValueError) as exc:  # count it, keep going
                self.seen.bad_messages += 1
                logger.warning("undecodable message on %s: %s", message.topic, exc)

    def _handle(self, message: Received) -> None:
        parsed = self.topics.parse(message.topic)
        kind, entity = parsed.kind, parsed.entity_id
        seen = self.seen
        if parsed.tier == "dev":
            if kind == DeviceTopic.TELEMETRY:
                seen.windows[entity] = seen.windows.get(entity, 0) + 1
            elif kind == DeviceTopic.STATUS and message.payload:
                status = decode_message(message.payload, DeviceStatus)
                if status.state == OnlineState.ONLINE:
                    seen.devices_online.add(status.device_id)
                else:
                    seen.devices_online.discard(status.device_id)
            elif kind == DeviceTopic.CMD:
                command = decode_message(message.payload, Command)
                seen.commands[command.command_id] = command
            elif kind == DeviceTopic.ACK:
                ack = decode_message(message.payload, CommandAck)
                seen.acks[ack.command_id] = ack
            return
        if kind == EdgeTopic.STATUS and message.payload:
            edge_status = decode_message(message.payload, EdgeStatus)
            if edge_status.state == OnlineState.ONLINE:
                seen.edge_online.add(edge_status.edge_id)
            else:
                seen.edge_online.discard(edge_status.edge_id)
            seen.edge_versions[edge_status.edge_id] = edge_status.reported.model_version
        elif kind == EdgeTopic.METRICS:
            metrics = decode_message(message.payload, EdgeMetrics)
            seen.edge_windows[metrics.edge_id] = metrics.windows_total
        elif kind == EdgeTopic.DECISION:
            seen.decisions.append(decode_message(message.payload, Decision))

    # -- stages --------------------------------------------------------------------------------
    def wait_for(self, what: str, done: Callable[[], bool], deadline: float) -> None:
        """Drain messages until ``done()`` is true; on timeout raise naming ``what`` and the state."""
        while not done():
            if time.monotonic() > deadline:
                raise SmokeError(f"timed out waiting for {what}; seen: {self.summary()}")
            self.drain()
            now = time.monotonic()
            if now - self._last_progress > PROGRESS_EVERY_S:
                self._last_progress = now
                print(f"[{now - self.started:6.1f} s] waiting for {what}: {self.summary()}", flush=True)
        print(f"[{time.monotonic() - self.started:6.1f} s] ok: {what}", flush=True)

    def console_answers(self) -> bool:
        """Whether the console's sign-in page answers 200 (an HTML page, no session needed)."""
        assert self.console_url is not None
        try:
            with urllib.request.urlopen(self.console_url, timeout=5) as answer:  # noqa: S310 - http(s) URL from the compose file
                self.console_status = answer.status
        except urllib.error.HTTPError as exc:
            self.console_status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            logger.debug("console not answering yet: %s", exc)
            return False
        return self.console_status == 200

    def docs_need_credentials(self) -> bool:
        """Whether the API's description refuses an anonymous request (401); a 200 fails at once."""
        assert self.docs_url is not None
        try:
            with urllib.request.urlopen(self.docs_url, timeout=5) as answer:  # noqa: S310 - URL from the compose file
                self.docs_status = answer.status
        except urllib.error.HTTPError as exc:
            self.docs_status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            logger.debug("API not answering yet: %s", exc)
            return False
        if self.docs_status == 200:
            raise SmokeError(f"{self.docs_url} answered 200 without credentials: it must need a viewer")
        return self.docs_status == 401

    def models_on_edges(self) -> bool:
        """Stage 1: every expected edge is online and reports a model version."""
        return all(edge in self.seen.edge_online and self.seen.edge_versions.get(edge) for edge in self.edges)

    def devices_streaming(self) -> bool:
        """Stage 2: at least ``min_devices`` online devices have sent two windows or more."""
        flowing = [d for d in self.seen.devices_online if self.seen.windows.get(d, 0) >= 2]
        return len(flowing) >= self.min_devices

    def edges_processing(self) -> bool:
        """Stage 3: every expected edge has processed windows (its metrics say so)."""
        return all(self.seen.edge_windows.get(edge, 0) > 0 for edge in self.edges)

    def send(self, device_id: str, name: CommandName, args: dict[str, JsonValue]) -> Command:
        """Send a command to a device as the smoke check, on the device's command topic."""
        command = Command.create(device_id=device_id, name=name, args=args, ttl_s=60.0, sender=SENDER)
        self.link.publish(self.topics.command(device_id), encode_message(command), qos=1)
        return command

    def acked_ok(self, command_id: str) -> bool:
        """Whether the device acked the command; an error ack fails the check at once."""
        ack = self.seen.acks.get(command_id)
        if ack is not None and not ack.ok:
            raise SmokeError(f"device refused command {command_id}: {ack.status} {ack.error}")
        return ack is not None

    def loop_decision(self, device_id: str, since: float) -> Decision | None:
        """The decision of the smoke rule on ``device_id`` since ``since`` that sent it a command, if any."""
        for decision in self.seen.decisions:
            if (
                decision.device_id == device_id
                and decision.rule == self.rule
                and decision.command_id
                and decision.ts >= since
            ):
                return decision
        return None

    def run(self, timeout: float) -> dict[str, object]:
        """Run the stages in order within ``timeout``, then the closed loop; returns what passed, as JSON."""
        deadline = self.started + timeout
        self.connect(max(1.0, deadline - time.monotonic()))
        if self.console_url:
            self.wait_for(
                f"the console's sign-in page {self.console_url} (HTTP 200)", self.console_answers, deadline
            )
        if self.docs_url:
            self.wait_for(
                f"the API description {self.docs_url} to refuse anonymous requests (HTTP 401)",
                self.docs_need_credentials,
                deadline,
            )
        self.wait_for(
            f"a model version on every edge ({', '.join(self.edges)})", self.models_on_edges, deadline
        )
        self.wait_for(f"telemetry from {self.min_devices} online device(s)", self.devices_streaming, deadline)
        self.wait_for("windows processed by every edge (edge metrics)", self.edges_processing, deadline)

        device = sorted(d for d in self.seen.devices_online if self.seen.windows.get(d, 0) >= 2)[0]
        injected_at = time.time()
        inject = self.send(device, CommandName.INJECT_FAULT, {"fault": FAULT, "severity": 1.0})
        self.wait_for(f"{device} to ack inject_fault", lambda: self.acked_ok(inject.command_id), deadline)
        holder: dict[str, Decision] = {}

        def decided() -> bool:
            decision = self.loop_decision(device, injected_at - 1.0)
            if decision is not None:
                holder["decision"] = decision
            return decision is not None

        self.wait_for(f"an edge decision ({self.rule}) for {device}", decided, deadline)
        decision = holder["decision"]
        assert decision.command_id is not None
        command_id = decision.command_id
        self.wait_for(
            f"the decision's command {decision.command_name} on {device}'s command topic",
            lambda: command_id in self.seen.commands,
            deadline,
        )
        self.wait_for(f"{device} to ack the edge's command", lambda: self.acked_ok(command_id), deadline)
        clear = self.send(device, CommandName.CLEAR_FAULT, {})
        self.wait_for(f"{device} to ack clear_fault", lambda: self.acked_ok(clear.command_id), deadline)
        return {
            "ok": True,
            "seconds": round(time.monotonic() - self.started, 1),
            "edge_model_versions": {e: self.seen.edge_versions.get(e) for e in self.edges},
            "edge_windows_total": {e: self.seen.edge_windows.get(e, 0) for e in self.edges},
            "devices_online": len(self.seen.devices_online),
            "windows_seen": sum(self.seen.windows.values()),
            "loop": {
                "device": device,
                "edge": decision.edge_id,
                "rule": decision.rule,
                "probability": round(decision.probability, 3),
                "model_version": decision.model_version,
                "command": str(decision.command_name),
                "command_id": command_id,
                "ack": str(self.seen.acks[command_id].status),
            },
            "bad_messages": self.seen.bad_messages,
            "console": {"url": self.console_url, "status": self.console_status} if self.console_url else None,
            "docs": {"url": self.docs_url, "anonymous_status": self.docs_status} if self.docs_url else None,
        }

    def summary(self) -> str:
        """What has been seen so far, as one JSON line (progress lines and failure messages)."""
        seen = self.seen
        return json.dumps(
            {
                "edges_online": sorted(seen.edge_online),
                "edge_model_versions": seen.edge_versions,
                "edge_windows_total": seen.edge_windows,
                "devices_online": len(seen.devices_online),
                "devices_streaming": sum(1 for d in seen.devices_online if seen.windows.get(d, 0) >= 2),
                "windows_seen": sum(seen.windows.values()),
                "decisions": len(seen.decisions),
                "commands": len(seen.commands),
                "acks": len(seen.acks),
                "bad_messages": seen.bad_messages,
                "console_status": self.console_status,
            },
            sort_keys=True,
        )

    def close(self) -> None:
        """Stop the MQTT link."""
        self.link.stop()


def main() -> int:
    """Entry point of the ``smoke`` service: settings from the environment; exit 0 if it passes, else 1."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = os.environ
    username, password = env.get("SMOKE_USERNAME", "ops"), env.get("SMOKE_PASSWORD")
    if env.get("SMOKE_ENROLLMENT_FILE"):
        try:
            bundle = load_bundle(Path(env["SMOKE_ENROLLMENT_FILE"]))
        except EdgefleetError as exc:
            print(f"SMOKE FAILED: {exc}", flush=True)
            return 1
        username, password = bundle.username, bundle.password
    settings = MqttSettings(
        url=env.get("SMOKE_BROKER", "mqtt://mosquitto:1883"),
        username=username,
        password=SecretStr(password) if password else None,
        reconnect_max_s=2.0,
    )
    smoke = Smoke(
        settings,
        edges=env.get("SMOKE_EDGES", "edge-1 edge-2").split(),
        devices=int(env.get("SMOKE_DEVICES", "1")),
        rule=env.get("SMOKE_RULE", "stop_on_bearing_fault"),
        console_url=env.get("SMOKE_CONSOLE_URL") or None,
        docs_url=env.get("SMOKE_DOCS_URL") or None,
    )
    timeout = float(env.get("SMOKE_TIMEOUT_S", "600"))
    try:
        result = smoke.run(timeout)
    except SmokeError as exc:
        print(f"SMOKE FAILED after {time.monotonic() - smoke.started:.0f} s: {exc}", flush=True)
        return 1
    finally:
        smoke.close()
    print("SMOKE PASSED " + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
