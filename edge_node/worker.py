"""One worker process of a multi-process edge: ``python -m edge_node.worker --control-fd FD``.

Started by the supervisor (``edge_node/supervisor.py``) with one end of a socket pair as FD. It
reads ``Init`` (settings, its index, the model the edge serves), runs an ``EdgeNode`` in the worker
role (its own persistent site session in the edge's shared-subscription group, its own cloud
connection for decisions, samples and dead letters, no status) and then, on its own threads:

- control: ``Prepare`` (build and warm up the new model's interpreters) -> ``Prepared``;
  ``Commit`` (swap between two batches) -> ``Committed``; ``Abort``; ``Stop``;
- report: ``Stats`` every ``STATS_INTERVAL_S`` (counters, snapshot, devices classified).

SIGTERM or ``Stop`` or the end of the channel (the supervisor is gone) stop it the way
``EdgeNode.stop`` does: the batches in hand are decided and acked, the rest the broker redelivers.
SIGINT is ignored: a Ctrl-C reaches the whole process group and the supervisor stops the workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Final

from edge_node.control import (
    STATS_INTERVAL_S,
    Abort,
    Channel,
    Commit,
    Committed,
    Init,
    Prepare,
    Prepared,
    Ready,
    SeenDevices,
    Stats,
    StatsExporter,
    Stop,
)
from edge_node.inference import ActiveModel
from edge_node.models import WorkerModels
from edge_node.node import EdgeNode
from shared.errors import EdgefleetError

logger = logging.getLogger(__name__)

EXIT_NO_INIT: Final = 3  # the channel closed before Init: the supervisor went away


class WorkerProcess:
    """The worker side of the control channel around one ``EdgeNode(worker=k)``."""

    def __init__(self, init: Init, channel: Channel) -> None:
        self.index = init.index
        self.channel = channel
        self.node = EdgeNode(init.settings, worker=init.index)
        models = self.node.manager
        assert isinstance(models, WorkerModels)
        self.models = models
        if init.model is not None:
            spec = init.model
            models.initial = (Path(spec.path), Path(spec.stored_path), spec.manifest)
        devices = self.node.devices
        assert isinstance(devices, SeenDevices)
        self.devices = devices
        self.exporter = StatsExporter(self.node.stats)
        self._staged: dict[int, ActiveModel] = {}

    def run(self) -> int:
        """Serve until stopped; the exit code."""
        stop = self.node.stop_event

        def _term(signum: int, _frame: FrameType | None) -> None:
            logger.info("signal %d: stopping", signum)
            stop.set()

        signal.signal(signal.SIGTERM, _term)
        self.node.start()
        model = self.node.holder.current
        self.channel.send(Ready(self.index, os.getpid(), model.version if model else None))
        threading.Thread(target=self._control, name="worker-control", daemon=True).start()
        reporter = threading.Thread(target=self._report_loop, name="worker-report", daemon=True)
        reporter.start()
        while not stop.wait(1.0):
            pass
        self.node.stop()
        self._report()  # the last counts, so the edge's sums include every window decided
        self.channel.close()
        return 0

    def _control(self) -> None:
        while not self.node.stop_event.is_set():
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                logger.warning("control channel closed: the supervisor is gone, stopping")
                self.node.stop_event.set()
                return
            if isinstance(message, Prepare):
                self._prepare(message)
            elif isinstance(message, Commit):
                model = self._staged.pop(message.token, None)
                if model is not None:
                    self.models.activate(model)
                current = self.node.holder.current
                self.channel.send(Committed(self.index, message.token, current.version if current else None))
            elif isinstance(message, Abort):
                self._staged.pop(message.token, None)
            elif isinstance(message, Stop):
                self.node.stop_event.set()
                return
            else:
                logger.warning("unexpected control message %r", message)

    def _prepare(self, message: Prepare) -> None:
        spec = message.spec
        self._staged.clear()  # only the latest round can be committed
        try:
            model = self.models.stage(Path(spec.path), Path(spec.stored_path), spec.manifest)
        except (EdgefleetError, OSError, ValueError) as exc:
            logger.warning("model %s not prepared: %s", spec.manifest.ref, exc)
            self.channel.send(Prepared(self.index, message.token, ok=False, reason=str(exc)))
            return
        except Exception as exc:  # anything a broken artifact makes the runtime raise
            logger.exception("model %s not prepared", spec.manifest.ref)
            self.channel.send(Prepared(self.index, message.token, ok=False, reason=repr(exc)))
            return
        self._staged[message.token] = model
        self.channel.send(Prepared(self.index, message.token, ok=True))

    def _report_loop(self) -> None:
        while not self.node.stop_event.wait(STATS_INTERVAL_S):
            try:
                self._report()
            except Exception:  # reports must never take the worker down
                logger.exception("stats report failed")

    def _report(self) -> None:
        self.channel.send(
            Stats(self.index, self.exporter.export(), self.node.snapshot(), self.devices.drain())
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (the supervisor starts it; not for people)."""
    parser = argparse.ArgumentParser(prog="python -m edge_node.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, help="informational: which worker this is (see ps)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(args.control_fd)
    try:
        init = channel.recv()
    except (EOFError, OSError):
        return EXIT_NO_INIT
    assert isinstance(init, Init)
    logging.basicConfig(
        level=init.log_level,
        format=f"%(asctime)s %(levelname)-7s [worker {init.index}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if init.settings.gil_switch_interval_ms is not None:
        sys.setswitchinterval(init.settings.gil_switch_interval_ms / 1000.0)
    return WorkerProcess(init, channel).run()


if __name__ == "__main__":
    sys.exit(main())
