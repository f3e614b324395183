"""Synthetic sensor windows for the edge benchmark, tests and local trials (numpy only): each class
has its own dominant frequency, so a small model separates them.

The reference ``.tflite`` models trained on these windows are built with TensorFlow by
``cloud.learning.reference_models``, always in a subprocess (``ensure_reference_models``): the edge
never imports TensorFlow or the cloud.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

import numpy as np

SAMPLES: Final = 100
CHANNELS: Final = ("x", "y", "z")
CLASS_NAMES: Final = ("normal", "imbalance", "misalignment", "bearing_fault")
SAMPLE_RATE_HZ: Final = 100.0


def synthetic_window(class_index: int, rng: np.random.Generator, samples: int = SAMPLES) -> np.ndarray:
    """A (samples, 3) float32 window whose dominant frequency depends on the class."""
    t = np.arange(samples, dtype=np.float32) / SAMPLE_RATE_HZ
    freq = 3.0 + 6.0 * class_index
    phase = rng.uniform(0, 2 * np.pi, size=len(CHANNELS)).astype(np.float32)
    base = np.sin(2 * np.pi * freq * t[:, None] + phase[None, :])
    noise = rng.normal(0, 0.3, size=(samples, len(CHANNELS)))
    window: np.ndarray = (base + noise).astype(np.float32)
    return window


def synthetic_dataset(n: int, seed: int, samples: int = SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled synthetic windows (x: windows, y: class indices)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASS_NAMES), size=n)
    x = np.stack([synthetic_window(int(c), rng, samples) for c in y])
    return x, y.astype(np.int64)


BUILDER_MODULE: Final = "cloud.learning.reference_models"
BUILD_TIMEOUT_S: Final = 600.0


def ensure_reference_models() -> dict[str, Path]:
    """The reference models (name -> path), built once with TensorFlow in a subprocess
    (``python -m cloud.learning.reference_models``) and cached in the temp dir by the sources' hash."""
    # find_spec locates the builder's file without importing it (nor TensorFlow) into this process.
    spec = importlib.util.find_spec(BUILDER_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{BUILDER_MODULE} is not installed: the reference models need the cloud extra")
    source = Path(__file__).read_bytes() + Path(spec.origin).read_bytes()
    cache = Path(tempfile.gettempdir()) / f"edgefleet-test-models-{hashlib.sha256(source).hexdigest()[:12]}"
    if not (cache / "models.json").exists():
        work = Path(tempfile.mkdtemp(prefix="edgefleet-models-"))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(
            [sys.executable, "-m", BUILDER_MODULE, str(work)],
            capture_output=True,
            env=env,
            check=False,
            timeout=BUILD_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{BUILDER_MODULE} failed:\n{proc.stderr.decode(errors='replace')[-3000:]}")
        paths = json.loads((work / "models.json").read_text())
        (work / "models.json").write_text(
            json.dumps({name: str(cache / Path(path).name) for name, path in paths.items()})
        )
        try:
            work.rename(cache)
        except OSError:  # another process cached them meanwhile
            shutil.rmtree(work, ignore_errors=True)
    return {name: Path(path) for name, path in json.loads((cache / "models.json").read_text()).items()}
