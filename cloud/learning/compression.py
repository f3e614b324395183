"""Compression: post-training quantization (dynamic range, float16, full int8 with int8 input/output),
magnitude pruning written for Keras 3 (mask re-applied after every batch; no
tensorflow-model-optimization, which needs legacy tf-keras), and knowledge distillation.

Pruning's fine-tuning and distillation train through ``training.fit_epochs``, as the base model
does: the same epoch row repetition, augmentation, class weights, learning-rate schedule and time
budget, so a compressed variant is compared with its base on equal training terms."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from cloud.learning.training import (
    KNOWN_VARIANTS,
    CompressionConfig,
    EpochCallback,
    TrainingConfig,
    build_model,
    callbacks_for,
    epoch_rows,
    fit_epochs,
    quiet_tensorflow,
    set_seeds,
    stdout_to_stderr,
    with_softmax,
)

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "dynamic", "float16", "int8")
VARIANTS = KNOWN_VARIANTS
PRUNABLE = ("Conv1D", "Conv2D", "Dense")


def quantization_of(variant: str) -> str:
    """The PTQ mode a variant ends in (``pruned_int8`` -> ``int8``)."""
    for q in QUANTIZATIONS:
        if variant == q or variant.endswith(f"_{q}"):
            return q
    raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")


def convert(model: Any, quantization: str, *, representative: np.ndarray | None = None) -> bytes:
    """The ``.tflite`` flatbuffer of a Keras model; int8 needs representative (normalized) inputs."""
    tf = quiet_tensorflow()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 quantization needs a representative dataset")
        samples = representative.astype(np.float32)

        def representative_dataset() -> Any:
            for row in samples:
                yield [row[np.newaxis, ...]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif quantization != "float32":
        raise ValueError(f"unknown quantization {quantization!r}")
    with stdout_to_stderr(), warnings.catch_warnings():
        # Said for every int8 conversion with int8 inputs: the edge takes its scale from the interpreter.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs", category=UserWarning)
        flatbuffer: bytes = converter.convert()
    return flatbuffer


# -- magnitude pruning -----------------------------------------------------------------------------


def polynomial_sparsity(step: int, total_steps: int, target: float, *, power: float = 3.0) -> float:
    """Sparsity at ``step``: 0 at the start, ``target`` at the end, fast early and slow late."""
    if total_steps <= 0:
        return target
    progress = min(1.0, step / total_steps)
    return float(target * (1.0 - (1.0 - progress) ** power))


def prunable_kernels(model: Any) -> list[Any]:
    """The kernels magnitude pruning works on: those of the Conv1D, Conv2D and Dense layers."""
    return [layer.kernel for layer in model.layers if type(layer).__name__ in PRUNABLE]


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """1 where |w| is above the ``sparsity`` quantile of this tensor's magnitudes, else 0."""
    if sparsity <= 0:
        return np.ones_like(weights)
    k = round(sparsity * weights.size)
    if k <= 0:
        return np.ones_like(weights)
    threshold = np.partition(np.abs(weights).ravel(), k - 1)[k - 1]
    mask: np.ndarray = (np.abs(weights) > threshold).astype(weights.dtype)
    return mask


def sparsity_of(model: Any) -> float:
    """Fraction of exact zeros in the prunable kernels."""
    total = zeros = 0
    for kernel in prunable_kernels(model):
        values = np.asarray(kernel.numpy())
        total += values.size
        zeros += int(np.count_nonzero(values == 0))
    return zeros / total if total else 0.0


def _pruning_callback(kernels: list[Any], schedule: Callable[[int], float], update_every: int) -> Any:
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to compress)

    class MagnitudePruning(keras.callbacks.Callback):  # type: ignore[misc]
        """Recompute masks every ``update_every`` batches on the schedule; re-apply after every batch
        so the optimizer's updates never revive a pruned weight."""

        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.masks = [np.ones(k.shape, dtype=np.float32) for k in kernels]

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:  # noqa: ARG002
            if self.step % update_every == 0:
                sparsity = schedule(self.step)
                self.masks = [magnitude_mask(np.asarray(k.numpy()), sparsity) for k in kernels]
            for kernel, mask in zip(kernels, self.masks, strict=True):
                kernel.assign(kernel.numpy() * mask)
            self.step += 1

        def on_train_end(self, logs: Any = None) -> None:  # noqa: ARG002
            final = schedule(10**12)
            for kernel in kernels:
                kernel.assign(kernel.numpy() * magnitude_mask(np.asarray(kernel.numpy()), final))

    return MagnitudePruning()


def _last(logs: dict[str, list[float]], key: str) -> float | None:
    """The last epoch's ``key`` of a fit's history (None when it was not logged)."""
    values = logs.get(key)
    return values[-1] if values else None


def prune(  # noqa: PLR0917 - the data arrays read better positionally, as in keras fit()
    model: Any,
    training: TrainingConfig,
    compression: CompressionConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    on_epoch: EpochCallback | None = None,
) -> Any:
    """Fine-tune a copy of ``model`` while its kernels are pruned to ``pruning_sparsity``."""
    set_seeds(training.seed)
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to compress)

    start = time.perf_counter()
    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    pruned.compile(
        optimizer=keras.optimizers.Adam(training.learning_rate / 2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    # No best-epoch restore (an earlier epoch is less sparse) and no warm-up (the weights are trained).
    config = training.model_copy(update={"early_stopping_patience": 0, "warmup_epochs": 0})
    epochs = compression.pruning_epochs
    rows = epoch_rows(config, x_train, y_train, int(pruned.output_shape[-1]))
    callbacks = callbacks_for(config, on_epoch, epochs)
    budget = next((c for c in callbacks if hasattr(c, "elapsed_share")), None)
    # Reach the target sparsity by 2/3 of fine-tuning; the rest recovers accuracy at full sparsity.
    ramp = max(1, int(rows.batches * epochs * 2 / 3))

    def schedule(step: int) -> float:
        if budget is not None:
            # The time budget may end the fit early: ramp by time too, so recovery still happens.
            step = max(step, round(budget.elapsed_share() * 1.5 * ramp))
        return polynomial_sparsity(step, ramp, compression.pruning_sparsity)

    callback = _pruning_callback(prunable_kernels(pruned), schedule, compression.pruning_update_every)
    logs = fit_epochs(pruned, rows, x_val, y_val, epochs=epochs, callbacks=[callback, *callbacks])
    logger.info(
        "pruned to %.2f sparsity: %d epochs of %d batches in %.1f s, val accuracy %s",
        sparsity_of(pruned),
        len(logs.get("loss", [])),
        rows.batches,
        time.perf_counter() - start,
        _last(logs, "val_accuracy"),
    )
    return pruned


# -- knowledge distillation -------------------------------------------------------------------------


def _distiller(student: Any, teacher: Any, *, temperature: float, alpha: float) -> Any:
    """A Keras model training ``student`` (logits) against the frozen ``teacher`` (logits), whose soft
    targets it computes on each batch as fed: the augmented one in training, as the student sees it."""
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to compress)
    from keras import ops  # noqa: PLC0415  (keras: loads TensorFlow, only to compress)

    class Distiller(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name="distiller")
            self.student = student
            self.teacher = teacher

        def call(self, x: Any, training: bool = False) -> Any:
            return self.student(x, training=training)

        def compute_loss(  # Keras' signature
            self,
            x: Any = None,
            y: Any = None,
            y_pred: Any = None,
            sample_weight: Any = None,
            training: bool = True,  # noqa: ARG002
        ) -> Any:
            soft = ops.softmax(ops.stop_gradient(self.teacher(x, training=False)) / temperature, axis=-1)
            hard_ce = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
            soft_ce = keras.losses.categorical_crossentropy(soft, y_pred / temperature, from_logits=True)
            loss = alpha * hard_ce + (1.0 - alpha) * (temperature**2) * soft_ce
            if sample_weight is not None:
                loss = loss * ops.cast(ops.reshape(sample_weight, ops.shape(loss)), loss.dtype)
            return ops.mean(loss)  # Keras' "sum over batch size" reduction, as the base model's loss

    return Distiller()


def distill(  # noqa: PLR0917 - the data arrays read better positionally, as in keras fit()
    teacher: Any,
    student_config: TrainingConfig,
    compression: CompressionConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    on_epoch: EpochCallback | None = None,
) -> Any:
    """Train the student on hard labels and the teacher's temperature-softened probabilities.

    The loss is ``alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * CE(softmax(t/T), softmax(z/T))``;
    the soft cross-entropy differs from the KL divergence by the teacher's entropy, a constant."""
    set_seeds(student_config.seed)
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to compress)

    start = time.perf_counter()
    # A frozen copy: freezing ``teacher`` itself would freeze the base model other variants clone.
    teacher_logits = keras.Model(teacher.input, teacher.get_layer("logits").output)
    frozen = keras.models.clone_model(teacher_logits)
    frozen.set_weights(teacher_logits.get_weights())
    frozen.trainable = False
    student = build_model(student_config, list(x_train.shape[1:]), n_classes, logits=True)
    distiller = _distiller(
        student, frozen, temperature=compression.distill_temperature, alpha=compression.distill_alpha
    )
    distiller.compile(optimizer=keras.optimizers.Adam(student_config.learning_rate), metrics=["accuracy"])
    epochs = compression.distill_epochs or student_config.epochs
    rows = epoch_rows(student_config, x_train, y_train, n_classes)
    callbacks = callbacks_for(student_config, on_epoch, epochs)
    logs = fit_epochs(distiller, rows, x_val, y_val, epochs=epochs, callbacks=callbacks)
    logger.info(
        "distilled a %d-parameter student: %d epochs of %d batches in %.1f s, val accuracy %s",
        student.count_params(),
        len(logs.get("loss", [])),
        rows.batches,
        time.perf_counter() - start,
        _last(logs, "val_accuracy"),
    )
    return with_softmax(student)
