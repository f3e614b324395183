"""Failed sign-ins limited per client address: the console's sign-in form and one-time links, and the
API's bearer tokens (an unknown or revoked token counts, a missing one does not).

Each channel has its own ``FailureLimiter`` (so one channel's failures do not lock the other out), with
the same rule: ``MAX_FAILURES`` failures within ``FAILURE_WINDOW_S`` seconds and the address is refused
(429) until the oldest of them leaves the window, even with the right secret. In memory, per process:
behind several API processes, each counts on its own (the limit per address is then that many times
higher)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from cloud.errors import AuthError

MAX_FAILURES = 10
FAILURE_WINDOW_S = 300.0
# Addresses remembered at most; beyond it the ones with no recent failure are forgotten first.
MAX_CLIENTS = 10_000


class FailureLimiter:
    """Failed attempts per client address within a sliding window."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = FAILURE_WINDOW_S,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        recent = self._failures[client]
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        return recent

    def blocked(self, client: str) -> bool:
        """Whether ``client`` failed ``max_failures`` times within the window (refuse it, 429)."""
        now = time.monotonic()
        with self._lock:
            if client not in self._failures:
                return False
            recent = self._recent(client, now)
            if not recent:
                del self._failures[client]
            return len(recent) >= self.max_failures

    def record(self, client: str) -> int:
        """Count one failure of ``client``; how many it has within the window now."""
        now = time.monotonic()
        with self._lock:
            if client not in self._failures and len(self._failures) >= self.max_clients:
                self._forget_idle(now)
            recent = self._recent(client, now)
            recent.append(now)
            return len(recent)

    def _forget_idle(self, now: float) -> None:
        for known in list(self._failures):
            if not self._recent(known, now):
                del self._failures[known]
        if len(self._failures) >= self.max_clients:  # all busy: forget the oldest half
            by_age = sorted(self._failures, key=lambda c: self._failures[c][-1])
            for known in by_age[: len(by_age) // 2]:
                del self._failures[known]

    def clear(self) -> None:
        """Forget every failure (tests)."""
        with self._lock:
            self._failures.clear()


# The console's sign-in (password, token, one-time link) and the API's bearer tokens.
CONSOLE_SIGNIN = FailureLimiter()
API_TOKENS = FailureLimiter()


class TooManyFailuresError(AuthError):
    """A client address that failed too often recently: answered 429 with ``Retry-After``."""

    def __init__(self, retry_after_s: float = FAILURE_WINDOW_S) -> None:
        super().__init__("too many failed sign-ins from this address: wait a few minutes")
        self.retry_after_s = retry_after_s
