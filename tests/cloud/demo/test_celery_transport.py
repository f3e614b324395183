"""The demo's Celery transport (``cloud.demo.runtime.start_celery_transport``): a private redis-server
started as the supervised child ``redis`` (``shared.private_broker.redis_argv``); without the binary,
``EDGEFLEET_REDIS_URL`` if it answers; else kombu's SQLite transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.demo import runtime as rt
from cloud.demo.supervisor import Supervisor
from shared.private_broker import redis_binary, redis_ping
from tests.support.brokers import RedisServer


@pytest.mark.skipif(redis_binary() is None, reason="redis-server is not installed")
def test_a_private_redis_is_a_supervised_child(tmp_path: Path) -> None:
    options = rt.DemoOptions(data_dir=tmp_path / "demo")
    rt.prepare_dirs(options)
    sup = Supervisor(tmp_path / "logs")
    try:
        env, label = rt.start_celery_transport(sup, options)
        url = env["EDGEFLEET_REDIS_URL"]
        assert label == f"redis (private, {url})"
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert redis_ping(port)
        child = sup.get("redis")
        assert child.running
        assert child.argv[child.argv.index("--dir") + 1] == str((options.data_dir / "redis").resolve())
    finally:
        sup.stop()
    assert not redis_ping(port)


def test_without_redis_server_the_configured_url_then_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    monkeypatch.setattr(rt, "redis_binary", lambda: None)
    options = rt.DemoOptions(data_dir=tmp_path / "demo")
    sup = Supervisor(tmp_path / "logs")
    monkeypatch.setenv("EDGEFLEET_REDIS_URL", redis_server.url)
    assert rt.start_celery_transport(sup, options) == (
        {"EDGEFLEET_REDIS_URL": redis_server.url},
        f"redis ({redis_server.url})",
    )
    monkeypatch.delenv("EDGEFLEET_REDIS_URL")
    env, label = rt.start_celery_transport(sup, options)
    db = (options.data_dir / "cloud" / "celery-broker.db").resolve()
    assert (env, label) == ({"EDGEFLEET_CELERY_BROKER_URL": f"sqla+sqlite:///{db}"}, "kombu sqla+sqlite")
    assert not sup.children
