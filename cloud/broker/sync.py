"""Keeping the broker's password and ACL files equal to the registry.

``AuthSync`` polls ``identities.auth_revision`` every ``SYNC_INTERVAL_S`` (and wakes when the next
claim token expires); when something changed it reads an ``AuthSnapshot``, renders the files
(``cloud.broker.config``), writes those that differ atomically (temporary file, fsync, rename; mode
0600) and calls ``reload`` (``broker run``: SIGHUP to mosquitto, which re-reads them and closes the
live connections of users that are gone). Each render gives the internal ``broker-sync`` user a new
secret; ``confirm`` logs in with it, so ``applied_revision`` moves only once mosquitto really
enforces the new files (a reload not confirmed is retried at the next tick). A registry that does
not answer keeps the files as they are and is asked again at the next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final

from sqlalchemy.orm import Session

from cloud.broker.config import (
    AuthSnapshot,
    BrokerLayout,
    ClaimEntry,
    IdentityEntry,
    InternalUsers,
    render_auth_files,
)
from cloud.registry import identities
from cloud.registry.db import session_scope
from shared.errors import BrokerError
from shared.files import write_private_file
from shared.identity import broker_hash, new_secret
from shared.topics import Topics

logger = logging.getLogger(__name__)

# Module-level so tests can shorten it: how often the registry's auth revision is polled.
SYNC_INTERVAL_S: float = 1.0
# How long a reload may take to show (mosquitto handles SIGHUP in its main loop).
RELOAD_CONFIRM_S: Final = 3.0
# The broker's internal users have 256-bit random secrets: key stretching adds nothing against
# guessing them, and the sync marker is checked at every reload.
INTERNAL_HASH_ITERATIONS: Final = 1_000
FILE_MODE: Final = 0o600


def read_snapshot(session: Session, *, now: float | None = None) -> AuthSnapshot:
    """Active identities (with a secret) and usable claim tokens at the current revision."""
    revision = identities.auth_revision(session)
    active = [
        IdentityEntry(identity.identity_id, identity.kind, identity.secret_hash, identity.role)
        for identity in identities.list_identities(session, status=identities.ACTIVE)
        if identity.secret_hash
    ]
    claims = [
        ClaimEntry(token.token_id, token.secret_hash, token.expires_at)
        for token in identities.usable_claim_tokens(session, now=now)
    ]
    return AuthSnapshot(revision=revision, identities=tuple(active), claims=tuple(claims))


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, readable by the owner only."""
    write_private_file(path, text, mode=FILE_MODE)


class AuthSync:
    """Renders the auth files from the registry and reloads the broker when they change."""

    def __init__(
        self,
        *,
        database_url: str,
        layout: BrokerLayout,
        topics: Topics,
        internal: InternalUsers,
        reload: Callable[[], None],
        lock: threading.Lock | None = None,
        confirm: Callable[[str], bool] | None = None,
    ) -> None:
        self.database_url = database_url
        self.layout = layout
        self.topics = topics
        self.internal = internal
        self.reload = reload
        # ``confirm(secret)``: whether the broker lets SYNC_USER in with ``secret`` (so has loaded the
        # files written with it); None: a reload counts as applied once signalled.
        self.confirm = confirm
        # Held while a claim is answered: its token's user must not vanish before the answer is out.
        self.lock = lock or threading.Lock()
        self.applied_revision = -1  # the registry revision the files on disk reflect
        self.reloads = 0
        self._started_broker = False
        self._next_expiry: float | None = None
        self._written: dict[str, str] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync_once(self, *, force: bool = False) -> bool:
        """Render and write the files if the registry changed (or a token expired, or ``force``);
        reload the broker if any file changed. Returns whether it reloaded."""
        now = time.time()
        with session_scope(self.database_url) as session:
            revision = identities.auth_revision(session)
            expired = self._next_expiry is not None and now >= self._next_expiry
            if not (force or expired or revision != self.applied_revision):
                return False
            with self.lock:
                snapshot = read_snapshot(session, now=now)
                marker = new_secret() if self.confirm is not None else None
                internal = self.internal
                if marker is not None:
                    internal = replace(
                        internal, sync_hash=broker_hash(marker, iterations=INTERNAL_HASH_ITERATIONS)
                    )
                files = render_auth_files(self.layout, snapshot, self.topics, internal)
                changed = [name for name, text in files.items() if self._written.get(name) != text]
                for name in changed:
                    write_private(self.layout.data_dir / name, files[name])
                    self._written[name] = files[name]
                self._next_expiry = snapshot.next_expiry
                if changed and self._started_broker:
                    self.reload()
                    self.reloads += 1
                    if self.confirm is not None and marker is not None and not self.confirm(marker):
                        self._written.clear()  # rewrite (and signal) again at the next tick
                        raise BrokerError(
                            f"mosquitto did not confirm loading auth revision {snapshot.revision} "
                            f"within {RELOAD_CONFIRM_S:g} s"
                        )
                self.applied_revision = snapshot.revision
        if changed:
            logger.info(
                "broker auth at registry revision %d: %d identities, %d claim tokens (%s rewritten)",
                snapshot.revision,
                len(snapshot.identities),
                len(snapshot.claims),
                ", ".join(changed),
            )
        return bool(changed) and self._started_broker

    def broker_started(self) -> None:
        """From now on a change of the files reloads the broker (before, it reads them at start)."""
        self._started_broker = True

    # -- the loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Poll in a background thread until ``stop``."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="broker-auth-sync", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Look at the registry now rather than at the next tick."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the loop (waits for the current round)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def _delay(self) -> float:
        delay = SYNC_INTERVAL_S
        if self._next_expiry is not None:
            delay = min(delay, max(0.0, self._next_expiry - time.time()))
        return delay

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            self._wake.wait(self._delay())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync_once()
            except Exception as exc:  # noqa: BLE001  (registry down, file not writable: keep trying)
                if not failing:
                    logger.warning("broker auth sync failed (files left as they were; retrying): %s", exc)
                failing = True
            else:
                if failing:
                    logger.info("broker auth sync works again")
                failing = False
