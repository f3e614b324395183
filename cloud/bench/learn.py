"""``edgefleet bench learn``: the learning recipe on real data with published splits, against the
published deep-learning baselines (Fawaz et al. 2019).

For each dataset: model selection by k-fold cross-validation on the train split, each trial a Celery
task run by ``--workers`` real worker processes (concurrency 1 each) against a private redis-server,
results in a registry (a SQLite file in a temporary directory, or ``--registry-url``); then the final
fit of the chosen candidate on the train split (its validation part carved from it), int8 conversion
with the representative data, float32 and int8 accuracy on the TEST split with LiteRT, the int8 size
and its batch-1 LiteRT latency. ``--compression`` adds pruned_int8 and distilled_int8 (off by
default: each is another training run per dataset)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

from shared.errors import BrokerError
from shared.private_broker import PrivateRedis

logger = logging.getLogger(__name__)

SUITES: Final[dict[str, tuple[str, ...]]] = {
    "ucr-small": (
        "aeon:ArrowHead",
        "aeon:GunPoint",
        "aeon:OSULeaf",
        "aeon:BasicMotions",
        "aeon:JapaneseVowels",
    ),
}
DL4TSC = "Fawaz et al. 2019, github.com/hfawaz/dl-4-tsc"
# Published test accuracy (%), standard train/test split, mean of 5 runs.
PUBLISHED: Final[dict[str, dict[str, Any]]] = {
    "ArrowHead": {"resnet": 84.5, "fcn": 84.3, "source": f"{DL4TSC} results/results-uea-avg-std.csv"},
    "GunPoint": {
        "resnet": 99.1,
        "fcn": 100.0,
        "source": f"{DL4TSC} results/results-uea-avg-std.csv (Gun_Point)",
    },
    "OSULeaf": {"resnet": 97.9, "fcn": 97.7, "source": f"{DL4TSC} results/results-uea-avg-std.csv"},
    "BasicMotions": {
        "resnet": 100.0,
        "fcn": 100.0,
        "source": "issue 12 (not in dl-4-tsc's multivariate archive)",
    },
    "JapaneseVowels": {"resnet": 99.2, "fcn": 99.3, "source": f"{DL4TSC} results/results-mts-avg-std.csv"},
}
TARGET_GAP_POINTS: Final = 2.0
TARGET_INT8_BYTES: Final = 512 * 1024
TARGET_SUITE_S: Final = 30 * 60
SEARCH_SHARE: Final = 0.5  # of --budget-s for the search; the final fit gets the rest (at least MIN_FINAL_S)
# Trials screen candidates at half the final fit's epochs (the cosine schedule shrinks with them):
# twice the trials in the budget; the chosen candidate is then fitted in full.
SEARCH_EPOCH_SHARE: Final = 0.5
MIN_FINAL_S: Final = 10.0
LATENCY_WARMUP: Final = 20
LATENCY_RUNS: Final = 300
REPRESENTATIVE: Final = 200
WORKER_READY_S: Final = 90.0
STOP_TIMEOUT_S: Final = 30.0


# -- the private Celery cluster --------------------------------------------------------------------


@dataclass
class Cluster:
    """A private redis-server, N Celery workers (concurrency 1 each) and a registry, in ``workdir``."""

    workdir: Path
    workers: int
    registry_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis: PrivateRedis | None = None
    redis_url: str = ""
    tf_threads: int = 1
    settings: Any = None
    app: Any = None

    def start(self) -> None:
        """Migrate the registry, start Redis and the workers, and wait until every worker answers."""
        from cloud.registry.db import upgrade  # noqa: PLC0415  (SQLAlchemy: not for --help)
        from cloud.worker.app import make_app  # noqa: PLC0415  (Celery: not for --help)
        from cloud.worker.process import worker_argv  # noqa: PLC0415  (with the app above)
        from shared.settings.cloud import CloudSettings  # noqa: PLC0415  (pydantic: not for --help)

        upgrade(self.registry_url)
        self.redis_url = self._start_redis()
        data_dir = self.workdir / "cloud"
        self.settings = CloudSettings(
            data_dir=data_dir, database_url=self.registry_url, redis_url=self.redis_url
        )
        self.tf_threads = max(1, (os.cpu_count() or 1) // self.workers)
        env = {
            **os.environ,
            "EDGEFLEET_DATA_DIR": str(data_dir),
            "EDGEFLEET_DATABASE_URL": self.registry_url,
            "EDGEFLEET_REDIS_URL": self.redis_url,
            "EDGEFLEET_TF_THREADS": str(self.tf_threads),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        for key in ("EDGEFLEET_CLOUD_CONFIG", "EDGEFLEET_CELERY_BROKER_URL", "EDGEFLEET_CELERY_RESULT_URL"):
            env.pop(key, None)
        for index in range(self.workers):
            with (self.workdir / f"worker-{index}.log").open("ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        worker_argv(f"learn-{index}@%h"),
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        self.app = make_app(self.settings)
        self._wait_workers()

    def _start_redis(self) -> str:
        self.redis = PrivateRedis(self.workdir / "redis")
        try:
            self.redis.start()
        except BrokerError as exc:
            self.redis = None
            raise click.ClickException(str(exc)) from exc
        return self.redis.url

    def _wait_workers(self) -> None:
        deadline = time.monotonic() + WORKER_READY_S
        while time.monotonic() < deadline:
            dead = [p.pid for p in self.procs if p.poll() is not None]
            if dead:
                raise click.ClickException(f"celery workers {dead} exited: {self.log_tail()}")
            replies = self.app.control.ping(timeout=1.0) or []
            if len(replies) >= self.workers:
                return
        raise click.ClickException(
            f"{self.workers} celery workers not ready in {WORKER_READY_S} s: {self.log_tail()}"
        )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the workers' logs (for errors)."""
        text = ""
        for path in sorted(self.workdir.glob("worker-*.log")):
            text += f"\n--- {path.name} ---\n" + path.read_text(errors="replace")[-chars:]
        return text

    def stop(self) -> None:
        """Warm shutdown of the workers (killed after ``STOP_TIMEOUT_S``), then Redis."""
        if self.app is not None:
            self.app.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()


@contextlib.contextmanager
def cluster(workdir: Path, *, workers: int, registry_url: str | None) -> Iterator[Cluster]:
    """A started ``Cluster`` (a SQLite registry in ``workdir`` unless ``registry_url``), stopped after."""
    running = Cluster(workdir, workers, registry_url or f"sqlite:///{workdir / 'registry.db'}")
    try:
        running.start()
        yield running
    finally:
        running.stop()


# -- one dataset -----------------------------------------------------------------------------------


def _accuracy(flatbuffer: bytes, x: Any, y: Any) -> float:
    import numpy as np  # noqa: PLC0415  (numpy: not for --help)

    from cloud.learning.evaluation import LiteRTModel  # noqa: PLC0415  (LiteRT: not for --help)

    predicted = LiteRTModel(flatbuffer).predict(x).argmax(axis=1)
    return float(np.mean(predicted == y)) if len(y) else 0.0


def batch1_latency_ms(flatbuffer: bytes, x: Any, *, runs: int = LATENCY_RUNS) -> dict[str, float]:
    """p50 and p99 of one LiteRT invoke at batch 1 (input set each time, as an edge does)."""
    import numpy as np  # noqa: PLC0415  (numpy: not for --help)

    from cloud.learning.evaluation import LiteRTModel  # noqa: PLC0415  (LiteRT: not for --help)

    model = LiteRTModel(flatbuffer)
    row = model.quantize_input(x[:1])
    for _ in range(LATENCY_WARMUP):
        model.invoke_raw(row)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter_ns()
        model.invoke_raw(row)
        times[i] = time.perf_counter_ns() - start
    return {
        "p50": round(float(np.percentile(times, 50)) / 1e6, 4),
        "p99": round(float(np.percentile(times, 99)) / 1e6, 4),
        "runs": runs,
    }


def _published(name: str) -> dict[str, Any] | None:
    return PUBLISHED.get(name)


def run_dataset(
    spec: str,
    running: Cluster,
    *,
    budget_s: float | None,
    folds: int,
    seed: int,
    normalize: str,
    epochs: int | None = None,
    with_compression: bool = False,
) -> dict[str, Any]:
    """Search, final fit, int8 conversion and test-split figures of one dataset."""
    from cloud.learning import compression, datasets, selection, training  # noqa: PLC0415  (TensorFlow: not for --help)
    from cloud.learning import pipeline as workflow  # noqa: PLC0415  (TensorFlow: not for --help)
    from cloud.worker.tasks import trial_dispatcher  # noqa: PLC0415  (Celery: not for --help)

    start = time.perf_counter()
    dataset = datasets.load(spec, seed=seed)
    preprocessing = workflow.PreprocessingConfig.model_validate({"normalize": normalize})
    prepared = workflow.prepare(dataset, seed=seed, preprocessing=preprocessing)
    y_train, y_val, y_test = prepared.splits.y_train, prepared.splits.y_val, prepared.splits.y_test
    n_train = len(y_train) + len(y_val)
    candidates = selection.candidates_for(prepared.input_shape, n_train, prepared.n_classes, seed=seed)
    if epochs:
        candidates = [
            c.model_copy(update={"config": c.config.model_copy(update={"epochs": epochs})})
            for c in candidates
        ]
    screening = [
        c.model_copy(
            update={
                "config": c.config.model_copy(
                    update={"epochs": max(1, round(c.config.epochs * SEARCH_EPOCH_SHARE))}
                )
            }
        )
        for c in candidates
    ]
    search = selection.run_search(
        running.settings,
        dataset=spec,
        candidates=screening,
        dispatch=trial_dispatcher(running.app),
        folds=folds,
        seed=seed,
        budget_s=budget_s * SEARCH_SHARE if budget_s else None,
        normalize=normalize,
        name=f"bench-learn:{dataset.name}",
    )
    chosen_index = search.best if search.best is not None else 0
    chosen = candidates[chosen_index]
    config = chosen.config
    if budget_s:
        left = max(MIN_FINAL_S, budget_s - (time.perf_counter() - start))
        config = config.model_copy(update={"max_seconds": min(config.max_seconds or math.inf, left)})
    fit_start = time.perf_counter()
    x_fit, y_fit, x_watch, y_watch = workflow.fit_rows(prepared, config)
    fit = training.fit_classifier(config, x_fit, y_fit, x_watch, y_watch, n_classes=prepared.n_classes)
    final_seconds = time.perf_counter() - fit_start
    float32 = compression.convert(fit.model, "float32")
    int8 = compression.convert(fit.model, "int8", representative=prepared.representative(REPRESENTATIVE))
    acc32 = _accuracy(float32, prepared.x_test, y_test)
    acc8 = _accuracy(int8, prepared.x_test, y_test)
    published = _published(dataset.name)
    gap: dict[str, float | None] = {
        "int8_vs_resnet": round(100 * acc8 - published["resnet"], 2) if published else None,
        "int8_vs_fcn": round(100 * acc8 - published["fcn"], 2) if published else None,
        "float32_vs_resnet": round(100 * acc32 - published["resnet"], 2) if published else None,
    }
    gap_resnet = gap["int8_vs_resnet"]
    best = search.best_score
    out: dict[str, Any] = {
        "dataset": dataset.name,
        "spec": spec,
        "n_train": len(y_train),
        "n_val": len(y_val),
        "n_test": len(y_test),
        "n_classes": prepared.n_classes,
        "input_shape": prepared.input_shape,
        "chosen": {
            "name": chosen.name,
            "config": config.model_dump(mode="json", exclude_defaults=True),
            "params": training.count_params(fit.model),
            "cv_accuracy": round(best.mean_accuracy, 4) if best and best.mean_accuracy is not None else None,
            "cv_std": round(best.std_accuracy, 4) if best and best.std_accuracy is not None else None,
            "cv_folds_done": best.folds_done if best else 0,
            "fallback": search.best is None,
        },
        "search": {
            "search_id": search.search_id,
            "folds": search.folds,
            "trials": search.status_counts(),
            "seconds": round(search.seconds, 2),
            "workers": search.workers(),
            "candidates": [
                {
                    "name": s.name,
                    "cv_accuracy": round(s.mean_accuracy, 4) if s.mean_accuracy is not None else None,
                    "folds_done": s.folds_done,
                    "params": s.params,
                    "seconds": round(s.seconds, 2),
                }
                for s in search.scores
            ],
        },
        "final_fit": {
            "seconds": round(final_seconds, 2),
            "rows": len(y_fit),
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            "stopped": fit.stopped,
        },
        "float32": {"accuracy": round(acc32, 4), "size_bytes": len(float32)},
        "int8": {
            "accuracy": round(acc8, 4),
            "size_bytes": len(int8),
            "size_kb": round(len(int8) / 1024, 1),
            "latency_ms_b1": batch1_latency_ms(int8, prepared.x_test),
        },
        "published": published,
        "gap_points": gap,
        "targets_met": {
            "int8_within_2pt_of_resnet": gap_resnet >= -TARGET_GAP_POINTS if gap_resnet is not None else None,
            "int8_le_512kb": len(int8) <= TARGET_INT8_BYTES,
        },
        "train_seconds": {"search": round(search.seconds, 2), "final": round(final_seconds, 2)},
    }
    if with_compression:
        out["compression"] = _compression(fit.model, prepared, config, acc8)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _compression(model: Any, prepared: Any, config: Any, acc8: float) -> dict[str, Any]:
    """pruned_int8 and distilled_int8 of the final model on the test split, against plain int8."""
    from cloud.learning import pipeline as workflow  # noqa: PLC0415  (TensorFlow: not for --help)
    from cloud.learning.training import CompressionConfig  # noqa: PLC0415  (TensorFlow: not for --help)

    comp = CompressionConfig()
    found: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for variant in ("pruned_int8", "distilled_int8"):
        result = workflow.build_variant(variant, model, prepared, config, comp, student_cache=cache)
        found[variant] = {
            "accuracy": round(result.evaluation.accuracy, 4),
            "vs_int8_points": round(100 * (result.evaluation.accuracy - acc8), 2),
            "size_bytes": result.evaluation.size_bytes,
            "gzip_bytes": result.evaluation.gzip_bytes,
            "sparsity": round(result.sparsity, 3),
            "seconds": round(result.seconds, 2),
        }
    return found


# -- the suite -------------------------------------------------------------------------------------


def run_learn_bench(
    specs: list[str],
    *,
    suite: str | None = None,
    workers: int = 1,
    budget_s: float | None = 300.0,
    folds: int = 3,
    seed: int = 0,
    normalize: str = "fitted",
    epochs: int | None = None,
    with_compression: bool = False,
    registry_url: str | None = None,
) -> dict[str, Any]:
    """Every dataset of ``specs`` on one private cluster: the JSON object ``bench learn`` prints."""
    load_before = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-learn-") as tmp,
        cluster(Path(tmp), workers=workers, registry_url=registry_url) as running,
    ):
        cluster_s = time.perf_counter() - start
        for spec in specs:
            logger.info("bench learn: %s", spec)
            try:
                results.append(
                    run_dataset(
                        spec,
                        running,
                        budget_s=budget_s,
                        folds=folds,
                        seed=seed,
                        normalize=normalize,
                        epochs=epochs,
                        with_compression=with_compression,
                    )
                )
            except Exception:
                logger.exception("bench learn: %s failed; workers said: %s", spec, running.log_tail(1500))
                raise
        tf_threads = running.tf_threads
    suite_seconds = time.perf_counter() - start
    within = [r["targets_met"]["int8_within_2pt_of_resnet"] for r in results]
    judged = [w for w in within if w is not None]
    return {
        "benchmark": "learn",
        "suite": suite,
        "datasets": results,
        "workers": workers,
        "worker_concurrency": 1,
        "tf_threads_per_worker": tf_threads,
        "budget_s": budget_s,
        "folds": folds,
        "seed": seed,
        "normalize": normalize,
        "epochs_override": epochs,
        "compression": with_compression,
        "registry": "postgresql" if registry_url and registry_url.startswith("postgres") else "sqlite",
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "cluster_start_s": round(cluster_s, 2),
        "suite_seconds": round(suite_seconds, 2),
        "targets_met": {
            "int8_within_2pt_of_resnet": all(judged) if judged else None,
            "int8_le_512kb": all(r["targets_met"]["int8_le_512kb"] for r in results),
            "suite_le_30min": suite_seconds <= TARGET_SUITE_S,
        },
    }


def _absolute(spec: str) -> str:
    """An ``.npz`` path made absolute: the workers load it from the search row."""
    return str(Path(spec).resolve()) if spec.endswith(".npz") else spec


@click.command("learn")
@click.option("--suite", type=click.Choice(sorted(SUITES)), default=None, help="ucr-small: 5 aeon datasets")
@click.option("--dataset", "dataset_spec", default=None, help="one dataset: FILE.npz or aeon:NAME")
@click.option(
    "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Celery worker processes"
)
@click.option(
    "--budget-s",
    type=float,
    default=300.0,
    show_default=True,
    help="per dataset (search and final fit); 0: none",
)
@click.option(
    "--folds",
    type=click.IntRange(2, 10),
    default=3,
    show_default=True,
    help="CV folds (fewer on tiny classes)",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--normalize", type=click.Choice(["fitted", "per_series", "none"]), default="fitted", show_default=True
)
@click.option(
    "--epochs", type=click.IntRange(1), default=None, help="cap every candidate's epochs (smoke runs)"
)
@click.option("--compression", "with_compression", is_flag=True, help="also pruned_int8 and distilled_int8")
@click.option("--registry-url", default=None, help="registry database (default: SQLite in a temp dir)")
@click.option("--json", "as_json", is_flag=True, help="print only the JSON object (the default output too)")
def bench_learn(  # noqa: PLR0917 - click passes options positionally
    suite: str | None,
    dataset_spec: str | None,
    workers: int,
    budget_s: float,
    folds: int,
    seed: int,
    normalize: str,
    epochs: int | None,
    with_compression: bool,
    registry_url: str | None,
    as_json: bool,  # noqa: ARG001 - JSON is the only output; the flag is accepted for symmetry
) -> None:
    """Model selection on Celery workers, final fit, int8, test accuracy vs published baselines."""
    from cloud.errors import CloudError  # noqa: PLC0415  (not for --help)

    if (suite is None) == (dataset_spec is None):
        raise click.UsageError("give one of --suite or --dataset")
    specs = list(SUITES[suite]) if suite else [_absolute(str(dataset_spec))]
    try:
        result = run_learn_bench(
            specs,
            suite=suite,
            workers=workers,
            budget_s=budget_s if budget_s > 0 else None,
            folds=folds,
            seed=seed,
            normalize=normalize,
            epochs=epochs,
            with_compression=with_compression,
            registry_url=registry_url,
        )
    except CloudError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, indent=2))
