"""shared.private_broker: the config it writes, and a real mosquitto started, used, restarted, broken."""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
from pathlib import Path

import pytest

from shared import private_broker
from shared.errors import BrokerError
from shared.mqtt import MqttLink, Received
from shared.private_broker import (
    DURABLE,
    EPHEMERAL,
    MosquittoOptions,
    PrivateMosquitto,
    PrivateRedis,
    free_port,
    mosquitto_binary,
    port_open,
    redis_argv,
    redis_binary,
    redis_ping,
    render_config,
    wait_port,
)
from shared.settings import MqttSettings
from shared.topics import Topics

WAIT_S = 20.0
TOPICS = Topics()
needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None,
    reason="the mosquitto binary is not installed (apt-get install mosquitto): these tests run a real one",
)


def link(url: str, client_id: str, *, clean_session: bool = True) -> MqttLink:
    """A link that reconnects quickly."""
    settings = MqttSettings(url=url, reconnect_min_s=0.5, reconnect_max_s=1.0)
    return MqttLink(settings, client_id=client_id, clean_session=clean_session)


def received(receiver: MqttLink) -> Received:
    """The next message the link received (fails the test after ``WAIT_S``)."""
    try:
        return receiver.inbox.get(timeout=WAIT_S)
    except queue.Empty:
        pytest.fail(f"{receiver.client_id} received nothing in {WAIT_S} s")


def test_config_has_nodelay_a_loopback_listener_and_the_options(tmp_path: Path) -> None:
    """The generated config: nodelay, loopback listener, persistence, limits, extra lines."""
    options = dataclasses.replace(DURABLE, autosave_interval_s=5, extra_conf="max_packet_size 4096")
    text = render_config(options, port=18830, workdir=tmp_path)
    lines = text.splitlines()
    assert lines[0] == "listener 18830 127.0.0.1"
    assert "set_tcp_nodelay true" in lines
    assert "persistence true" in lines
    assert f"persistence_location {tmp_path}/" in lines
    assert "autosave_interval 5" in lines
    assert "max_inflight_messages 0" in lines
    assert lines[-1] == "max_packet_size 4096"
    # As root mosquitto would drop to a user that cannot write the private workdir.
    assert ("user root" in lines) == (os.geteuid() == 0)


def test_ephemeral_config_keeps_nothing_and_leaves_limits_to_mosquitto(tmp_path: Path) -> None:
    """The benchmarks' config: no persistence, mosquitto's own limits."""
    text = render_config(EPHEMERAL, port=18831, workdir=tmp_path)
    assert "persistence false" in text.splitlines()
    assert "persistence_location" not in text
    assert "max_inflight_messages" not in text


def test_port_helpers_see_a_free_port_as_closed() -> None:
    """free_port gives a closed port; wait_port gives up on timeout or a dead process."""
    port = free_port()
    assert not port_open(port)
    assert not wait_port(port, timeout=0.1)
    assert not wait_port(port, timeout=WAIT_S, alive=lambda: False)  # a dead process: no waiting


def test_missing_binary_is_a_broker_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No mosquitto, or a binary that cannot run: ``BrokerError`` saying so."""
    monkeypatch.setattr(private_broker, "mosquitto_binary", lambda: None)
    with pytest.raises(BrokerError, match="mosquitto is not installed"):
        PrivateMosquitto(tmp_path).start()
    with pytest.raises(BrokerError, match="cannot run /nonexistent/mosquitto"):
        PrivateMosquitto(tmp_path, binary="/nonexistent/mosquitto").start()


@needs_mosquitto
def test_a_broken_config_fails_with_the_port_and_the_log_tail(tmp_path: Path) -> None:
    """mosquitto exiting at start: ``BrokerError`` with the port and mosquitto's complaint."""
    broker = PrivateMosquitto(tmp_path, MosquittoOptions(extra_conf="no_such_option true"))
    with pytest.raises(BrokerError, match=f"before listening on 127.0.0.1:{broker.port}") as failure:
        broker.start()
    assert "no_such_option" in str(failure.value)  # mosquitto's own complaint, from its log
    assert not broker.running


@needs_mosquitto
def test_publish_receive_and_restart_on_the_same_port_with_sessions_kept(tmp_path: Path) -> None:
    """A message goes through; after a restart the port and a persistent session's queue are kept."""
    topic = TOPICS.telemetry("pump-1")
    with PrivateMosquitto(tmp_path / "broker", DURABLE) as broker:
        port = broker.port
        assert broker.running
        assert port_open(port)
        subscriber = link(broker.url, "subscriber", clean_session=False)
        subscriber.subscribe(topic, qos=1)
        subscriber.connect()
        assert subscriber.wait_subscribed(WAIT_S)
        publisher = link(broker.url, "publisher")
        publisher.connect()
        try:
            assert publisher.publish(topic, b"first", qos=1).wait(WAIT_S)
            assert received(subscriber).payload == b"first"

            # Queued for the absent persistent session, saved on SIGTERM, restored on start.
            subscriber.stop()
            assert publisher.publish(topic, b"while away", qos=1).wait(WAIT_S)
            broker.restart(down_for=0.2)
            assert broker.port == port
            assert port_open(port)
            assert publisher.wait_connected(WAIT_S)  # the same URL works again
            subscriber = link(broker.url, "subscriber", clean_session=False)  # its session is back
            subscriber.connect()
            assert received(subscriber).payload == b"while away"
        finally:
            publisher.stop()
            subscriber.stop()
    assert not broker.running
    assert not port_open(port)


@needs_mosquitto
def test_kill_then_start_again(tmp_path: Path) -> None:
    """After SIGKILL the broker starts again and takes connections."""
    broker = PrivateMosquitto(tmp_path)
    broker.start()
    try:
        broker.kill()
        assert not broker.running
        broker.start()
        client = link(broker.url, "after-kill")
        client.connect()
        client.stop()
    finally:
        broker.stop()
    assert broker.log_path.exists()


# -- redis-server ----------------------------------------------------------------------------------

needs_redis = pytest.mark.skipif(
    redis_binary() is None,
    reason="the redis-server binary is not installed (apt-get install redis-server): these tests run one",
)


def test_redis_argv_binds_loopback_and_saves_nothing(tmp_path: Path) -> None:
    """The command line: loopback only, no RDB snapshots, no AOF, the workdir, the log file if given."""
    argv = redis_argv("redis-server", port=16380, workdir=tmp_path)
    assert argv[0] == "redis-server"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert pairs == {"--port": "16380", "--bind": "127.0.0.1", "--save": "", "--appendonly": "no",
                     "--dir": str(tmp_path)}  # fmt: skip
    assert redis_argv("r", port=1, workdir=tmp_path, logfile=tmp_path / "x.log")[-2:] == [
        "--logfile",
        str(tmp_path / "x.log"),
    ]


def test_missing_redis_is_a_broker_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No redis-server, or a binary that cannot run: ``BrokerError`` saying so."""
    monkeypatch.setattr(private_broker, "redis_binary", lambda: None)
    with pytest.raises(BrokerError, match="redis-server is not installed"):
        PrivateRedis(tmp_path).start()
    with pytest.raises(BrokerError, match="cannot run /nonexistent/redis-server"):
        PrivateRedis(tmp_path, binary="/nonexistent/redis-server").start()


@needs_redis
def test_private_redis_answers_and_stops(tmp_path: Path) -> None:
    """Started: it answers PING on its port, logs to workdir/redis.log; stopped: the port is closed."""
    with PrivateRedis(tmp_path / "redis") as redis:
        assert redis.running
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
        assert redis_ping(redis.port)
        assert redis.log_path.is_file()
        redis.start()  # already running: a no-op
    assert not redis.running
    assert not port_open(redis.port)
    assert not redis_ping(redis.port)
    assert not list((tmp_path / "redis").glob("*.rdb"))  # nothing saved on the way out


@needs_redis
def test_redis_on_a_taken_port_fails_with_the_log_tail(tmp_path: Path) -> None:
    """A port another process holds: redis-server exits, ``BrokerError`` names the port and its log."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        redis = PrivateRedis(tmp_path, port=port)
        with pytest.raises(BrokerError, match=f"redis-server .* 127.0.0.1:{port}"):
            redis.start()
    assert not redis.running
