"""Keras 3 training: a 1D-CNN for sensor windows (n, time, channels), a small 2D-CNN for images
(n, h, w, channels). Architecture and hyper-parameters come from ``TrainingConfig``; seeds are fixed.

TensorFlow is imported inside the functions (slow import, noisy logs)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

KNOWN_VARIANTS = ("float32", "dynamic", "float16", "int8", "pruned_int8", "distilled_int8")
EpochCallback = Callable[[int, int, dict[str, float]], None]


class TrainingConfig(BaseModel):
    """Architecture and fit settings of the classifier (the ``training`` section of a pipeline config)."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["auto", "cnn1d", "cnn2d"] = "auto"
    filters: list[int] = Field(default=[64, 128, 160], min_length=1)
    kernel_size: int = Field(default=5, ge=1)
    pool_size: int = Field(default=2, ge=1)
    dense_units: int = Field(default=128, ge=0, description="0: no hidden dense layer")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    seed: int = 0
    early_stopping_patience: int = Field(default=5, ge=0, description="0: off")

    def scaled(self, width: float) -> TrainingConfig:
        """The same architecture with ``width`` times the filters and units (teacher/student sizes)."""
        return self.model_copy(
            update={
                "filters": [max(4, round(f * width)) for f in self.filters],
                "dense_units": max(0, round(self.dense_units * width)) if self.dense_units else 0,
            }
        )


class CompressionConfig(BaseModel):
    """Which ``.tflite`` variants to build, and the settings of int8 calibration, pruning and
    distillation (the ``compression`` section)."""

    model_config = ConfigDict(extra="forbid")

    variants: list[str] = Field(
        default=["float32", "dynamic", "float16", "int8", "pruned_int8", "distilled_int8"],
        description="which .tflite variants to build",
    )
    representative_samples: int = Field(default=200, ge=1)
    pruning_sparsity: float = Field(default=0.75, gt=0, lt=1)
    pruning_epochs: int = Field(default=6, ge=1)
    pruning_update_every: int = Field(default=10, ge=1, description="batches between mask updates")
    student_width: float = Field(default=0.5, gt=0, le=1)
    distill_epochs: int | None = Field(default=None, description="default: the training epochs")
    distill_temperature: float = Field(default=4.0, gt=0)
    distill_alpha: float = Field(default=0.3, ge=0, le=1, description="weight of the hard-label loss")

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        unknown = [v for v in variants if v not in KNOWN_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}: choose from {', '.join(KNOWN_VARIANTS)}")
        return variants


def quiet_tensorflow() -> Any:
    """Import TensorFlow with its C++ logging turned down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow: slow import and noisy logs, only to train)

    tf.get_logger().setLevel(logging.ERROR)
    return tf


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Keras/TFLite print 'Saved artifact' and signature dumps on stdout, which benches and CLI
    tables own: keep them out of it, and in the debug log."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            logger.debug("tensorflow printed: %s", buffer.getvalue().strip()[:4000])


def set_seeds(seed: int) -> None:
    """Seed Python, numpy and TensorFlow (through Keras) so a training run can be repeated."""
    quiet_tensorflow()
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    keras.utils.set_random_seed(seed)


def resolve_architecture(config: TrainingConfig, input_shape: list[int]) -> str:
    """The architecture to build: the configured one, else cnn1d for windows and cnn2d for images."""
    if config.architecture != "auto":
        return config.architecture
    if len(input_shape) == 2:
        return "cnn1d"
    if len(input_shape) == 3:
        return "cnn2d"
    raise ValueError(
        f"no architecture for input shape {input_shape}: windows are (time, channels), images (h, w, c)"
    )


def build_model(
    config: TrainingConfig, input_shape: list[int], n_classes: int, *, logits: bool = False
) -> Any:
    """The Keras model; ``logits=True`` leaves off the softmax (distillation trains on logits)."""
    quiet_tensorflow()
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)
    from keras import layers  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    arch = resolve_architecture(config, input_shape)
    inputs = keras.Input(shape=tuple(input_shape), name="window")
    x = inputs
    if arch == "cnn1d":
        for i, filters in enumerate(config.filters):
            x = layers.Conv1D(
                filters, config.kernel_size, padding="same", activation="relu", name=f"conv{i}"
            )(x)
            if i < len(config.filters) - 1 and x.shape[1] >= 2 * config.pool_size:
                x = layers.MaxPooling1D(config.pool_size, name=f"pool{i}")(x)
        x = layers.GlobalAveragePooling1D(name="gap")(x)
    else:
        kernel = min(config.kernel_size, 3, *input_shape[:2])
        for i, filters in enumerate(config.filters):
            x = layers.Conv2D(filters, kernel, padding="same", activation="relu", name=f"conv{i}")(x)
            if i < len(config.filters) - 1 and min(x.shape[1], x.shape[2]) >= 2 * config.pool_size:
                x = layers.MaxPooling2D(config.pool_size, name=f"pool{i}")(x)
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    if config.dense_units:
        x = layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    if config.dropout:
        x = layers.Dropout(config.dropout, seed=config.seed, name="dropout")(x)
    x = layers.Dense(n_classes, name="logits")(x)
    if not logits:
        x = layers.Activation("softmax", name="probabilities")(x)
    return keras.Model(inputs, x, name=f"{arch}_classifier")


def with_softmax(logits_model: Any) -> Any:
    """Wrap a logits model so it outputs probabilities, as the edge expects."""
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    outputs = keras.layers.Activation("softmax", name="probabilities")(logits_model.output)
    return keras.Model(logits_model.input, outputs, name=logits_model.name)


class _EpochReporter:
    """A Keras callback forwarding epoch ends to ``on_epoch`` (Rich progress bars, task state)."""

    def __new__(cls, on_epoch: EpochCallback, epochs: int) -> Any:
        import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

        class Reporter(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                on_epoch(epoch + 1, epochs, {k: float(v) for k, v in (logs or {}).items()})

        return Reporter()


def callbacks_for(config: TrainingConfig, on_epoch: EpochCallback | None, epochs: int) -> list[Any]:
    """The Keras callbacks of one fit: early stopping when configured, epoch reports when asked."""
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    callbacks: list[Any] = []
    if config.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
            )
        )
    if on_epoch is not None:
        callbacks.append(_EpochReporter(on_epoch, epochs))
    return callbacks


def train_classifier(
    config: TrainingConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    on_epoch: EpochCallback | None = None,
) -> Any:
    """Train a fresh model on normalized inputs; returns the Keras model (softmax output)."""
    set_seeds(config.seed)
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    model = build_model(config, list(x_train.shape[1:]), n_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    with stdout_to_stderr():
        model.fit(
            x_train,
            y_train,
            validation_data=(x_val, y_val),
            epochs=config.epochs,
            batch_size=config.batch_size,
            verbose=0,
            shuffle=True,
            callbacks=callbacks_for(config, on_epoch, config.epochs),
        )
    return model


def predict(model: Any, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Keras predictions as a numpy array, with what Keras prints kept off stdout."""
    with stdout_to_stderr():
        return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def count_params(model: Any) -> int:
    """The model's parameter count (recorded with the train step)."""
    return int(model.count_params())
