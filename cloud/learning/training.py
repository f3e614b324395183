"""Keras 3 training: a 1D-CNN, an FCN and a ResNet for sensor windows (n, time, channels), a small
2D-CNN for images (n, h, w, channels). Architecture, augmentation, learning-rate schedule, early
stopping, class weights and a time budget come from ``TrainingConfig``; seeds are fixed.

``recipe_for`` is the recipe for small real time-series datasets (UCR/UEA sized) and
``default_candidates`` the few configurations model selection tries; their docstrings say what
the experiments behind them measured.

TensorFlow is imported inside the functions (slow import, noisy logs)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloud.learning.augmentation import AugmentMethod, augment_batch

logger = logging.getLogger(__name__)

KNOWN_VARIANTS = ("float32", "dynamic", "float16", "int8", "pruned_int8", "distilled_int8")
EpochCallback = Callable[[int, int, dict[str, float]], None]
Architecture = Literal["auto", "cnn1d", "cnn2d", "fcn", "resnet"]
# Kernel sizes of the FCN layers and of the convolutions in a ResNet block (Wang et al. 2017).
FCN_KERNELS = (8, 5, 3)
THREADS_ENV = "EDGEFLEET_TF_THREADS"
# Keras' 0.99 needs thousands of steps before the moving statistics match the weights; a small
# dataset gives a few hundred, and inference (validation, test, the edge) then sees chance accuracy.
BN_MOMENTUM = 0.9


class TrainingConfig(BaseModel):
    """Architecture and fit settings of the classifier (the ``training`` section of a pipeline config).

    ``filters``: the conv widths of cnn1d/cnn2d and fcn (one layer each), the block widths of resnet.
    ``monitor``: what early stopping and best-weight restoring watch; ``val_accuracy`` breaks ties on
    ``val_loss`` (a validation set of a few rows moves its accuracy in big steps). Without validation
    data the fit watches ``loss``."""

    model_config = ConfigDict(extra="forbid")

    architecture: Architecture = "auto"
    filters: list[int] = Field(default=[64, 128, 160], min_length=1)
    kernel_size: int = Field(default=5, ge=1, description="cnn1d/cnn2d; fcn and resnet use 8, 5, 3")
    pool_size: int = Field(default=2, ge=1)
    dense_units: int = Field(default=128, ge=0, description="0: no hidden dense layer")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    seed: int = 0
    early_stopping_patience: int = Field(default=5, ge=0, description="0: off")
    monitor: Literal["val_loss", "val_accuracy", "loss"] = "val_loss"
    min_delta: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "plateau", "cosine"] = "constant"
    warmup_epochs: int = Field(default=0, ge=0, description="cosine: linear warm-up epochs")
    augment: list[AugmentMethod] = Field(default_factory=list, description="windows only, not images")
    class_weight: Literal["none", "balanced"] = "none"
    max_seconds: float | None = Field(default=None, gt=0, description="time budget of one fit")
    min_epoch_batches: int = Field(
        default=1, ge=1, description="repeat the training rows so an epoch has at least this many batches"
    )

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


_threads_configured = False


def configure_threads(threads: int | None = None) -> None:
    """Limit TensorFlow's CPU threads (``threads`` or ``$EDGEFLEET_TF_THREADS``; unset/0: TF's default).

    Two Celery workers on two cores should each run with 1: TF's default (every core, per worker)
    makes them fight over the cores and both slower. Only effective before TensorFlow runs an op."""
    global _threads_configured  # noqa: PLW0603  (once per process: TF refuses later changes)
    if threads is None:
        if _threads_configured:
            return
        raw = os.environ.get(THREADS_ENV, "").strip()
        threads = int(raw) if raw else 0
    _threads_configured = True
    if threads <= 0:
        return
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow: slow import and noisy logs, only to train)

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        # TF already started its thread pools in this process: the threads it has stay.
        logger.warning("TensorFlow already initialized: %s=%d not applied", THREADS_ENV, threads)


def quiet_tensorflow() -> Any:
    """Import TensorFlow with its C++ logging turned down (and its threads set, once)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow: slow import and noisy logs, only to train)

    tf.get_logger().setLevel(logging.ERROR)
    configure_threads()
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
        if config.architecture in ("fcn", "resnet", "cnn1d") and len(input_shape) != 2:
            raise ValueError(f"{config.architecture} takes windows (time, channels), not {input_shape}")
        return config.architecture
    if len(input_shape) == 2:
        return "cnn1d"
    if len(input_shape) == 3:
        return "cnn2d"
    raise ValueError(
        f"no architecture for input shape {input_shape}: windows are (time, channels), images (h, w, c)"
    )


def _conv_bn(x: Any, filters: int, kernel: int, name: str, *, relu: bool = True) -> Any:
    """Conv1D + batch norm (+ ReLU); no conv bias, the batch norm's shift replaces it."""
    from keras import layers  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    x = layers.Conv1D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _fcn(x: Any, config: TrainingConfig) -> Any:
    """Wang et al. 2017: conv-BN-ReLU layers (kernels 8, 5, 3), then global average pooling."""
    from keras import layers  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    for i, filters in enumerate(config.filters):
        x = _conv_bn(x, filters, FCN_KERNELS[min(i, len(FCN_KERNELS) - 1)], f"fcn{i}")
    return layers.GlobalAveragePooling1D(name="gap")(x)


def _resnet(x: Any, config: TrainingConfig) -> Any:
    """Wang et al. 2017 / Fawaz et al. 2019: residual blocks of three conv-BN (kernels 8, 5, 3);
    the shortcut is a 1x1 conv + BN where the width changes, else BN; then global average pooling."""
    from keras import layers  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    for b, filters in enumerate(config.filters):
        y = x
        for i, kernel in enumerate(FCN_KERNELS):
            y = _conv_bn(y, filters, kernel, f"block{b}_{i}", relu=i < len(FCN_KERNELS) - 1)
        if x.shape[-1] != filters:
            shortcut = layers.Conv1D(filters, 1, use_bias=False, name=f"block{b}_short_conv")(x)
        else:
            shortcut = x
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{b}_short_bn")(shortcut)
        x = layers.Add(name=f"block{b}_add")([y, shortcut])
        x = layers.Activation("relu", name=f"block{b}_relu")(x)
    return layers.GlobalAveragePooling1D(name="gap")(x)


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
    if arch == "fcn":
        x = _fcn(x, config)
    elif arch == "resnet":
        x = _resnet(x, config)
    elif arch == "cnn1d":
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


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced class weights, ``n / (classes present * count)`` (scikit-learn's rule); 0 for absent."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = np.count_nonzero(counts)
    weights = np.zeros(n_classes)
    weights[counts > 0] = len(y) / (present * counts[counts > 0])
    return weights


# -- callbacks --------------------------------------------------------------------------------------


class _EpochReporter:
    """A Keras callback forwarding epoch ends to ``on_epoch`` (Rich progress bars, task state)."""

    def __new__(cls, on_epoch: EpochCallback, epochs: int) -> Any:
        import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

        class Reporter(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                on_epoch(epoch + 1, epochs, {k: float(v) for k, v in (logs or {}).items()})

        return Reporter()


class _BestEpoch:
    """A Keras callback keeping the weights of the best epoch by ``monitor`` and restoring them when
    the fit ends, however it ends (patience, time budget or last epoch; Keras' EarlyStopping restores
    only when its patience ran out). Stops after ``patience`` epochs without improvement (0: never).

    A missing monitor falls back to ``val_loss``, then ``loss`` (distillation logs no accuracy; a fit
    without validation data logs no ``val_*``). ``val_accuracy`` ties are broken by ``val_loss``."""

    def __new__(cls, monitor: str, *, patience: int, min_delta: float = 0.0) -> Any:
        import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

        class Best(keras.callbacks.Callback):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.monitor = monitor
                self.best_epoch = -1
                self.best_logs: dict[str, float] = {}
                self.stopped_early = False
                self._best_key: tuple[float, float] | None = None
                self._weights: list[np.ndarray] | None = None
                self._wait = 0

            def _key(self, logs: dict[str, float]) -> tuple[float, float] | None:
                name = next((m for m in (monitor, "val_loss", "loss") if m in logs), None)
                if name is None:
                    return None
                self.monitor = name
                if name.endswith("accuracy"):
                    # Higher is better: negate so that smaller keys are better throughout.
                    return (-float(logs[name]), float(logs.get("val_loss", logs.get("loss", 0.0))))
                return (float(logs[name]), 0.0)

            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                key = self._key(logs or {})
                if key is None or not all(math.isfinite(k) for k in key):
                    return
                best = self._best_key
                improved = best is None or key[0] < best[0] - min_delta
                tie_better = best is not None and abs(key[0] - best[0]) <= min_delta and key[1] < best[1]
                if improved or tie_better:
                    self._best_key = key
                    self.best_epoch = epoch
                    self.best_logs = {k: float(v) for k, v in (logs or {}).items()}
                    self._weights = self.model.get_weights()
                    self._wait = 0
                    return
                self._wait += 1
                if patience and self._wait >= patience:
                    self.stopped_early = True
                    self.model.stop_training = True

            def on_train_end(self, logs: dict[str, float] | None = None) -> None:  # noqa: ARG002
                if self._weights is not None:
                    self.model.set_weights(self._weights)

        return Best()


class _TimeBudget:
    """A Keras callback stopping the fit once ``max_seconds`` have passed since it began (checked
    after every batch, so one long epoch cannot overrun the budget by much)."""

    def __new__(cls, max_seconds: float) -> Any:
        import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

        class Budget(keras.callbacks.Callback):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.max_seconds = max_seconds
                self.started = time.perf_counter()
                self.exceeded = False

            def on_train_begin(self, logs: dict[str, float] | None = None) -> None:  # noqa: ARG002
                self.started = time.perf_counter()

            def elapsed_share(self) -> float:
                return (time.perf_counter() - self.started) / self.max_seconds

            def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:  # noqa: ARG002
                if self.elapsed_share() >= 1.0:
                    self.exceeded = True
                    self.model.stop_training = True

        return Budget()


class _CosineSchedule:
    """A Keras callback: linear warm-up over ``warmup`` epochs, then cosine decay to 1 % of the rate.

    Progress is the further of epochs done and time budget used, so a fit cut by its time budget
    has still annealed (a cosine cut half way ends at a high rate, its worst point)."""

    def __new__(cls, base_lr: float, epochs: int, warmup: int, budget: Any = None) -> Any:
        import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

        class Cosine(keras.callbacks.Callback):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.base_lr = base_lr

            def on_train_begin(self, logs: dict[str, float] | None = None) -> None:  # noqa: ARG002
                # The rate the optimizer was compiled with (pruning fine-tunes at half the config's).
                self.base_lr = float(np.asarray(self.model.optimizer.learning_rate))

            def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:  # noqa: ARG002
                base_lr = self.base_lr
                if epoch < warmup:
                    lr = base_lr * (epoch + 1) / (warmup + 1)
                else:
                    progress = (epoch - warmup) / max(1, epochs - warmup)
                    if budget is not None:
                        progress = max(progress, budget.elapsed_share())
                    progress = min(1.0, progress)
                    lr = base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
                self.model.optimizer.learning_rate = lr

        return Cosine()


def callbacks_for(config: TrainingConfig, on_epoch: EpochCallback | None, epochs: int) -> list[Any]:
    """The Keras callbacks of one fit: best-epoch tracking with early stopping when configured, the
    time budget, the learning-rate schedule, epoch reports when asked."""
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    callbacks: list[Any] = []
    budget = _TimeBudget(config.max_seconds) if config.max_seconds else None
    if budget is not None:
        callbacks.append(budget)
    if config.early_stopping_patience:
        callbacks.append(
            _BestEpoch(config.monitor, patience=config.early_stopping_patience, min_delta=config.min_delta)
        )
    if config.lr_schedule == "cosine":
        callbacks.append(_CosineSchedule(config.learning_rate, epochs, config.warmup_epochs, budget))
    elif config.lr_schedule == "plateau":
        # On the training loss, as Fawaz et al.: a handful of validation rows is too noisy to steer it.
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="loss",
                factor=0.5,
                patience=max(3, config.early_stopping_patience // 3),
                min_lr=config.learning_rate / 100,
            )
        )
    if on_epoch is not None:
        callbacks.append(_EpochReporter(on_epoch, epochs))
    return callbacks


# -- fitting ----------------------------------------------------------------------------------------


class _AugmentedBatches:
    """A Keras PyDataset: shuffled batches, augmented afresh every epoch, with sample weights.

    Batch ``i`` of epoch ``e`` depends only on (seed, e, i), so a fit repeats whatever order Keras
    asks for batches in."""

    def __new__(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        weights: np.ndarray,
        *,
        methods: Sequence[str],
        batch_size: int,
        seed: int,
    ) -> Any:
        import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

        class Batches(keras.utils.PyDataset):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.epoch = 0
                self.order = np.random.default_rng([seed, 0]).permutation(len(x))

            def __len__(self) -> int:
                return math.ceil(len(x) / batch_size)

            def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                rows = self.order[index * batch_size : (index + 1) * batch_size]
                rng = np.random.default_rng([seed, self.epoch, index])
                batch = augment_batch(x[rows], methods, rng) if methods else x[rows]
                return batch.astype(np.float32), y[rows], weights[rows].astype(np.float32)

            def on_epoch_end(self) -> None:
                self.epoch += 1
                self.order = np.random.default_rng([seed, self.epoch]).permutation(len(x))

        return Batches()


@dataclass
class EpochRows:
    """The rows one epoch of a fit goes over: the training rows repeated ``repeats`` times, their
    sample weights, the batch size and the augmentation methods (empty: none)."""

    x: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    batch_size: int
    repeats: int
    methods: list[str]
    seed: int

    @property
    def batches(self) -> int:
        """Optimizer steps per epoch."""
        return math.ceil(len(self.x) / self.batch_size)


def epoch_rows(config: TrainingConfig, x_train: np.ndarray, y_train: np.ndarray, n_classes: int) -> EpochRows:
    """How ``config`` feeds ``x_train`` to an epoch (numpy only; ``fit_epochs`` runs it)."""
    y_train = np.asarray(y_train, dtype=np.int64)
    if config.class_weight == "balanced":
        weights = class_weights(y_train, n_classes)[y_train]
    else:
        weights = np.ones(len(y_train))
    arch = resolve_architecture(config, list(x_train.shape[1:]))
    methods: list[str] = (
        list(config.augment) if arch != "cnn2d" else []
    )  # image augmentation is another craft
    # Batch size never above the training rows: one step per epoch learns nothing on tiny datasets.
    batch_size = max(1, min(config.batch_size, len(x_train)))
    # Keras spends ~0.1 s per epoch (validation, callbacks) whatever its size: on a dataset of 36 rows
    # that is most of the time, so an epoch goes over the rows several times instead.
    repeats = max(1, math.ceil(config.min_epoch_batches * batch_size / max(1, len(x_train))))
    return EpochRows(
        x=np.concatenate([x_train] * repeats) if repeats > 1 else x_train,
        y=np.concatenate([y_train] * repeats) if repeats > 1 else y_train,
        weights=np.concatenate([weights] * repeats) if repeats > 1 else weights,
        batch_size=batch_size,
        repeats=repeats,
        methods=methods,
        seed=config.seed,
    )


def fit_epochs(
    model: Any,
    rows: EpochRows,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    epochs: int,
    callbacks: list[Any],
) -> dict[str, list[float]]:
    """``model.fit`` (compiled by the caller) over ``rows`` for ``epochs``, augmented afresh every
    epoch when ``rows.methods``; validation when given and not empty. Returns the history logs.

    Shared by the classifier fit, pruning's fine-tuning and distillation, so the compressed variants
    get the same steps, augmentation and class weights as the model they are compared with."""
    has_val = x_val is not None and y_val is not None and len(x_val) > 0
    validation = (x_val, np.asarray(y_val, dtype=np.int64)) if has_val else None
    with stdout_to_stderr():
        if rows.methods:
            data = _AugmentedBatches(
                rows.x, rows.y, rows.weights, methods=rows.methods, batch_size=rows.batch_size, seed=rows.seed
            )
            history = model.fit(
                data, validation_data=validation, epochs=epochs, verbose=0, callbacks=callbacks
            )
        else:
            history = model.fit(
                rows.x,
                rows.y,
                sample_weight=rows.weights.astype(np.float32),
                validation_data=validation,
                epochs=epochs,
                batch_size=rows.batch_size,
                verbose=0,
                shuffle=True,
                callbacks=callbacks,
            )
    return {k: [float(v) for v in values] for k, values in history.history.items()}


@dataclass
class FitResult:
    """What one fit gives model selection: the model (best weights restored), how far it went and why
    it stopped, its best validation numbers (None without validation data) and its wall time."""

    model: Any
    epochs_run: int
    best_epoch: int  # 1-based; the epoch whose weights the model has
    best_val_accuracy: float | None
    best_val_loss: float | None
    seconds: float
    stopped: Literal["epochs", "early_stopping", "time_budget"]
    history: dict[str, list[float]] = field(default_factory=dict)


def fit_classifier(
    config: TrainingConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    *,
    n_classes: int,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train a fresh model on normalized inputs (validation optional: without it, the fit watches
    the training loss; a refit on every training row with fixed epochs sets patience 0)."""
    set_seeds(config.seed)
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to train)

    start = time.perf_counter()
    input_shape = list(x_train.shape[1:])
    arch = resolve_architecture(config, input_shape)
    model = build_model(config, input_shape, n_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = callbacks_for(config, on_epoch, config.epochs)
    rows = epoch_rows(config, x_train, y_train, n_classes)
    logs = fit_epochs(model, rows, x_val, y_val, epochs=config.epochs, callbacks=callbacks)
    epochs_run = len(next(iter(logs.values()), []))
    best = next((c for c in callbacks if hasattr(c, "best_epoch")), None)
    budget = next((c for c in callbacks if hasattr(c, "exceeded")), None)
    best_epoch = best.best_epoch + 1 if best is not None and best.best_epoch >= 0 else epochs_run
    best_logs = {k: v[best_epoch - 1] for k, v in logs.items() if len(v) >= best_epoch > 0}
    stopped: Literal["epochs", "early_stopping", "time_budget"] = "epochs"
    if budget is not None and budget.exceeded:
        stopped = "time_budget"
    elif best is not None and best.stopped_early:
        stopped = "early_stopping"
    result = FitResult(
        model=model,
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        best_val_accuracy=best_logs.get("val_accuracy"),
        best_val_loss=best_logs.get("val_loss"),
        seconds=time.perf_counter() - start,
        stopped=stopped,
        history=logs,
    )
    logger.info(
        "trained %s (%d params): %d epochs in %.1f s, best epoch %d, val accuracy %s, stopped by %s",
        arch,
        model.count_params(),
        epochs_run,
        result.seconds,
        best_epoch,
        result.best_val_accuracy,
        stopped,
    )
    return result


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
    return fit_classifier(
        config, x_train, y_train, x_val, y_val, n_classes=n_classes, on_epoch=on_epoch
    ).model


# -- the recipe for small real datasets ---------------------------------------------------------------

RECIPE_AUGMENT: list[AugmentMethod] = ["jitter", "scaling", "window_slice", "window_warp"]
# Optimizer steps of one fit. 800 (40 epochs) had levelled off on GunPoint, BasicMotions and
# JapaneseVowels, but 1,600 gained on the hard ones: ArrowHead int8 85.1 / 83.4 (seeds 0 / 2) against
# 82.9 / 81.1 at 800, OSULeaf 96.7 against 94.6 (seed 0).
RECIPE_STEPS = 1600
RECIPE_MAX_EPOCHS = 80
RECIPE_MIN_EPOCHS = 10
RECIPE_EPOCH_BATCHES = 16
RECIPE_MAX_SECONDS = 180.0  # one fit; OSULeaf (the largest) took 100-126 s at 80 epochs on 2 shared cores
# Validation rows below which early stopping is left off: on 7-54 rows, the epoch validation loss
# or accuracy picked scored up to 5 test points below the end of the cosine schedule.
RECIPE_MIN_VAL_ROWS = 100
# Datasets up to this many training values (rows x length; ArrowHead ~9 K, OSULeaf ~85 K) also try
# the FCN: on the larger ones the search budget runs out before a third candidate gets its folds.
FCN_CANDIDATE_MAX_CELLS = 20_000


def recipe_for(
    n_train: int,
    length: int,
    channels: int,
    *,
    validation_fraction: float = 0.2,
    max_seconds: float = RECIPE_MAX_SECONDS,
) -> TrainingConfig:
    """The training recipe for a window dataset of ``n_train`` rows (before the validation carve)
    of ``length`` steps and ``channels`` channels: a ResNet at half the published width (~130 K
    parameters, ~140 KB at int8), time-series augmentation, batch 16, Adam 1e-3 with warm-up and
    cosine decay over ~1,600 steps (epochs of at least 16 batches), balanced class weights.

    Measured on ArrowHead, GunPoint, OSULeaf, BasicMotions, JapaneseVowels (standard splits, see
    docs/benchmarks.md): near the published ResNet (Fawaz et al. 2019, 1500 epochs) in 20-130 s a fit
    on 2 cores; without augmentation ArrowHead lost 9 points, at FCN's full width it lost 10. ``length`` and
    ``channels`` only size the time budget's need, which ``max_seconds`` caps."""
    del length, channels  # the recipe did not need to change with them on these datasets
    rows = max(1, round(n_train * (1 - validation_fraction)))
    batch_size = 16
    batches = max(RECIPE_EPOCH_BATCHES, math.ceil(rows / batch_size))
    epochs = min(RECIPE_MAX_EPOCHS, max(RECIPE_MIN_EPOCHS, math.ceil(RECIPE_STEPS / batches)))
    enough_val = n_train * validation_fraction >= RECIPE_MIN_VAL_ROWS
    return TrainingConfig(
        architecture="resnet",
        filters=[32, 64, 64],
        dense_units=0,
        dropout=0.0,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=1e-3,
        lr_schedule="cosine",
        warmup_epochs=3,
        min_epoch_batches=RECIPE_EPOCH_BATCHES,
        augment=list(RECIPE_AUGMENT),
        class_weight="balanced",
        early_stopping_patience=8 if enough_val else 0,
        monitor="val_loss",
        min_delta=1e-3,
        max_seconds=max_seconds,
    )


def default_candidates(
    input_shape: list[int], n_train: int, n_classes: int, *, max_seconds: float = RECIPE_MAX_SECONDS
) -> list[TrainingConfig]:
    """The configurations model selection tries on a dataset, best guess first (a search out of
    budget skips the last ones); every one is under 512 KB at int8 (at most ~270 K parameters).

    1. the recipe (ResNet, half width, augmented): best on ArrowHead (84.6 vs 75.4 unaugmented);
    2. the same without augmentation: best on OSULeaf (96.7 vs 95.5), where warping a leaf's
       outline changes its class;
    3. on datasets where a fit is cheap (rows x length <= ``FCN_CANDIDATE_MAX_CELLS``), the FCN at
       full width with augmentation, so architecture is searched too; it did worse than the ResNet
       where measured (ArrowHead 74, OSULeaf 93.8), and at about the ResNet's cost per fit.

    Images (h, w, c) get today's cnn2d, which the recipe was not measured on."""
    del n_classes  # only the output layer changes with the classes
    if len(input_shape) != 2:
        return [TrainingConfig(max_seconds=max_seconds)]
    length, channels = input_shape
    recipe = recipe_for(n_train, length, channels, max_seconds=max_seconds)
    candidates = [recipe, recipe.model_copy(update={"augment": []})]
    if n_train * length <= FCN_CANDIDATE_MAX_CELLS:
        candidates.append(recipe.model_copy(update={"architecture": "fcn", "filters": [128, 256, 128]}))
    return candidates


def predict(model: Any, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Keras predictions as a numpy array, with what Keras prints kept off stdout."""
    with stdout_to_stderr():
        return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def count_params(model: Any) -> int:
    """The model's parameter count (recorded with the train step)."""
    return int(model.count_params())
