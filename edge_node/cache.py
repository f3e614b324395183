"""An LRU of inference results keyed by a hash of the window's values and the model version."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def window_key(values: np.ndarray, model_version: str) -> bytes:
    """16-byte key: blake2b over the window's float32 bytes, personalised by the model version."""
    digest = hashlib.blake2b(
        np.ascontiguousarray(values).data, digest_size=16, key=model_version.encode()[:64]
    )
    return digest.digest()


class ResultCache:
    """Thread-safe LRU of probability rows; cleared on every model swap."""

    def __init__(self, max_entries: int, *, enabled: bool = True) -> None:
        self.max_entries = max_entries
        self.enabled = enabled
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        """The cached result for a window's bytes, or ``None`` (counted as hit or miss)."""
        if not self.enabled:
            return None
        with self._lock:
            row = self._entries.get(key)
            if row is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return row

    def put(self, key: bytes, row: np.ndarray) -> None:
        """Remember a window's result, evicting the least recently used beyond the limit."""
        if not self.enabled:
            return
        if row.base is not None:  # a row of a batch's output: a view would keep the whole batch alive
            row = row.copy()
        with self._lock:
            self._entries[key] = row
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every result (a new model gives new ones)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        """Share of lookups answered from the cache."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
