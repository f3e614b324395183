"""A model checked in a short-lived child process, for the multi-process edge's supervisor.

The supervisor never runs inference: its workers do. Loading LiteRT and an interpreter in it only to
check a model at start-up (or to read a local model's shapes) would keep ~35 MB resident for the
edge's lifetime, so that check runs here, in a child that exits when done: ``check_in_child``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Final

import numpy as np

from edge_node.errors import ModelError
from edge_node.models import derive_manifest
from edge_node.runtime import ModelRunner, load_backend
from shared.schemas import ModelManifest
from shared.settings.edge import EdgeSettings

CHECK_TIMEOUT_S: Final = 120.0


def check_model(
    settings: EdgeSettings, content: bytes, manifest: ModelManifest | None, path: Path
) -> ModelManifest:
    """Build an interpreter, derive the manifest when there is none, run a warm-up batch: the model's
    manifest, or ``ModelError`` naming what is wrong (as ``ModelManager.prepare`` would)."""
    backend = load_backend(settings.runtime.backend)
    if manifest is None:
        manifest = derive_manifest(content, path, backend, settings)
    interpreter = backend.make_interpreter(content, settings.runtime)
    runner = ModelRunner(interpreter, manifest, settings.batching.max_batch)
    rng = np.random.default_rng(0)
    shape = (settings.model.warmup_windows, *manifest.input_shape)
    out = runner.predict(rng.normal(0.0, 1.0, size=shape).astype(np.float32))
    if not np.isfinite(out).all():
        raise ModelError("warm-up: the model produced NaN or infinity")
    return manifest


def check_in_child(
    settings: EdgeSettings, content: bytes, manifest: ModelManifest | None, path: Path
) -> ModelManifest:
    """``check_model`` in a child process (``python -m edge_node.model_check``)."""
    request = pickle.dumps((settings, content, manifest, path))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "edge_node.model_check"],
            input=request,
            capture_output=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"checking {path}: {exc}") from exc
    if proc.returncode != 0 or not proc.stdout:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise ModelError(f"checking {path}: the check process failed: {' | '.join(tail)}")
    ok, result = pickle.loads(proc.stdout)  # noqa: S301  (our own child's answer)
    if not ok:
        raise ModelError(str(result))
    return ModelManifest.model_validate(result)


def main() -> None:
    """Child side: a pickled request on stdin, ``(ok, manifest dict | error message)`` on stdout."""
    settings, content, manifest, path = pickle.loads(sys.stdin.buffer.read())  # noqa: S301
    try:
        answer: tuple[bool, object] = (True, check_model(settings, content, manifest, path).model_dump())
    except Exception as exc:  # noqa: BLE001  (every failure goes back to the supervisor as ModelError)
        answer = (False, str(exc))
    sys.stdout.buffer.write(pickle.dumps(answer))


if __name__ == "__main__":
    main()
