"""Keyword-only registry functions of model-selection searches and their trials (migration 0008).

Each takes a ``Session`` and leaves committing to the caller, like ``crud``. Status changes that
workers and the driver race for (claiming a pending trial, skipping the pending ones when the budget
runs out, recording a result) are conditional ``UPDATE``s, so exactly one of them wins on SQLite and
PostgreSQL alike."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud.errors import NotFoundError
from cloud.registry.models import SelectionSearch, SelectionTrial

TERMINAL = ("done", "failed", "skipped")


def create_search(
    session: Session,
    *,
    name: str,
    dataset: str,
    seed: int,
    folds: int,
    candidates: Sequence[dict[str, Any]],
    options: dict[str, Any] | None = None,
    budget_s: float | None = None,
) -> SelectionSearch:
    """A search and its trials, candidate-major (every fold of candidate 0, then candidate 1, ...), all
    pending: a budget that runs out leaves whole candidates unstarted, not every candidate half-scored."""
    search = SelectionSearch(
        name=name,
        dataset=dataset,
        seed=seed,
        folds=folds,
        candidates=list(candidates),
        options=options or {},
        budget_s=budget_s,
        state="pending",
        result={},
    )
    session.add(search)
    session.flush()
    for candidate in range(len(candidates)):
        for fold in range(folds):
            session.add(SelectionTrial(search_id=search.id, candidate=candidate, fold=fold, status="pending"))
    session.flush()
    return search


def get_search(session: Session, *, search_id: int) -> SelectionSearch:
    """The search with id ``search_id`` (``NotFoundError`` if there is none)."""
    search = session.get(SelectionSearch, search_id)
    if search is None:
        raise NotFoundError(f"selection search {search_id} does not exist")
    return search


def get_trial(session: Session, *, trial_id: int) -> SelectionTrial:
    """The trial with id ``trial_id`` (``NotFoundError`` if there is none)."""
    trial = session.get(SelectionTrial, trial_id)
    if trial is None:
        raise NotFoundError(f"selection trial {trial_id} does not exist")
    return trial


def list_trials(session: Session, *, search_id: int) -> list[SelectionTrial]:
    """The search's trials in dispatch order (candidate, then fold)."""
    return list(
        session.scalars(
            select(SelectionTrial)
            .where(SelectionTrial.search_id == search_id)
            .order_by(SelectionTrial.candidate, SelectionTrial.fold)
        )
    )


def start_search(session: Session, *, search_id: int, deadline_at: float | None) -> SelectionSearch:
    """Mark the search running, with the time after which pending trials are skipped."""
    search = get_search(session, search_id=search_id)
    search.state = "running"
    search.deadline_at = deadline_at
    session.flush()
    return search


def claim_trial(
    session: Session, *, trial_id: int, attempts: int, from_status: str, worker: str, pid: int
) -> bool:
    """Take the trial for this worker: only if it is still in ``from_status`` after ``attempts``
    claims (what the caller read). True when this call won; the trial is then ``running``, its
    ``attempts`` one more (the token ``finish_trial`` must show)."""
    result = session.execute(
        update(SelectionTrial)
        .where(
            SelectionTrial.id == trial_id,
            SelectionTrial.status == from_status,
            SelectionTrial.attempts == attempts,
        )
        .values(
            status="running",
            attempts=attempts + 1,
            worker=worker,
            pid=pid,
            started_at=time.time(),
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_trial(
    session: Session,
    *,
    trial_id: int,
    attempts: int,
    status: str,
    val_accuracy: float | None = None,
    val_loss: float | None = None,
    epochs_run: int | None = None,
    params: int | None = None,
    seconds: float | None = None,
    error: str | None = None,
) -> bool:
    """Record a running trial's outcome (``done``, ``failed`` or ``skipped``); only the claim that
    ``attempts`` names may (a trial claimed again since then keeps the newer claimer's result)."""
    if status not in TERMINAL:
        raise ValueError(f"a trial finishes as one of {', '.join(TERMINAL)}, not {status!r}")
    result = session.execute(
        update(SelectionTrial)
        .where(
            SelectionTrial.id == trial_id,
            SelectionTrial.status == "running",
            SelectionTrial.attempts == attempts,
        )
        .values(
            status=status,
            val_accuracy=val_accuracy,
            val_loss=val_loss,
            epochs_run=epochs_run,
            params=params,
            seconds=seconds,
            error=error,
            finished_at=time.time(),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def skip_pending(session: Session, *, search_id: int, reason: str, trial_id: int | None = None) -> int:
    """Mark the search's pending trials (or only ``trial_id``, if still pending) skipped; how many."""
    where = [SelectionTrial.search_id == search_id, SelectionTrial.status == "pending"]
    if trial_id is not None:
        where.append(SelectionTrial.id == trial_id)
    result = session.execute(
        update(SelectionTrial)
        .where(*where)
        .values(status="skipped", error=reason, finished_at=time.time())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def abandon_running(session: Session, *, search_id: int, reason: str) -> int:
    """Mark the search's still-running trials failed (the driver stopped waiting for them); how many.
    Their workers' late results are then refused by ``finish_trial`` (it records running trials only)."""
    result = session.execute(
        update(SelectionTrial)
        .where(SelectionTrial.search_id == search_id, SelectionTrial.status == "running")
        .values(status="failed", error=reason, finished_at=time.time())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def finish_search(
    session: Session,
    *,
    search_id: int,
    state: str,
    best_candidate: int | None,
    best_score: float | None,
    result: dict[str, Any],
    error: str | None = None,
) -> SelectionSearch:
    """Close the search with the chosen candidate, its mean CV accuracy and the per-candidate scores."""
    search = get_search(session, search_id=search_id)
    search.state = state
    search.best_candidate = best_candidate
    search.best_score = best_score
    search.result = result
    search.error = error
    search.finished_at = time.time()
    session.flush()
    return search


def list_searches(session: Session, *, limit: int = 50) -> list[SelectionSearch]:
    """The newest searches, newest first."""
    return list(session.scalars(select(SelectionSearch).order_by(SelectionSearch.id.desc()).limit(limit)))
