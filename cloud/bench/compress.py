"""``edgefleet bench compress``: every compression variant of one dataset, measured in one run."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import click

from cloud.errors import DatasetError

logger = logging.getLogger(__name__)


# --hard: weak faults in noisy machines, so that the small student has something to learn from the teacher.
HARD_VIBRATION = {"noise": 0.08, "severity_range": (0.05, 0.35)}


def run_compress_bench(
    dataset_spec: str,
    *,
    seed: int = 0,
    n_windows: int = 4000,
    epochs: int | None = None,
    hard: bool = False,
    student_width: float | None = None,
) -> dict[str, Any]:
    """Train once on ``dataset_spec``, build and measure every variant and a scratch-trained student:
    the JSON object ``edgefleet bench compress`` prints, with its ratios and targets. A dataset with a
    published split (an ``.npz`` with ``split``, ``aeon:NAME``) is measured on its test rows."""
    from cloud.learning import datasets  # noqa: PLC0415  (numpy and the learning code: not for --help)
    from cloud.learning import pipeline as workflow  # noqa: PLC0415  (numpy and the learning code: not for --help)
    from cloud.learning.training import CompressionConfig, TrainingConfig  # noqa: PLC0415  (numpy and the learning code: not for --help)

    start = time.perf_counter()
    options = HARD_VIBRATION if hard and dataset_spec == "vibration" else None
    dataset = datasets.load(dataset_spec, seed=seed, n_windows=n_windows, options=options)
    training = TrainingConfig(seed=seed, **({"epochs": epochs} if epochs else {}))
    comp = CompressionConfig(**({"student_width": student_width} if student_width else {}))
    prepared = workflow.prepare(dataset, seed=seed)
    train_start = time.perf_counter()
    base = workflow.train_base(prepared, training)
    train_seconds = time.perf_counter() - train_start
    cache: dict[str, Any] = {}
    variants: dict[str, Any] = {}
    for variant in comp.variants:
        result = workflow.build_variant(variant, base, prepared, training, comp, student_cache=cache)
        ev = result.evaluation
        variants[variant] = {
            "size_bytes": ev.size_bytes,
            "gzip_bytes": ev.gzip_bytes,
            "accuracy": round(ev.accuracy, 4),
            "macro_f1": round(ev.macro_f1, 4),
            "latency_us_b1": round(ev.latency_us_b1, 2),
            "throughput_b64": round(ev.throughput_b64, 1),
            "sparsity": round(result.sparsity, 3),
            "input_dtype": ev.input_dtype,
            "build_seconds": round(result.seconds, 2),
        }
    pipeline_seconds = time.perf_counter() - start
    scratch = workflow.train_student_from_scratch(prepared, training, comp)
    f32, i8, pruned = variants["float32"], variants["int8"], variants["pruned_int8"]
    out: dict[str, Any] = {
        "benchmark": "compress",
        "dataset": dataset.name,
        "dataset_options": {k: list(v) if isinstance(v, tuple) else v for k, v in (options or {}).items()},
        "model": {
            "filters": training.filters,
            "dense_units": training.dense_units,
            "epochs": training.epochs,
        },
        "n_samples": len(dataset.y),
        "input_shape": prepared.input_shape,
        # "published": the dataset's own train/test split (test accuracy on its test rows);
        # "drawn": a stratified 70/15/15 split fixed by --seed.
        "split": "published" if dataset.split is not None else "drawn",
        "n_train": len(prepared.splits.y_train),
        "n_val": len(prepared.splits.y_val),
        "n_test": len(prepared.splits.y_test),
        "preprocessing": prepared.preprocessing.model_dump(mode="json"),
        "cpu_count": os.cpu_count(),
        "train_seconds": round(train_seconds, 2),
        "pipeline_seconds": round(pipeline_seconds, 2),
        "variants": variants,
        "distillation": {
            "student_width": comp.student_width,
            "distilled_int8_accuracy": variants["distilled_int8"]["accuracy"],
            "scratch_int8_accuracy": round(scratch.evaluation.accuracy, 4),
            "distilled_int8_macro_f1": variants["distilled_int8"]["macro_f1"],
            "scratch_int8_macro_f1": round(scratch.evaluation.macro_f1, 4),
        },
        "ratios": {
            "int8_size_reduction": round(f32["size_bytes"] / i8["size_bytes"], 2),
            "int8_accuracy_drop_points": round(100 * (f32["accuracy"] - i8["accuracy"]), 2),
            "int8_b1_speedup": round(f32["latency_us_b1"] / i8["latency_us_b1"], 2),
            "pruned_int8_gzip_reduction": round(f32["gzip_bytes"] / pruned["gzip_bytes"], 2),
            "pruned_sparsity": pruned["sparsity"],
        },
    }
    r = out["ratios"]
    out["targets_met"] = {
        "int8_size_3.5x": r["int8_size_reduction"] >= 3.5,
        "int8_drop_le_1pt": r["int8_accuracy_drop_points"] <= 1.0,
        "int8_b1_1.5x_faster": r["int8_b1_speedup"] >= 1.5,
        "pruned_gzip_6x": r["pruned_int8_gzip_reduction"] >= 6.0 and r["pruned_sparsity"] >= 0.5,
        "pipeline_le_120s": pipeline_seconds <= 120,
    }
    return out


@click.command("compress")
@click.option(
    "--dataset",
    "dataset_spec",
    default="vibration",
    show_default=True,
    help="digits | basicmotions | vibration | aeon:NAME | PATH.npz (its 'split' is honoured)",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--n-windows", default=4000, show_default=True, help="size of the generated vibration dataset")
@click.option("--epochs", type=int, default=None, help="override the training epochs")
@click.option("--hard", is_flag=True, help="vibration: weak faults in noisy machines (a harder task)")
@click.option("--student-width", type=float, default=None, help="distilled student width (default 0.5)")
@click.option("--json", "as_json", is_flag=True, help="print only the JSON object (the default output too)")
def bench_compress(  # noqa: PLR0917 - click passes options positionally
    dataset_spec: str,
    seed: int,
    n_windows: int,
    epochs: int | None,
    hard: bool,
    student_width: float | None,
    as_json: bool,  # noqa: ARG001 - JSON is the only output; the flag is accepted for symmetry
) -> None:
    """Train once, build every variant, measure size, accuracy and LiteRT latency in one run."""
    try:
        result = run_compress_bench(
            dataset_spec,
            seed=seed,
            n_windows=n_windows,
            epochs=epochs,
            hard=hard,
            student_width=student_width,
        )
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, indent=2))
