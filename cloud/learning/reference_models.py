"""Small real ``.tflite`` reference models for tests, the edge benchmark and local trials, trained on
``edge_node.synthetic`` windows. Needs TensorFlow: edges and tests run it as a subprocess
(``python -m cloud.learning.reference_models OUT_DIR``, see ``edge_node.synthetic.ensure_reference_models``).

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
from typing import Any

import numpy as np

from edge_node.synthetic import CHANNELS, CLASS_NAMES, SAMPLES, synthetic_dataset


def build_model(samples: int, seed: int, *, train: bool = True) -> Any:
    """The reference 1D-CNN (Keras), trained on synthetic windows unless ``train`` is False."""
    import keras  # noqa: PLC0415  (TensorFlow: imported only when a model is built, not on import)

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


def convert(model: Any, *, int8: bool = False, samples: int = SAMPLES) -> bytes:
    """The ``.tflite`` flatbuffer of ``model``: float32, or full-integer int8 in and out."""
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow: imported only when a model is built, not on import)

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
    first = build_model(SAMPLES, 1)
    second = build_model(SAMPLES, 2)
    short = build_model(SAMPLES // 2, 3, train=False)
    nan_model = build_model(SAMPLES, 4, train=False)
    dense = nan_model.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([np.full_like(kernel, np.nan), bias])
    artifacts = {
        "float32": convert(first),
        "float32_v2": convert(second),
        "int8": convert(first, int8=True),
        "short_input": convert(short, samples=SAMPLES // 2),
        "nan": convert(nan_model),
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
    """``python -m cloud.learning.reference_models [OUT_DIR]``: build the models, print their paths."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("var/models")
    paths = build_all(out)
    sys.stdout.write(json.dumps(paths) + "\n")


if __name__ == "__main__":
    main()
