"""Pruning and distillation train like the base model: ``epoch_rows`` (the shared batch/epoch
machinery) repeats rows, weights classes and picks augmentation; pruning reaches its sparsity and
distillation trains a student on augmented batches, with the time budget honoured and the teacher
left as it was."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cloud.learning.compression import _distiller, distill, prune, sparsity_of
from cloud.learning.training import (
    CompressionConfig,
    TrainingConfig,
    build_model,
    epoch_rows,
    fit_classifier,
    predict,
)


def _windows(n: int = 48, length: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by frequency: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = np.arange(length)[np.newaxis, :, np.newaxis]
    freq = np.where(y == 0, 0.1, 0.3)[:, np.newaxis, np.newaxis]
    x = np.sin(2 * np.pi * freq * t + rng.uniform(0, 6, size=(n, 1, 1)))
    return (x + rng.normal(0, 0.1, size=x.shape)).astype(np.float32), y


# The recipe's machinery (augmentation, repetition, balanced weights, cosine), at a toy size.
RECIPE_LIKE = TrainingConfig(
    architecture="fcn",
    filters=[8, 8, 8],
    dense_units=0,
    dropout=0.0,
    epochs=4,
    batch_size=16,
    learning_rate=2e-3,
    lr_schedule="cosine",
    warmup_epochs=1,
    augment=["jitter", "window_warp"],
    class_weight="balanced",
    min_epoch_batches=6,
    early_stopping_patience=0,
)


# -- epoch_rows: pure numpy ------------------------------------------------------------------------


def test_epoch_rows_repeat_the_rows_to_the_minimum_batches() -> None:
    x = np.arange(36 * 5, dtype=np.float32).reshape(36, 5, 1)
    y = np.array([0] * 27 + [1] * 9)
    config = TrainingConfig(
        architecture="resnet",
        batch_size=16,
        min_epoch_batches=16,
        class_weight="balanced",
        augment=["jitter"],
    )
    rows = epoch_rows(config, x, y, 3)
    assert rows.repeats == 8  # ceil(16 batches * 16 rows / 36 rows)
    assert rows.x.shape == (288, 5, 1)
    assert rows.batches == 18
    np.testing.assert_array_equal(rows.x[36:72], x)
    np.testing.assert_array_equal(rows.y[:36], y)
    # Balanced: each present class weighs the same in total; the absent class 2 does not matter.
    assert rows.weights[rows.y == 0].sum() == pytest.approx(rows.weights[rows.y == 1].sum())
    assert rows.methods == ["jitter"]
    assert rows.seed == config.seed


def test_epoch_rows_defaults_leave_the_rows_alone() -> None:
    x = np.zeros((10, 4, 2), dtype=np.float32)
    y = np.arange(10) % 2
    rows = epoch_rows(TrainingConfig(batch_size=64), x, y, 2)
    assert rows.repeats == 1
    assert rows.x is x
    assert rows.batch_size == 10  # never above the rows
    np.testing.assert_array_equal(rows.weights, np.ones(10))
    assert rows.methods == []


def test_epoch_rows_do_not_augment_images() -> None:
    x = np.zeros((8, 6, 6, 1), dtype=np.float32)
    rows = epoch_rows(TrainingConfig(augment=["jitter"]), x, np.zeros(8, dtype=np.int64), 2)
    assert rows.methods == []


# -- with TensorFlow -------------------------------------------------------------------------------


def test_distillation_loss_is_weighted_hard_plus_soft_cross_entropy() -> None:
    import keras  # noqa: PLC0415  (TensorFlow)

    x, y = _windows(n=8)
    config = TrainingConfig(architecture="fcn", filters=[4, 4, 4], dense_units=0, dropout=0.0)
    student = build_model(config, [32, 1], 2, logits=True)
    teacher = build_model(config.model_copy(update={"seed": 1}), [32, 1], 2, logits=True)
    weights = np.linspace(0.5, 2.0, 8).astype(np.float32)
    z, t = np.asarray(student(x)), np.asarray(teacher(x))

    def log_softmax(a: np.ndarray) -> np.ndarray:
        shifted: np.ndarray = a - a.max(axis=1, keepdims=True)
        result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return result

    temperature, alpha = 3.0, 0.25
    hard = -log_softmax(z)[np.arange(8), y]
    soft = -(np.exp(log_softmax(t / temperature)) * log_softmax(z / temperature)).sum(axis=1)
    expected = np.mean(weights * (alpha * hard + (1 - alpha) * temperature**2 * soft))

    distiller = _distiller(student, teacher, temperature=temperature, alpha=alpha)
    loss = distiller.compute_loss(x, y, distiller(x), keras.ops.convert_to_tensor(weights))
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_prune_reaches_the_sparsity_with_the_recipe_machinery() -> None:
    x, y = _windows()
    base = fit_classifier(RECIPE_LIKE, x[:40], y[:40], x[40:], y[40:], n_classes=2).model
    before = [w.copy() for w in base.get_weights()]
    comp = CompressionConfig(pruning_sparsity=0.6, pruning_epochs=3, pruning_update_every=2)
    pruned = prune(base, RECIPE_LIKE, comp, x[:40], y[:40], x[40:], y[40:])
    assert sparsity_of(pruned) >= 0.59
    assert sparsity_of(base) < 0.1  # the base model is a copy's source, never pruned itself
    for w, b in zip(base.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)
    accuracy = float(np.mean(predict(pruned, x).argmax(axis=1) == y))
    assert accuracy >= 0.8


def test_distill_trains_a_student_and_leaves_the_teacher_alone() -> None:
    x, y = _windows()
    teacher = fit_classifier(RECIPE_LIKE, x[:40], y[:40], x[40:], y[40:], n_classes=2).model
    before = [w.copy() for w in teacher.get_weights()]
    reports: list[tuple[int, int, dict[str, float]]] = []
    student = distill(
        teacher,
        RECIPE_LIKE.scaled(0.5),
        CompressionConfig(),
        x[:40],
        y[:40],
        x[40:],
        y[40:],
        n_classes=2,
        on_epoch=lambda e, n, logs: reports.append((e, n, logs)),
    )
    assert student.count_params() < teacher.count_params()
    probabilities = predict(student, x)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert float(np.mean(probabilities.argmax(axis=1) == y)) >= 0.8
    assert [(e, n) for e, n, _ in reports] == [(e, 4) for e in range(1, 5)]  # distill_epochs: training's
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(reports[-1][2])
    assert all(layer.trainable for layer in teacher.layers)  # still fine-tunable by pruning
    for w, b in zip(teacher.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_distill_honours_the_time_budget_without_validation_rows() -> None:
    x, y = _windows()
    teacher = build_model(RECIPE_LIKE, [32, 1], 2)
    config = RECIPE_LIKE.model_copy(update={"epochs": 10_000, "max_seconds": 2.0})
    start = time.perf_counter()
    student = distill(teacher, config.scaled(0.5), CompressionConfig(), x, y, x[:0], y[:0], n_classes=2)
    assert time.perf_counter() - start < 20  # the budget plus building and tracing
    assert predict(student, x[:4]).shape == (4, 2)
