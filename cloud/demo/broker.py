"""``python -m cloud.demo.broker --port P``: the embedded MQTT broker (amqtt) the demo falls back to
when mosquitto is not installed. No shared subscriptions: the demo then runs one edge node."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

logger = logging.getLogger(__name__)


async def serve(port: int) -> None:
    """Run an anonymous amqtt broker on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    from amqtt.broker import Broker  # noqa: PLC0415  (the `demo` extra)

    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("amqtt broker on 127.0.0.1:%d", port)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    """Entry point of ``python -m cloud.demo.broker --port P``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
