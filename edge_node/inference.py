"""Micro-batched inference: worker threads, each owning one interpreter of the active model.

The default (one worker, PUBACK after decision) is the hot path with no hand-off: the worker owns
the site link's network loop (``MqttLink(own_loop=True)``), reads every packet that has arrived,
decides on them as one batch and writes their acks and commands in one flush, then reads again.
With several workers, paho's network thread fills the inbox and each worker takes up to
``max_batch`` windows from it (waiting at most ``max_wait_ms`` for more once it has one).

Either way a worker reads the *current* model reference once per batch and runs one invoke. The
model manager swaps that reference between batches: a batch is always served by exactly one
model, no window is dropped or run twice by a swap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

from edge_node.cache import ResultCache, window_key
from edge_node.ingest import WindowItem
from edge_node.runtime import ModelRunner
from shared.mqtt import MqttLink, Received
from shared.schemas import ModelManifest
from shared.settings.edge import BatchSettings

logger = logging.getLogger(__name__)

POLL_S: Final = 0.05  # how often an idle worker looks at the stop event


@dataclass(frozen=True, slots=True)
class ActiveModel:
    """A verified, warmed-up model: its manifest and one runner per worker."""

    manifest: ModelManifest
    runners: tuple[ModelRunner, ...]
    sha256: str
    path: str

    @property
    def version(self) -> str:
        """The active model's version."""
        return self.manifest.version


class ModelHolder:
    """The one reference workers read per batch; assignment is atomic under the GIL."""

    def __init__(self) -> None:
        self.current: ActiveModel | None = None
        self.swaps = 0
        self.swapped = threading.Condition()

    def swap(self, model: ActiveModel) -> ActiveModel | None:
        """Make ``model`` the active one (atomically for the workers); return the previous one."""
        with self.swapped:
            old, self.current = self.current, model
            self.swaps += 1
            self.swapped.notify_all()
        return old


@dataclass(slots=True)
class BatchResult:
    """One batch's windows with their class probabilities, the model that gave them and its time."""

    items: list[WindowItem]
    probs: np.ndarray  # (n, classes) float32, rows may be non-finite if the model misbehaves
    model: ActiveModel
    infer_s: float
    batch_size: int  # windows actually invoked (cache hits excluded)
    worker: int


class InferenceWorkers:
    """Worker threads: each takes messages from ``source``, turns them into windows with ``prepare``
    (decode, validate, dedup: ``None`` when a message is not a window to classify), runs a batch and
    hands the result to ``deliver``. With ``link`` (an owned-loop link, one worker) that worker also
    runs the link's network loop: socket, decision and PUBACK on one thread.
    """

    def __init__(
        self,
        holder: ModelHolder,
        source: queue.SimpleQueue[Received],
        *,
        prepare: Callable[[Received], WindowItem | None],
        deliver: Callable[[BatchResult], None],
        discard: Callable[[list[WindowItem]], None] = lambda _items: None,
        settings: BatchSettings,
        cache: ResultCache,
        link: MqttLink | None = None,
        housekeeping: Callable[[], None] = lambda: None,
    ) -> None:
        if link is not None and (settings.workers != 1 or not link.own_loop):
            raise ValueError("a link is driven by one worker, and only a link made with own_loop=True")
        self.link = link
        self.housekeeping = housekeeping  # every turn of every worker (e.g. PUBACKs now due)
        self.holder = holder
        self.source = source
        self.prepare = prepare
        self.deliver = deliver
        self.discard = discard  # windows that failed (counted): released so the broker does not resend
        self.settings = settings
        self.cache = cache
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors = 0
        self.failed_windows = 0
        self.invocations = 0
        self.drain = True
        # Only one worker takes from ``source`` at a time. CPython's SimpleQueue.get(timeout=...) can
        # block forever when several threads consume: a waiter woken by put() finds the item taken
        # by another consumer, recomputes its timeout, and a deadline already passed (a GIL wait
        # longer than max_wait_ms under load) becomes a negative timeout, i.e. "wait forever" (until
        # the next put). A worker holding a half-collected batch then keeps it, undecided and never
        # PUBACKed, for as long as no new message arrives. With one consumer nothing is stolen.
        self._take = threading.Lock()

    def start(self) -> None:
        """Start one inference thread per configured worker."""
        for index in range(self.settings.workers):
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"edge-infer-{index}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float = 10.0, *, drain: bool = True) -> None:
        """Stop: after finishing every message already received (``drain``), or the current batch."""
        self.drain = drain
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout)
        self.threads.clear()

    def _next(self, timeout: float | None) -> WindowItem | None:
        """The next window (skipping messages ``prepare`` consumed); ``queue.Empty`` when none came."""
        if self.link is not None:
            return self._next_owned(self.link, timeout)
        while True:
            with self._take:
                if timeout is None:
                    msg = self.source.get_nowait()
                else:
                    msg = self.source.get(timeout=max(timeout, 0.0))
            item = self.prepare(msg)
            if item is not None:
                return item

    def _next_owned(self, link: MqttLink, timeout: float | None) -> WindowItem:
        """``_next`` on the network thread: what is queued, else what the socket has (``timeout``
        None: only what has already arrived, else wait up to ``timeout`` s for it). Once stopping,
        nothing more is read from the socket: what was not PUBACKed is redelivered next time."""
        deadline = time.monotonic() + (timeout or 0.0)
        polled = False
        while True:
            try:
                msg = self.source.get_nowait()
            except queue.Empty:
                if self.stop_event.is_set():
                    raise
                remaining = deadline - time.monotonic()
                if timeout is None or remaining <= 0:
                    if polled:
                        raise
                    link.poll(0.0)
                    polled = True
                else:
                    link.poll(remaining)
                continue
            item = self.prepare(msg)
            if item is not None:
                return item

    def collect(self) -> list[WindowItem]:
        """One micro-batch: block for the first window, then up to max_batch within max_wait."""
        try:
            first = self._next(POLL_S)
        except queue.Empty:
            return []
        assert first is not None
        batch = [first]
        max_batch = self.settings.max_batch
        if self.link is not None:  # what has already arrived, no waiting for more
            while len(batch) < max_batch:
                try:
                    batch.append(self._next_owned(self.link, None))
                except queue.Empty:
                    break
            return batch
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
        while len(batch) < max_batch:
            try:
                item = self._next(None)
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._next(remaining)
                except queue.Empty:
                    break
            if item is not None:
                batch.append(item)
        return batch

    def _run(self, index: int) -> None:
        link = self.link
        while True:
            self.housekeeping()
            if link is not None:
                link.flush()  # the last batch's PUBACKs and commands, in one go
            if self.stop_event.is_set() and not self.drain:
                return
            try:
                batch = self.collect()
            except Exception:  # prepare() guards each message; this is a last resort
                self.errors += 1
                logger.exception("error collecting a batch")
                continue
            if not batch:
                if self.stop_event.is_set():
                    return
                continue
            model = self.holder.current  # read once: the whole batch runs on one model
            if model is None:  # cannot happen: telemetry is subscribed only once a model is active
                self.failed_windows += len(batch)
                logger.error("no active model: %d windows dropped", len(batch))
                self.discard(batch)
                continue
            try:
                result = self.run_batch(model, index, batch)
            except Exception:  # one bad batch must not stop the worker
                self.errors += 1
                self.failed_windows += len(batch)
                logger.exception("inference failed on a batch of %d windows", len(batch))
                self.discard(batch)
                continue
            self.deliver(result)

    def run_batch(self, model: ActiveModel, index: int, batch: list[WindowItem]) -> BatchResult:
        """Classify a batch with worker ``index``'s interpreter (cache first)."""
        runner = model.runners[index]
        version = model.version
        n = len(batch)
        probs: np.ndarray | None = None
        keys: list[bytes] = []
        misses: list[int] = list(range(n))
        if self.cache.enabled:
            keys = [window_key(item.values, version) for item in batch]
            cached = [self.cache.get(key) for key in keys]
            misses = [i for i, row in enumerate(cached) if row is None]
            if len(misses) < n:
                probs = np.empty((n, len(model.manifest.class_names)), dtype=np.float32)
                for i, row in enumerate(cached):
                    if row is not None:
                        probs[i] = row
        started = time.perf_counter()
        if misses:
            x = np.stack([batch[i].values for i in misses])
            out = runner.predict(x)
            self.invocations += 1
            if probs is None:
                probs = out
            else:
                probs[misses] = out
            if keys:
                for row_index, i in enumerate(misses):
                    self.cache.put(keys[i], out[row_index])
        infer_s = time.perf_counter() - started
        assert probs is not None
        return BatchResult(batch, probs, model, infer_s, len(misses), index)
