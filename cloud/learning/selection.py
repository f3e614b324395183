"""Model selection by stratified k-fold cross-validation on the TRAIN part of a dataset.

A search scores a few candidates (``TrainingConfig`` objects: architecture and hyper-parameters); a
trial is one candidate trained on one fold, one Celery task (``edgefleet.learning.cv_trial``) whose
result goes to the registry (``selection_searches``, ``selection_trials``). Small trials spread well
over workers: more workers, a shorter search. The best candidate is the one with the highest mean
validation accuracy over its folds (ties: the smaller model, then the lower validation loss).

- No test row is ever seen: folds are cut from the train part only (the published train rows of a
  dataset with a ``split``; else the rows ``datasets.split`` does not hold out for testing).
- Each fold is normalised with its own training rows' per-channel statistics, as the final fit is.
- Idempotent trials: a trial already done (or skipped, or failed) is not trained again; a trial is
  claimed with a conditional update, so two deliveries of one task never both train it.
- Budget: a search with ``budget_s`` has a deadline; trials not started by then are skipped, and a
  trial started before gets the time left as its fit's ``max_seconds``.

``run_search`` (the driver) dispatches through a callable: the Celery app's ``send_task`` in
``cloud.worker.tasks``, or ``run_trial`` itself in-process. No Celery here."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cloud.errors import TrainingError
from cloud.learning import datasets, training
from cloud.learning.training import TrainingConfig
from cloud.registry import selection as registry
from cloud.registry.db import session_scope
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 3
MIN_FOLDS = 2
POLL_S = 0.5
GRACE_S = 120.0  # after the deadline: how long the driver waits for trials already running
NO_BUDGET_TIMEOUT_S = 24 * 3600.0
STALE_MARGIN_S = 60.0  # a running trial older than the task time limit plus this is reclaimed


class Candidate(BaseModel):
    """One configuration model selection tries: a name for reports and the training config."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    config: TrainingConfig


@dataclass
class TrialOutcome:
    """A trial as the registry holds it (what the task returns, what the driver scores)."""

    trial_id: int
    candidate: int
    fold: int
    status: str
    val_accuracy: float | None = None
    val_loss: float | None = None
    epochs_run: int | None = None
    params: int | None = None
    seconds: float | None = None
    worker: str | None = None
    pid: int | None = None
    error: str | None = None
    trained: bool = False  # this call trained it (False: it was done, taken or skipped already)

    def as_dict(self) -> dict[str, Any]:
        """The outcome as a plain dict (the Celery task's JSON result)."""
        return asdict(self)


@dataclass
class CandidateScore:
    """A candidate's cross-validation score over the folds that finished."""

    candidate: int
    name: str
    folds: int
    folds_done: int
    mean_accuracy: float | None
    std_accuracy: float | None
    mean_loss: float | None
    params: int | None
    seconds: float

    @property
    def complete(self) -> bool:
        """Every fold finished."""
        return self.folds_done == self.folds

    def as_dict(self) -> dict[str, Any]:
        """The score as a plain dict (reports, the search's stored result)."""
        return {**asdict(self), "complete": self.complete}


@dataclass
class SearchResult:
    """What ``run_search`` returns: the chosen candidate (None if no trial finished) and the scores."""

    search_id: int
    folds: int
    candidates: list[Candidate]
    scores: list[CandidateScore]
    best: int | None
    seconds: float
    trials: list[TrialOutcome] = field(default_factory=list)

    @property
    def best_candidate(self) -> Candidate | None:
        """The chosen candidate."""
        return self.candidates[self.best] if self.best is not None else None

    @property
    def best_score(self) -> CandidateScore | None:
        """The chosen candidate's score."""
        return self.scores[self.best] if self.best is not None else None

    def status_counts(self) -> dict[str, int]:
        """How many trials ended in each status."""
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        return counts

    def workers(self) -> list[str]:
        """The workers that ran trials of this search (hostname and pid)."""
        return sorted({f"{t.worker}:{t.pid}" for t in self.trials if t.trained or t.status == "done"})


# -- the train part and its folds (pure) ----------------------------------------------------------


def train_part(
    dataset: datasets.Dataset, *, seed: int, normalize: datasets.NormalizePolicy = "fitted"
) -> tuple[np.ndarray, np.ndarray]:
    """The rows model selection may use, as model inputs, and their labels: the published train rows
    when the dataset has a ``split`` (0 train, 1 test), else train + validation of ``datasets.split``
    (its test rows held out). Fitted statistics are not applied here: each fold fits its own."""
    spec = datasets.input_spec(dataset, normalize=normalize, seed=seed)
    return datasets.train_rows(dataset, seed=seed, spec=spec)


def effective_folds(y: np.ndarray, folds: int) -> int:
    """``folds``, lowered so every class has a row in each fold's validation part (at least 2; a
    class with a single row cannot be stratified: then plain shuffled folds)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    smallest = int(counts[counts > 0].min()) if len(counts) else 0
    k = min(folds, len(y))
    if smallest >= MIN_FOLDS:
        k = min(k, smallest)
    if k < MIN_FOLDS:
        raise TrainingError(f"{len(y)} training rows are too few for {MIN_FOLDS}-fold cross-validation")
    return k


def fold_indices(y: np.ndarray, *, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train positions, validation positions) into ``y`` per fold: stratified and shuffled with
    ``seed``; every position is in exactly one validation part."""
    from sklearn.model_selection import KFold, StratifiedKFold  # noqa: PLC0415  (scikit-learn: slow import)

    y = np.asarray(y, dtype=np.int64)
    k = effective_folds(y, folds)
    counts = np.bincount(y)
    if counts[counts > 0].min() >= k:
        splitter: Any = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y)]
    splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)))]


def normalise_fold(
    x_train: np.ndarray, x_val: np.ndarray, *, normalize: str = "fitted"
) -> tuple[np.ndarray, np.ndarray]:
    """With ``fitted`` normalisation, both parts standardised with the fold's training rows'
    per-channel statistics (``per_series`` and ``none`` were applied, or not, by ``train_part``)."""
    if normalize != "fitted":
        return x_train, x_val
    mean, std = datasets.channel_stats(x_train)
    return datasets.normalize(x_train, mean, std), datasets.normalize(x_val, mean, std)


# -- candidates -----------------------------------------------------------------------------------


def candidates_for(
    input_shape: Sequence[int], n_train: int, n_classes: int, *, seed: int = 0
) -> list[Candidate]:
    """The configurations a search tries by default (``training.default_candidates``: the recipe
    first, so a budget that runs out still has it scored), seeded with ``seed``."""
    configs = training.default_candidates(list(input_shape), n_train, n_classes)
    return [
        Candidate(name=_candidate_name(c, i), config=c.model_copy(update={"seed": seed}))
        for i, c in enumerate(configs)
    ]


def _candidate_name(config: TrainingConfig, index: int) -> str:
    widths = "-".join(str(f) for f in config.filters)
    augmented = "+aug" if config.augment else ""  # the recipe and its unaugmented twin differ only there
    return f"{index}:{config.architecture}[{widths}]{augmented}"


# -- scoring (pure) -------------------------------------------------------------------------------


def score_candidates(
    candidates: Sequence[Candidate], trials: Sequence[TrialOutcome], *, folds: int
) -> list[CandidateScore]:
    """Each candidate's mean (and std) validation accuracy and loss over its done trials."""
    scores = []
    for index, candidate in enumerate(candidates):
        done = [
            t for t in trials if t.candidate == index and t.status == "done" and t.val_accuracy is not None
        ]
        accuracies = [float(t.val_accuracy) for t in done if t.val_accuracy is not None]
        losses = [float(t.val_loss) for t in done if t.val_loss is not None and math.isfinite(t.val_loss)]
        params = [t.params for t in done if t.params is not None]
        scores.append(
            CandidateScore(
                candidate=index,
                name=candidate.name,
                folds=folds,
                folds_done=len(done),
                mean_accuracy=float(np.mean(accuracies)) if accuracies else None,
                std_accuracy=float(np.std(accuracies)) if accuracies else None,
                mean_loss=float(np.mean(losses)) if losses else None,
                params=max(params) if params else None,
                seconds=float(sum(t.seconds or 0.0 for t in trials if t.candidate == index)),
            )
        )
    return scores


def pick_best(scores: Sequence[CandidateScore]) -> int | None:
    """The index of the best candidate: complete ones first (every fold done; else any with a done
    fold), highest mean accuracy, then the fewest parameters, the lowest loss, the earliest listed."""
    scored = [s for s in scores if s.mean_accuracy is not None]
    complete = [s for s in scored if s.complete]
    pool = complete or scored
    if not pool:
        return None
    best = min(
        pool,
        key=lambda s: (
            -round(s.mean_accuracy or 0.0, 9),
            s.params if s.params is not None else math.inf,
            s.mean_loss if s.mean_loss is not None else math.inf,
            s.candidate,
        ),
    )
    return best.candidate


# -- one trial (what the Celery task runs) --------------------------------------------------------


@lru_cache(maxsize=4)
def _cached_train_part(spec: str, seed: int, normalize: str) -> tuple[np.ndarray, np.ndarray, int]:
    dataset = datasets.load(spec, seed=seed)
    x, y = train_part(dataset, seed=seed, normalize=normalize)  # type: ignore[arg-type]
    return x, y, len(dataset.class_names)


def load_train_part(spec: str, *, seed: int, normalize: str = "fitted") -> tuple[np.ndarray, np.ndarray, int]:
    """The train part of the dataset ``spec`` and its class count, loaded once per process."""
    return _cached_train_part(spec, seed, normalize)


def _outcome(trial: Any, *, trained: bool = False) -> TrialOutcome:
    return TrialOutcome(
        trial_id=trial.id,
        candidate=trial.candidate,
        fold=trial.fold,
        status=trial.status,
        val_accuracy=trial.val_accuracy,
        val_loss=trial.val_loss,
        epochs_run=trial.epochs_run,
        params=trial.params,
        seconds=trial.seconds,
        worker=trial.worker,
        pid=trial.pid,
        error=trial.error,
        trained=trained,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reclaimable(trial: Any, *, worker: str, stale_after_s: float, now: float) -> bool:
    """A running trial may be taken over: our own earlier attempt (a retried task), a claimer on this
    machine whose process is gone (a redelivered task after a worker died), or a claim too old."""
    if trial.worker == worker and trial.pid == os.getpid():
        return True
    host = (trial.worker or "").rsplit("@", 1)[-1]
    if host == socket.gethostname() and trial.pid is not None and not _pid_alive(trial.pid):
        return True
    return trial.started_at is not None and now - trial.started_at > stale_after_s


def run_trial(settings: CloudSettings, trial_id: int, *, worker: str | None = None) -> TrialOutcome:
    """Train and score one trial, once: a trial already finished is returned as it is, one another
    worker holds is left to it, one whose search ran out of time is skipped."""
    worker = worker or socket.gethostname()
    url = settings.resolved_database_url
    now = time.time()
    with session_scope(url) as session:
        trial = registry.get_trial(session, trial_id=trial_id)
        search = registry.get_search(session, search_id=trial.search_id)
        if trial.status in registry.TERMINAL:
            return _outcome(trial)
        if search.deadline_at is not None and now >= search.deadline_at:
            registry.skip_pending(
                session, search_id=search.id, trial_id=trial_id, reason="not started within the budget"
            )
            session.flush()
            session.refresh(trial)
            return _outcome(trial)
        stale_after = settings.task_time_limit_s + STALE_MARGIN_S
        if trial.status == "running" and not _reclaimable(
            trial, worker=worker, stale_after_s=stale_after, now=now
        ):
            return _outcome(trial)
        attempts = trial.attempts
        claimed = registry.claim_trial(
            session,
            trial_id=trial_id,
            attempts=attempts,
            from_status=trial.status,
            worker=worker,
            pid=os.getpid(),
        )
        spec, seed, deadline = search.dataset, search.seed, search.deadline_at
        folds, normalize = search.folds, str(search.options.get("normalize", "fitted"))
        config = Candidate.model_validate(search.candidates[trial.candidate]).config
        fold = trial.fold
    if not claimed:
        with session_scope(url) as session:
            return _outcome(registry.get_trial(session, trial_id=trial_id))
    token = attempts + 1
    start = time.perf_counter()
    try:
        fit = _fit_fold(
            config, spec=spec, seed=seed, folds=folds, fold=fold, deadline=deadline, normalize=normalize
        )
    except Exception as exc:
        logger.exception("selection trial %d (%s fold %d) failed", trial_id, spec, fold)
        with session_scope(url) as session:
            registry.finish_trial(
                session,
                trial_id=trial_id,
                attempts=token,
                status="failed",
                seconds=time.perf_counter() - start,
                error=f"{type(exc).__name__}: {exc}"[:2000],
            )
    else:
        with session_scope(url) as session:
            registry.finish_trial(session, trial_id=trial_id, attempts=token, status="done", **fit)
        logger.info(
            "selection trial %d fold %d: val accuracy %.4f in %.1f s (%d epochs)",
            trial_id,
            fold,
            fit["val_accuracy"],
            fit["seconds"],
            fit["epochs_run"],
        )
    with session_scope(url) as session:
        return _outcome(registry.get_trial(session, trial_id=trial_id), trained=True)


def _fit_fold(
    config: TrainingConfig,
    *,
    spec: str,
    seed: int,
    folds: int,
    fold: int,
    deadline: float | None,
    normalize: str = "fitted",
) -> dict[str, Any]:
    """Train ``config`` on one fold of the train part; validation accuracy and loss on the fold's
    held-out rows (also what early stopping watches, the same for every candidate)."""
    x, y, n_classes = load_train_part(spec, seed=seed, normalize=normalize)
    parts = fold_indices(y, folds=folds, seed=seed)
    if fold >= len(parts):
        raise TrainingError(f"fold {fold} of {len(parts)}: the search's data changed since it was created")
    train_pos, val_pos = parts[fold]
    x_train, x_val = normalise_fold(x[train_pos], x[val_pos], normalize=normalize)
    y_train, y_val = y[train_pos], y[val_pos]
    if deadline is not None:
        left = max(1.0, deadline - time.time())
        limit = min(config.max_seconds, left) if config.max_seconds else left
        config = config.model_copy(update={"max_seconds": limit})
    start = time.perf_counter()
    result = training.fit_classifier(config, x_train, y_train, x_val, y_val, n_classes=n_classes)
    probabilities = training.predict(result.model, x_val)
    predicted = probabilities.argmax(axis=1)
    picked = np.clip(probabilities[np.arange(len(y_val)), y_val], 1e-7, 1.0)
    return {
        "val_accuracy": float(np.mean(predicted == y_val)),
        "val_loss": float(-np.mean(np.log(picked))),
        "epochs_run": int(result.epochs_run),
        "params": training.count_params(result.model),
        "seconds": time.perf_counter() - start,
    }


# -- the driver -----------------------------------------------------------------------------------


def run_search(
    settings: CloudSettings,
    *,
    dataset: str,
    candidates: Sequence[Candidate],
    dispatch: Callable[[int], Any],
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    budget_s: float | None = None,
    normalize: str = "fitted",
    name: str | None = None,
    grace_s: float = GRACE_S,
    timeout_s: float | None = None,
    poll_s: float = POLL_S,
) -> SearchResult:
    """Create the search's rows, ``dispatch`` every trial id (candidate-major), wait until every trial
    has finished or been skipped, and pick the best candidate. At the budget's end the trials not
    started are skipped; trials still running ``grace_s`` later (or at ``timeout_s``) are abandoned."""
    if not candidates:
        raise TrainingError("model selection needs at least one candidate")
    _x, y, _n = load_train_part(dataset, seed=seed, normalize=normalize)
    k = effective_folds(y, folds)
    url = settings.resolved_database_url
    start = time.time()
    with session_scope(url) as session:
        search = registry.create_search(
            session,
            name=name or dataset,
            dataset=dataset,
            seed=seed,
            folds=k,
            candidates=[c.model_dump(mode="json") for c in candidates],
            options={"normalize": normalize},
            budget_s=budget_s,
        )
        search_id = search.id
        registry.start_search(
            session, search_id=search_id, deadline_at=start + budget_s if budget_s else None
        )
        trial_ids = [t.id for t in registry.list_trials(session, search_id=search_id)]
    logger.info(
        "selection search %d on %s: %d candidates x %d folds, budget %s",
        search_id,
        dataset,
        len(candidates),
        k,
        f"{budget_s:.1f} s" if budget_s else "none",
    )
    try:
        for trial_id in trial_ids:
            dispatch(trial_id)
    except Exception as exc:
        with session_scope(url) as session:
            registry.skip_pending(session, search_id=search_id, reason=f"not dispatched: {exc}")
            registry.finish_search(
                session,
                search_id=search_id,
                state="failed",
                best_candidate=None,
                best_score=None,
                result={},
                error=f"dispatch failed: {type(exc).__name__}: {exc}"[:2000],
            )
        raise
    outcomes = _wait(
        url,
        search_id,
        deadline=start + budget_s if budget_s else None,
        give_up=start + (timeout_s or ((budget_s + grace_s) if budget_s else NO_BUDGET_TIMEOUT_S)),
        poll_s=poll_s,
    )
    scores = score_candidates(candidates, outcomes, folds=k)
    best = pick_best(scores)
    seconds = time.time() - start
    result = SearchResult(search_id, k, list(candidates), scores, best, seconds, outcomes)
    with session_scope(url) as session:
        registry.finish_search(
            session,
            search_id=search_id,
            state="done" if best is not None else "failed",
            best_candidate=best,
            best_score=scores[best].mean_accuracy if best is not None else None,
            result={
                "scores": [s.as_dict() for s in scores],
                "trials": result.status_counts(),
                "seconds": seconds,
            },
            error=None if best is not None else "no trial finished",
        )
    if best is not None:
        logger.info(
            "selection search %d: chose %s (CV accuracy %.4f over %d folds) in %.1f s",
            search_id,
            candidates[best].name,
            scores[best].mean_accuracy,
            scores[best].folds_done,
            seconds,
        )
    else:
        logger.warning("selection search %d: no trial finished in %.1f s", search_id, seconds)
    return result


def _wait(
    url: str, search_id: int, *, deadline: float | None, give_up: float, poll_s: float
) -> list[TrialOutcome]:
    """Poll the registry until every trial is done, failed or skipped."""
    skipped = False
    while True:
        with session_scope(url) as session:
            trials = registry.list_trials(session, search_id=search_id)
            if all(t.status in registry.TERMINAL for t in trials):
                return [_outcome(t) for t in trials]
            now = time.time()
            if deadline is not None and now >= deadline and not skipped:
                count = registry.skip_pending(
                    session, search_id=search_id, reason="not started within the budget"
                )
                skipped = True
                if count:
                    logger.info("selection search %d: budget spent, %d trials skipped", search_id, count)
            if now >= give_up:
                registry.skip_pending(session, search_id=search_id, reason="search timed out")
                count = registry.abandon_running(
                    session, search_id=search_id, reason="no result before the search's timeout"
                )
                logger.warning("selection search %d: gave up waiting for %d running trials", search_id, count)
                skipped = True
        if now >= give_up:
            with session_scope(url) as session:
                return [_outcome(t) for t in registry.list_trials(session, search_id=search_id)]
        time.sleep(poll_s)
