"""The learning steps as plain functions over numpy and Keras, shared by the Celery tasks, the
``edgefleet model`` CLI and ``edgefleet bench compress``. No registry and no Celery here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloud.errors import DatasetError
from cloud.fleet.wave_gates import DEFAULT_GATES
from cloud.learning import compression, datasets
from cloud.learning.datasets import LengthPolicy, NormalizePolicy
from cloud.learning.evaluation import Evaluation, evaluate_tflite
from cloud.learning.training import (
    KNOWN_VARIANTS,
    CompressionConfig,
    EpochCallback,
    TrainingConfig,
    quiet_tensorflow,
    stdout_to_stderr,
    train_classifier,
)
from edge_node.preprocessing import InputSpec, WindowRejectedError, prepare_batch
from shared.schemas import Preprocessing

logger = logging.getLogger(__name__)

VariantCallback = Callable[[str], None]


class DeployConfig(BaseModel):
    """How ``publish`` sends the published model to ``deploy_edges``.

    ``direct``: every edge at once (``publish_desired_state``). ``rollout``: a staged rollout
    (``cloud.fleet.rollouts.start_rollout``): a canary of ``canary`` edges (a share of them when < 1), then
    ``waves`` more waves, each gated (``gates``: thresholds over ``cloud.fleet.wave_gates.DEFAULT_GATES``;
    ``params``: ``min_windows``, ``soak_s``); advanced by beat's ``edgefleet.rollouts.tick``.
    ``first_model``: how a model with no production predecessor is deployed; ``direct`` by default,
    since its gates would have no previous version to compare with, and a fleet that serves no model
    yet has no traffic to fill a canary's gates."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["direct", "rollout"] = "direct"
    canary: float = Field(default=1, ge=0, description="edges in the canary wave, or a share when < 1")
    waves: int = Field(default=1, ge=1, description="waves after the canary")
    gates: dict[str, float] = Field(default_factory=dict, description="gate thresholds over the defaults")
    params: dict[str, float] = Field(default_factory=dict, description="min_windows, soak_s")
    first_model: Literal["direct", "rollout"] = "direct"

    @field_validator("gates")
    @classmethod
    def _known_gates(cls, gates: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(gates) - set(DEFAULT_GATES))
        if unknown:
            raise ValueError(f"unknown gates {unknown}: choose from {sorted(DEFAULT_GATES)}")
        return gates

    @field_validator("params")
    @classmethod
    def _known_params(cls, params: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(params) - {"min_windows", "soak_s"})
        if unknown:
            raise ValueError(f"unknown rollout params {unknown}: choose from min_windows, soak_s")
        return params


class PreprocessingConfig(BaseModel):
    """How a run turns rows into model inputs; recorded in the signed manifest's ``preprocessing``
    and applied identically at the edge (``edge_node.preprocessing``)."""

    model_config = ConfigDict(extra="forbid")

    normalize: NormalizePolicy = Field(
        default="fitted",
        description="fitted: per-channel mean/std of the train part; per_series: each window z-normalised",
    )
    length: LengthPolicy = Field(
        default="pad", description="unequal-length data: pad at the end, or resample linearly"
    )
    input_length: int | None = Field(
        default=None,
        ge=1,
        description="unequal-length data: the model input length (None: the longest train row)",
    )


class PipelineConfig(BaseModel):
    """Everything a run needs, stored with the run in the registry (the lineage of its models)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(default="classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    dataset: str = Field(default="vibration", description="built-in name, .npz path, or 'samples'")
    n_windows: int = Field(default=4000, ge=10, description="size of a generated (vibration) dataset")
    drift: float = Field(default=0.0, ge=0)
    seed: int = 0
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    include_samples: bool = Field(
        default=False,
        description="add labelled uplinked samples (device, teacher or human labels) to the data",
    )
    deploy_variant: str = Field(default="int8", description="the variant gated, signed and published")
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    selection_search_id: int | None = Field(
        default=None,
        description="the model-selection search (selection_searches.id) that chose ``training``",
    )

    deploy_edges: list[str] = Field(default_factory=list, description="edges sent the model once published")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="how: direct or a staged rollout")

    @field_validator("deploy_variant")
    @classmethod
    def _known_variant(cls, variant: str) -> str:
        if variant not in KNOWN_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(KNOWN_VARIANTS)}")
        return variant


@dataclass
class Prepared:
    """A dataset split, brought to the model's input (``spec``: through the edge's own
    ``prepare_window``) and, with ``fitted`` normalisation, standardized with per-channel statistics
    of its training part (computed here when ``mean``/``std`` are not given)."""

    dataset: datasets.Dataset
    splits: datasets.Splits
    mean: list[float] | None = None
    std: list[float] | None = None
    spec: InputSpec | None = None
    x_train: np.ndarray = field(init=False)
    x_val: np.ndarray = field(init=False)
    x_test: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = datasets.input_spec(self.dataset, rows=self._rows("train", "val"))
        spec = self.spec
        raw_train = self._inputs("train")
        if spec.preprocessing.normalize == "fitted":
            if self.mean is None or self.std is None:
                self.mean, self.std = datasets.channel_stats(raw_train)
        else:
            self.mean = self.std = None  # the manifest must carry no fitted statistics then
        self.x_train = self.normalize(raw_train)
        self.x_val = self.normalize(self._inputs("val"))
        self.x_test = self.normalize(self._inputs("test"))

    def _rows(self, *parts: str) -> np.ndarray | None:
        found = [getattr(self.splits, f"{part}_index") for part in parts]
        if any(index is None for index in found):
            return None
        rows: np.ndarray = np.concatenate(found)
        return rows

    def _inputs(self, part: str) -> np.ndarray:
        """One part as model inputs: by row index when the splits have them (raw, maybe unequal
        rows), else the part's arrays as they are (already fixed-length, e.g. cross-validation folds)."""
        assert self.spec is not None
        index = getattr(self.splits, f"{part}_index")
        if index is not None:
            return datasets.inputs(self.dataset, index, self.spec)
        x = getattr(self.splits, f"x_{part}")
        return prepare_inputs(x, self.dataset.channels, self.spec)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Standardize inputs with this dataset's training statistics (fitted normalisation only)."""
        if self.mean is None or self.std is None:
            return np.asarray(x, dtype=np.float32)
        return datasets.normalize(x, self.mean, self.std)

    @property
    def preprocessing(self) -> Preprocessing:
        """What the manifest records as ``preprocessing``."""
        assert self.spec is not None
        return self.spec.preprocessing

    @property
    def input_shape(self) -> list[int]:
        """The model's input shape (without the batch dimension)."""
        assert self.spec is not None
        return list(self.spec.input_shape)

    @property
    def normalization(self) -> dict[str, list[float]] | None:
        """The manifest's ``normalization`` (fitted mean/std per channel), or None."""
        if self.mean is None or self.std is None:
            return None
        return {"mean": self.mean, "std": self.std}

    @property
    def n_classes(self) -> int:
        """How many classes the dataset names."""
        return len(self.dataset.class_names)

    def representative(self, n: int) -> np.ndarray:
        """The first ``n`` normalized training inputs: the int8 calibration data."""
        return self.x_train[:n]


def prepare_inputs(x: np.ndarray, channels: list[str] | None, spec: InputSpec) -> np.ndarray:
    """Fixed-shape rows through ``spec`` (channel order, per-series normalisation), as the edge does."""
    try:
        return prepare_batch(x, channels, spec)
    except WindowRejectedError as exc:
        raise DatasetError(str(exc)) from exc


def prepare(
    dataset: datasets.Dataset,
    *,
    seed: int,
    preprocessing: PreprocessingConfig | None = None,
    validation_fraction: float = 0.2,
) -> Prepared:
    """Split ``dataset`` (its published split when it has one; fixed by ``seed``), bring every part to
    the model's input as ``preprocessing`` says (default ``PreprocessingConfig()``) and, for
    ``fitted`` normalisation, standardize them with the training part's statistics."""
    config = preprocessing or PreprocessingConfig()
    splits = datasets.split(dataset, seed=seed, validation_fraction=validation_fraction)
    assert splits.train_index is not None
    assert splits.val_index is not None
    spec = datasets.input_spec(
        dataset,
        normalize=config.normalize,
        length=config.length,
        input_length=config.input_length,
        rows=np.concatenate([splits.train_index, splits.val_index]),
    )
    return Prepared(dataset=dataset, splits=splits, spec=spec)


def fit_rows(
    prepared: Prepared, config: TrainingConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows a final fit trains and validates on: with early stopping, the training part and the
    validation part; without it (the recipe on small datasets, whose validation part of 7-54 rows
    picked worse epochs than the fixed schedule), every train row and no validation. Test rows never:
    they are not in ``prepared.x_train``/``x_val``."""
    x_train, y_train = prepared.x_train, prepared.splits.y_train
    x_val, y_val = prepared.x_val, prepared.splits.y_val
    if config.early_stopping_patience or not len(y_val):
        return x_train, y_train, x_val, y_val
    return np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), x_val[:0], y_val[:0]


def train_base(prepared: Prepared, config: TrainingConfig, *, on_epoch: EpochCallback | None = None) -> Any:
    """Train the base float model on the prepared splits (``fit_rows``); every variant is derived from it."""
    x_train, y_train, x_val, y_val = fit_rows(prepared, config)
    return train_classifier(
        config, x_train, y_train, x_val, y_val, n_classes=prepared.n_classes, on_epoch=on_epoch
    )


@dataclass
class VariantResult:
    """One built variant: its flatbuffer, the Keras model it came from, its evaluation and build cost."""

    variant: str
    flatbuffer: bytes
    keras_model: Any
    evaluation: Evaluation
    sparsity: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        """The numbers stored as the model version's metrics: the evaluation, sparsity and build time."""
        data = {k: v for k, v in self.evaluation.as_dict().items() if isinstance(v, int | float)}
        data["sparsity"] = self.sparsity
        data["build_seconds"] = self.seconds
        return {k: float(v) for k, v in data.items()}


def compress_variant(
    variant: str,
    base_model: Any,
    prepared: Prepared,
    training: TrainingConfig,
    comp: CompressionConfig,
    *,
    on_epoch: EpochCallback | None = None,
    student_cache: dict[str, Any] | None = None,
) -> tuple[bytes, Any]:
    """The ``.tflite`` flatbuffer of one variant of ``base_model`` and the Keras model it came from."""
    quantization = compression.quantization_of(variant)
    model = base_model
    # The rows the base model was fitted on: a variant is compared with it on equal terms.
    x_train, y_train, x_val, y_val = fit_rows(prepared, training)
    if variant.startswith("pruned_"):
        model = compression.prune(
            base_model, training, comp, x_train, y_train, x_val, y_val, on_epoch=on_epoch
        )
    elif variant.startswith("distilled_"):
        cache = student_cache if student_cache is not None else {}
        if "distilled" not in cache:
            cache["distilled"] = compression.distill(
                base_model,
                training.scaled(comp.student_width),
                comp,
                x_train,
                y_train,
                x_val,
                y_val,
                n_classes=prepared.n_classes,
                on_epoch=on_epoch,
            )
        model = cache["distilled"]
    elif variant not in compression.QUANTIZATIONS:
        raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(compression.VARIANTS)}")
    flatbuffer = compression.convert(
        model, quantization, representative=prepared.representative(comp.representative_samples)
    )
    return flatbuffer, model


def evaluate(flatbuffer: bytes, prepared: Prepared) -> Evaluation:
    """Evaluate a flatbuffer on the held-out split with LiteRT."""
    return evaluate_tflite(flatbuffer, prepared.x_test, prepared.splits.y_test, n_classes=prepared.n_classes)


def build_variant(
    variant: str,
    base_model: Any,
    prepared: Prepared,
    training: TrainingConfig,
    comp: CompressionConfig,
    *,
    on_epoch: EpochCallback | None = None,
    student_cache: dict[str, Any] | None = None,
) -> VariantResult:
    """One compressed variant of ``base_model``, converted and evaluated with LiteRT."""
    start = time.perf_counter()
    flatbuffer, model = compress_variant(
        variant, base_model, prepared, training, comp, on_epoch=on_epoch, student_cache=student_cache
    )
    return VariantResult(
        variant=variant,
        flatbuffer=flatbuffer,
        keras_model=model,
        evaluation=evaluate(flatbuffer, prepared),
        sparsity=compression.sparsity_of(model),
        seconds=time.perf_counter() - start,
    )


def train_student_from_scratch(
    prepared: Prepared,
    training: TrainingConfig,
    comp: CompressionConfig,
    *,
    on_epoch: EpochCallback | None = None,
) -> VariantResult:
    """The distilled student's architecture trained on hard labels only: what distillation must beat."""
    start = time.perf_counter()
    config = training.scaled(comp.student_width)
    if comp.distill_epochs:
        config = config.model_copy(update={"epochs": comp.distill_epochs})
    x_train, y_train, x_val, y_val = fit_rows(prepared, config)
    model = train_classifier(
        config, x_train, y_train, x_val, y_val, n_classes=prepared.n_classes, on_epoch=on_epoch
    )
    flatbuffer = compression.convert(
        model, "int8", representative=prepared.representative(comp.representative_samples)
    )
    evaluation = evaluate_tflite(
        flatbuffer, prepared.x_test, prepared.splits.y_test, n_classes=prepared.n_classes
    )
    return VariantResult(
        "scratch_student_int8", flatbuffer, model, evaluation, 0.0, time.perf_counter() - start
    )


def save_keras(model: Any, path: Path) -> None:
    """Save a Keras model (a run's base model, which later variants start from)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with stdout_to_stderr():
        model.save(path)


def load_keras(path: Path) -> Any:
    """Load a saved Keras model, uncompiled, to compress or predict with."""
    quiet_tensorflow()
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only to read a model)

    return keras.models.load_model(path, compile=False)
