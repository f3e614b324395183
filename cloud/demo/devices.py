"""``python -m cloud.demo.devices``: the demo's simulated devices as threads of one process, each a
full ``Agent`` with its own MqttLink, outbox and state (``edgefleet demo --devices-in-one-process``).
Saves ~N-1 Python interpreters on small machines; the wire behaviour is the same as N processes."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

from cloud.demo.runtime import CLASSES, device_ids
from device_agent.agent import Agent
from shared.settings import AgentSettings, load_settings

logger = logging.getLogger(__name__)


def build(  # noqa: PLR0917 - the command line's options
    config: Path,
    broker: str,
    data_dir: Path,
    count: int,
    seed: int,
    identities_dir: Path | None = None,
    replay: tuple[Path, float, int] | None = None,
) -> list[Agent]:
    """One ``Agent`` per demo device id, with the same seeds and faults as the per-process devices;
    with ``identities_dir`` each logs in with its own bundle ``<identities_dir>/<device id>.json``;
    with ``replay`` (directory, rate, window) each replays ``<directory>/<device id>-before.npz``."""
    agents = []
    for index, device_id in enumerate(device_ids(count)):
        identity: dict[str, object] = {}
        if identities_dir is not None:
            identity["enrollment_file"] = identities_dir / f"{device_id}.json"
        sensor: dict[str, object]
        if replay is not None:
            directory, rate_hz, window = replay
            sensor = {"kind": "replay", "options": {"path": str(directory / f"{device_id}-before.npz")}}
            identity |= {"rate_hz": rate_hz, "window": window}
        else:
            options: dict[str, object] = {"seed": seed * 1000 + index}
            fault = CLASSES[index % len(CLASSES)]
            if fault != "normal":
                options["fault"] = fault
            sensor = {"kind": "simulated", "options": options}
        settings = load_settings(
            AgentSettings,
            config,
            device_id=device_id,
            broker={"url": broker},
            sensor=sensor,
            data_dir=data_dir,
            **identity,
        )
        agents.append(Agent(settings))
    return agents


def main() -> None:
    """Entry point: start every device, run until SIGTERM or SIGINT, then shut them all down together."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identities-dir", type=Path, default=None, help="the devices' enrollment bundles")
    parser.add_argument("--replay-dir", type=Path, default=None, help="replay <dir>/<device id>-before.npz")
    parser.add_argument("--rate", type=float, default=None, help="with --replay-dir: samples per second")
    parser.add_argument("--window", type=int, default=None, help="with --replay-dir: the row length")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    replay = None
    if args.replay_dir is not None:
        if args.rate is None or args.window is None:
            parser.error("--replay-dir needs --rate and --window")
        replay = (args.replay_dir, args.rate, args.window)
    agents = build(
        args.config, args.broker, args.data_dir, args.count, args.seed, args.identities_dir, replay
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: stopping %d devices", signal.Signals(signum).name, len(agents))
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started: list[Agent] = []
    try:
        for agent in agents:
            agent.start()
            started.append(agent)
        stop.wait()
    finally:
        # Each shutdown flushes in-flight windows for up to a few seconds: do them side by side.
        with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
            list(pool.map(lambda agent: agent.shutdown(), started))
    errors = [a for a in started if a.error is not None]
    if errors:
        raise SystemExit(f"{len(errors)} devices stopped on an error, e.g. {errors[0].error}")


if __name__ == "__main__":
    main()
