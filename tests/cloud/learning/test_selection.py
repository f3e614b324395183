"""Model selection: folds cut from the train part only, scoring and the choice, and the registry rows
of searches and trials (claims, fencing, skips) on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.errors import TrainingError
from cloud.learning import datasets, selection
from cloud.learning.selection import Candidate, CandidateScore, TrialOutcome
from cloud.learning.training import TrainingConfig
from cloud.registry import selection as registry
from cloud.registry.db import session_scope

TEST_MARK = 1000.0


def _marked_dataset(n_train: int = 30, n_test: int = 40, n_classes: int = 3) -> datasets.Dataset:
    """Train rows hold values < 10, test rows >= TEST_MARK: any test row in a fold shows."""
    rng = np.random.default_rng(0)
    n = n_train + n_test
    x = rng.normal(0, 1, (n, 16, 2)).astype(np.float32)
    split = np.array([0] * n_train + [1] * n_test, dtype=np.int8)
    x[split == 1] += TEST_MARK
    y = np.arange(n) % n_classes
    return datasets.Dataset(
        name="marked",
        source="test",
        X=x,
        y=y.astype(np.int64),
        class_names=[str(i) for i in range(n_classes)],
        split=split,
    )


def test_folds_come_from_the_train_rows_only() -> None:
    dataset = _marked_dataset()
    x, y = selection.train_part(dataset, seed=0)
    assert len(x) == 30
    assert float(np.abs(x).max()) < TEST_MARK / 2
    folds = selection.fold_indices(y, folds=3, seed=0)
    assert len(folds) == 3
    seen = np.concatenate([val for _train, val in folds])
    assert sorted(seen.tolist()) == list(range(30))  # each train row validates exactly once
    for train_pos, val_pos in folds:
        assert not set(train_pos) & set(val_pos)
        assert set(np.bincount(y[val_pos], minlength=3)) <= {3, 4}  # stratified: 10 rows per class
        x_train, x_val = selection.normalise_fold(x[train_pos], x[val_pos])
        assert float(np.abs(x_train.mean(axis=(0, 1))).max()) < 1e-5  # the fold's own statistics
        assert float(np.abs(x_val).max()) < 50


def test_without_a_published_split_the_drawn_test_part_stays_out() -> None:
    dataset = _marked_dataset()
    dataset.split = None
    x, y = selection.train_part(dataset, seed=3)
    parts = datasets.split(dataset, seed=3)
    assert len(x) == len(parts.y_train) + len(parts.y_val)
    test_rows = {row.tobytes() for row in parts.x_test}
    assert not any(row.tobytes() in test_rows for row in x)
    assert len(y) == len(x)


def test_fold_count_is_lowered_for_tiny_classes() -> None:
    y = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    assert selection.effective_folds(y, 5) == 2
    assert len(selection.fold_indices(y, folds=5, seed=0)) == 2
    single = np.array([0, 1, 1, 1, 1, 1])  # class 0 has one row: plain shuffled folds
    assert len(selection.fold_indices(single, folds=3, seed=0)) == 3
    with pytest.raises(TrainingError, match="too few"):
        selection.effective_folds(np.array([0]), 3)


def _candidates(n: int) -> list[Candidate]:
    return [Candidate(name=f"c{i}", config=TrainingConfig(filters=[4 * (i + 1)])) for i in range(n)]


def _trial(
    candidate: int, fold: int, accuracy: float | None, *, params: int = 100, status: str = "done"
) -> TrialOutcome:
    return TrialOutcome(
        trial_id=candidate * 10 + fold,
        candidate=candidate,
        fold=fold,
        status=status,
        val_accuracy=accuracy,
        val_loss=1.0 - (accuracy or 0.0),
        params=params,
        seconds=1.0,
    )


def test_best_mean_accuracy_wins_and_ties_go_to_the_smaller_model() -> None:
    trials = [
        _trial(0, 0, 0.9, params=500),
        _trial(0, 1, 1.0, params=500),
        _trial(1, 0, 1.0, params=200),
        _trial(1, 1, 0.9, params=200),
        _trial(2, 0, 0.8),
        _trial(2, 1, 0.8),
    ]
    scores = selection.score_candidates(_candidates(3), trials, folds=2)
    assert [s.mean_accuracy for s in scores] == pytest.approx([0.95, 0.95, 0.8])
    assert selection.pick_best(scores) == 1  # same mean, fewer parameters


def test_complete_candidates_beat_partly_scored_ones() -> None:
    trials = [
        _trial(0, 0, 0.8),
        _trial(0, 1, 0.8),
        _trial(1, 0, 1.0),
        _trial(1, 1, None, status="skipped"),
    ]
    scores = selection.score_candidates(_candidates(2), trials, folds=2)
    assert not scores[1].complete
    assert selection.pick_best(scores) == 0
    # Nobody complete: the best partly scored candidate.
    partial = [_trial(0, 0, 0.7), _trial(1, 0, 0.9)]
    assert selection.pick_best(selection.score_candidates(_candidates(2), partial, folds=2)) == 1
    empty = [CandidateScore(0, "c0", 2, 0, None, None, None, None, 0.0)]
    assert selection.pick_best(empty) is None


def test_default_candidates_are_named_and_seeded() -> None:
    candidates = selection.candidates_for([128, 1], 50, 2, seed=7)
    assert len(candidates) >= 2
    assert all(c.config.seed == 7 for c in candidates)
    assert len({c.name for c in candidates}) == len(candidates)


# -- the registry rows, on SQLite and PostgreSQL -----------------------------------------------------


def _search(url: str, *, candidates: int = 2, folds: int = 2) -> int:
    with session_scope(url) as s:
        search = registry.create_search(
            s,
            name="t",
            dataset="aeon:GunPoint",
            seed=0,
            folds=folds,
            candidates=[c.model_dump(mode="json") for c in _candidates(candidates)],
            budget_s=60.0,
        )
        registry.start_search(s, search_id=search.id, deadline_at=123.0)
        return search.id


def test_search_rows_claims_and_fencing(db_url: str) -> None:
    search_id = _search(db_url)
    with session_scope(db_url) as s:
        trials = registry.list_trials(s, search_id=search_id)
        assert [(t.candidate, t.fold, t.status) for t in trials] == [
            (0, 0, "pending"),
            (0, 1, "pending"),
            (1, 0, "pending"),
            (1, 1, "pending"),
        ]
        first = trials[0].id
        assert registry.get_search(s, search_id=search_id).deadline_at == 123.0
    with session_scope(db_url) as s:
        assert registry.claim_trial(
            s, trial_id=first, attempts=0, from_status="pending", worker="w1@h", pid=1
        )
    with session_scope(db_url) as s:  # a second delivery read the same row: it loses
        assert not registry.claim_trial(
            s, trial_id=first, attempts=0, from_status="pending", worker="w2@h", pid=2
        )
    with session_scope(db_url) as s:  # a stale claim is taken over: the first claimer is fenced off
        assert registry.claim_trial(
            s, trial_id=first, attempts=1, from_status="running", worker="w2@h", pid=2
        )
    with session_scope(db_url) as s:
        assert not registry.finish_trial(s, trial_id=first, attempts=1, status="done", val_accuracy=0.1)
        assert registry.finish_trial(
            s,
            trial_id=first,
            attempts=2,
            status="done",
            val_accuracy=0.9,
            val_loss=0.2,
            epochs_run=3,
            params=50,
        )
    with session_scope(db_url) as s:
        trial = registry.get_trial(s, trial_id=first)
        assert (trial.status, trial.val_accuracy, trial.worker, trial.attempts) == ("done", 0.9, "w2@h", 2)
        # Done is final: no claim, no second result.
        assert not registry.claim_trial(
            s, trial_id=first, attempts=2, from_status="running", worker="x", pid=3
        )
        assert not registry.finish_trial(s, trial_id=first, attempts=2, status="failed")
    with session_scope(db_url) as s:
        second = registry.list_trials(s, search_id=search_id)[1].id
        assert registry.claim_trial(
            s, trial_id=second, attempts=0, from_status="pending", worker="w1@h", pid=1
        )
        assert registry.skip_pending(s, search_id=search_id, reason="budget") == 2
        assert registry.abandon_running(s, search_id=search_id, reason="timeout") == 1
    with session_scope(db_url) as s:
        statuses = [t.status for t in registry.list_trials(s, search_id=search_id)]
        assert statuses == ["done", "failed", "skipped", "skipped"]
        registry.finish_search(
            s, search_id=search_id, state="done", best_candidate=0, best_score=0.9, result={"x": 1}
        )
    with session_scope(db_url) as s:
        search = registry.get_search(s, search_id=search_id)
        assert (search.state, search.best_candidate, search.result) == ("done", 0, {"x": 1})
        assert registry.list_searches(s)[0].id == search_id
    with pytest.raises(ValueError, match="finishes as"), session_scope(db_url) as s:
        registry.finish_trial(s, trial_id=first, attempts=2, status="running")
