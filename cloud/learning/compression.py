"""Compression: post-training quantization (dynamic range, float16, full int8 with int8 input/output),
magnitude pruning written for Keras 3 (mask re-applied after every batch; no
tensorflow-model-optimization, which needs legacy tf-keras), and knowledge distillation."""

from __future__ import annotations

import logging
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

    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    pruned.compile(
        optimizer=keras.optimizers.Adam(training.learning_rate / 2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    steps_per_epoch = int(np.ceil(len(x_train) / training.batch_size))
    # Reach the target sparsity by 2/3 of fine-tuning; the rest recovers accuracy at full sparsity.
    ramp = max(1, int(steps_per_epoch * compression.pruning_epochs * 2 / 3))

    def schedule(step: int) -> float:
        return polynomial_sparsity(step, ramp, compression.pruning_sparsity)

    callback = _pruning_callback(prunable_kernels(pruned), schedule, compression.pruning_update_every)
    with stdout_to_stderr():
        pruned.fit(
            x_train,
            y_train,
            validation_data=(x_val, y_val),
            epochs=compression.pruning_epochs,
            batch_size=training.batch_size,
            verbose=0,
            callbacks=[
                callback,
                *callbacks_for(
                    training.model_copy(update={"early_stopping_patience": 0}),
                    on_epoch,
                    compression.pruning_epochs,
                ),
            ],
        )
    return pruned


# -- knowledge distillation -------------------------------------------------------------------------


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
    from keras import ops  # noqa: PLC0415  (keras: loads TensorFlow, only to compress)

    temperature = compression.distill_temperature
    alpha = compression.distill_alpha
    teacher_logits_model = keras.Model(teacher.input, teacher.get_layer("logits").output)
    with stdout_to_stderr():
        t_train = np.asarray(teacher_logits_model.predict(x_train, batch_size=256, verbose=0))
        t_val = np.asarray(teacher_logits_model.predict(x_val, batch_size=256, verbose=0))

    def targets(y: np.ndarray, t: np.ndarray) -> np.ndarray:
        hard = np.eye(n_classes, dtype=np.float32)[y]
        soft = np.asarray(ops.softmax(t / temperature, axis=-1), dtype=np.float32)
        return np.concatenate([hard, soft], axis=1)

    def kd_loss(y_true: Any, logits: Any) -> Any:
        hard, soft = y_true[:, :n_classes], y_true[:, n_classes:]
        hard_ce = keras.losses.categorical_crossentropy(hard, logits, from_logits=True)
        soft_ce = keras.losses.categorical_crossentropy(soft, logits / temperature, from_logits=True)
        return alpha * hard_ce + (1.0 - alpha) * (temperature**2) * soft_ce

    student = build_model(student_config, list(x_train.shape[1:]), n_classes, logits=True)
    student.compile(optimizer=keras.optimizers.Adam(student_config.learning_rate), loss=kd_loss)
    epochs = compression.distill_epochs or student_config.epochs
    with stdout_to_stderr():
        student.fit(
            x_train,
            targets(y_train, t_train),
            validation_data=(x_val, targets(y_val, t_val)),
            epochs=epochs,
            batch_size=student_config.batch_size,
            verbose=0,
            shuffle=True,
            callbacks=callbacks_for(student_config, on_epoch, epochs),
        )
    return with_softmax(student)
