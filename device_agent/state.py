"""The agent's on-disk state: one SQLite database per device in WAL mode, and a lock on it.

Tables: ``outbox`` (windows not yet PUBACKed), ``meta`` (next sequence number, boot id, clean
shutdown flag), ``drops`` (dropped windows by reason), ``commands`` (recent command ids and their
acks), ``actuators`` (last state per actuator target). Each thread opens its own connection.

Durability: WAL with ``synchronous=NORMAL`` makes every commit durable against a crash of the
process (``kill -9``, OOM): the commit is in the WAL file in the OS page cache. Only a power loss
or kernel crash can roll back the last commits; ``Outbox.sync`` checkpoints (and so fsyncs) every
``SYNC_INTERVAL_S`` to bound that, and after an unclean stop followed by a reboot the sequence
number jumps by ``SEQ_REBOOT_SKIP`` so a number that may have been published is never reused.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

from device_agent.errors import AgentError

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S: Final = 10.0
CACHE_KIB: Final = 512
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, created REAL NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS drops (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commands (command_id TEXT PRIMARY KEY, received REAL NOT NULL, ack TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS commands_received ON commands (received);
CREATE TABLE IF NOT EXISTS actuators (target TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL);
"""


def db_path(data_dir: Path, device_id: str) -> Path:
    """The SQLite file of one device's state under ``data_dir``."""
    return data_dir / f"{device_id}.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=NORMAL."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise AgentError(f"cannot open agent state {path}: {exc}") from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # bound the page cache (default 2 MiB each)
        conn.executescript(SCHEMA)
    except sqlite3.Error as exc:
        conn.close()
        raise AgentError(f"agent state {path} is unusable: {exc}") from exc
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block in one ``BEGIN IMMEDIATE`` transaction: committed, or rolled back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class DataDirLock:
    """An exclusive ``flock`` so two agents never share one device's state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[bytes] | None = None

    def acquire(self) -> None:
        """Take the lock; ``AgentError`` if another agent holds it."""
        import fcntl  # noqa: PLC0415  (POSIX only; devices run Linux)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise AgentError(
                f"{self.path} is locked: another agent runs with this device id and data dir"
            ) from exc
        self._handle = handle

    def release(self) -> None:
        """Release the lock."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def boot_id() -> str | None:
    """The kernel's id of this boot (Linux), or ``None`` where it cannot be read."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
