"""Build small real .tflite models for tests, the benchmark and local trials.

Needs TensorFlow (the ``cloud`` extra), so the edge process never imports this module's builder:
tests and ``edgefleet bench edge`` run ``python -m edge_node.modelgen OUT_DIR`` in a subprocess.
The synthetic data (``synthetic_window``) needs numpy only.

Models written to OUT_DIR (input: windows of 100 samples x 3 channels, 4 classes):

- ``float32.tflite`` / ``float32_v2.tflite``: a 1D-CNN trained on the synthetic data (two seeds);
- ``int8.tflite``: the first one, full-integer quantized with int8 input and output;
- ``short_input.tflite``: input 50 x 3 (wrong shape for the manifests of the others);
- ``nan.tflite``: produces NaN for every input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Final

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


def _build(samples: int, seed: int, *, train: bool = True) -> Any:
    import keras  # noqa: PLC0415  (TensorFlow only where models are built)

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(samples, len(CHANNELS))),
            keras.layers.Conv1D(8, 5, activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Conv1D(8, 5, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(len(CLASS_NAMES), activation="softmax"),
        ]
    )
    if train:
        x, y = synthetic_dataset(800, seed, samples)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    return model


def _convert(model: Any, *, int8: bool = False, samples: int = SAMPLES) -> bytes:
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow only where models are built)

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        x, _ = synthetic_dataset(128, 99, samples)

        def representative() -> Any:
            for row in x:
                yield [row[None, ...]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def build_all(out_dir: Path) -> dict[str, str]:
    """Build every model into ``out_dir``; return name -> path (also written to models.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = _build(SAMPLES, 1)
    second = _build(SAMPLES, 2)
    short = _build(SAMPLES // 2, 3, train=False)
    nan_model = _build(SAMPLES, 4, train=False)
    dense = nan_model.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([np.full_like(kernel, np.nan), bias])
    artifacts = {
        "float32": _convert(first),
        "float32_v2": _convert(second),
        "int8": _convert(first, int8=True),
        "short_input": _convert(short, samples=SAMPLES // 2),
        "nan": _convert(nan_model),
    }
    paths: dict[str, str] = {}
    for name, content in artifacts.items():
        path = out_dir / f"{name}.tflite"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(content)
        tmp.replace(path)
        paths[name] = str(path)
    (out_dir / "models.json").write_text(json.dumps(paths, indent=2))
    return paths


def main() -> None:
    """``python -m edge_node.modelgen [OUT_DIR]``: build the test models, print their paths as JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("var/models")
    paths = build_all(out)
    sys.stdout.write(json.dumps(paths) + "\n")


if __name__ == "__main__":
    main()
