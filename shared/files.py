"""Writing files that hold secrets: atomically (a reader sees the old file or the new, never half) and
readable by the owner only. Standard library only: ``shared`` is installed on devices."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

PRIVATE_MODE: Final = 0o600


def write_private_file(path: Path, data: bytes | str, *, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) through a temporary file, fsync and rename, with
    ``mode`` from the start (the umask may narrow it, never widen it)."""
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
