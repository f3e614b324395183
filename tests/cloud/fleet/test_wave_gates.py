"""Pure logic of the rollout gates and wave planning (no I/O)."""

from __future__ import annotations

import pytest

from cloud.fleet import wave_gates as gates
from cloud.registry.fleet import plan_waves


def _rec(
    windows: int,
    errors: int = 0,
    labelled: int = 0,
    correct: int = 0,
    hist: list[int] | None = None,
    p95: float = 1.0,
) -> dict[str, object]:
    return {
        "windows_total": windows,
        "errors_total": errors,
        "dead_letters_total": 0,
        "labelled_windows": labelled,
        "labelled_correct": correct,
        "confidence_histogram": hist or [0] * 10,
        "inference_latency": {"p95_ms": p95},
    }


def test_window_deltas_and_restart() -> None:
    w = gates.window_from_records(
        "e", [_rec(100, 1, 50, 40, [1] * 10), _rec(300, 3, 150, 120, [3] * 10, p95=2.5)]
    )
    assert w is not None
    assert (w.windows, w.errors, w.labelled, w.correct) == (200, 2, 100, 80)
    assert w.confidence_histogram == [2] * 10
    assert w.p95_latency_ms == 2.5
    restarted = gates.window_from_records("e", [_rec(1000), _rec(40)])  # the counter went down
    assert restarted is not None
    assert restarted.windows == 40
    assert gates.window_from_records("e", [_rec(1)]) is None


def test_error_rate_waits_then_judges() -> None:
    few = gates.window_from_records("e", [_rec(0), _rec(10, 5)])
    assert few is not None
    assert gates.error_rate_gate([few], 0.02, min_windows=100).passed is None
    many = gates.window_from_records("e", [_rec(0), _rec(1000, 30)])
    assert many is not None
    result = gates.error_rate_gate([many], 0.02, min_windows=100)
    assert result.passed is False
    assert result.value == pytest.approx(0.03)


def test_confidence_shift_is_total_variation() -> None:
    assert gates.histogram_distance([1, 0], [0, 1]) == 1.0
    assert gates.histogram_distance([5, 5], [1, 1]) == 0.0
    high = gates.window_from_records("e", [_rec(0), _rec(200, hist=[0] * 9 + [200])])
    mixed = gates.window_from_records("e", [_rec(0), _rec(200, hist=[100] + [0] * 8 + [100])])
    assert high is not None
    assert mixed is not None
    down = gates.confidence_shift_gate([mixed], [high], 0.35, min_windows=100)
    assert down.passed is False
    assert down.value == pytest.approx(0.5)
    up = gates.confidence_shift_gate([high], [mixed], 0.35, min_windows=100)
    assert up.passed is True
    assert up.value == pytest.approx(0.5)
    assert gates.confidence_shift_gate([high], [mixed], 0.35, min_windows=1000).passed is None
    # Less confident but, on labelled windows, as accurate: another calibration, not a breach.
    held = gates.confidence_shift_gate([mixed], [high], 0.35, min_windows=100, accuracy_held=True)
    assert held.passed is True
    assert held.value == pytest.approx(0.5)
    assert "calibration" in held.detail


def test_accuracy_gates_against_previous() -> None:
    cand = gates.window_from_records("e", [_rec(0), _rec(200, labelled=200, correct=50)])
    prev = gates.window_from_records("e", [_rec(0), _rec(200, labelled=200, correct=190)])
    assert cand is not None
    assert prev is not None
    results = {
        r.name: r
        for r in gates.accuracy_gates([cand], [prev], max_drop=0.05, min_accuracy=0.0, min_windows=100)
    }
    assert results["accuracy_drop"].passed is False
    assert results["accuracy_drop"].value == pytest.approx(0.7)
    assert results["min_accuracy"].passed is True


def test_teacher_agreement() -> None:
    assert gates.teacher_agreement_gate([("a", "a")] * 3, 0.8).passed is None
    pairs = [("a", "a")] * 7 + [("a", "b")] * 3
    result = gates.teacher_agreement_gate(pairs, 0.8)
    assert result.passed is False
    assert result.value == pytest.approx(0.7)


def test_verdict_rules() -> None:
    ok = gates.GateResult("error_rate", True, 0.0, 0.02, "")
    waiting_required = gates.GateResult("p95_latency_ms", None, None, 50, "")
    waiting_quality = gates.GateResult("teacher_agreement", None, None, 0.8, "")
    breach = gates.GateResult("accuracy_drop", False, 0.5, 0.05, "x")
    assert gates.verdict([ok, breach], quality_data_ready=False).decision == "breach"
    assert "accuracy_drop=0.5" in gates.verdict([ok, breach], quality_data_ready=True).reason()
    assert gates.verdict([ok, waiting_required], quality_data_ready=True).decision == "wait"
    assert gates.verdict([ok, waiting_quality], quality_data_ready=False).decision == "wait"
    assert gates.verdict([ok, waiting_quality], quality_data_ready=True).decision == "pass"


def test_parse_gates() -> None:
    parsed = gates.parse_gates(["error_rate=0.1"])
    assert parsed["error_rate"] == 0.1
    assert parsed["p95_latency_ms"] == gates.DEFAULT_GATES["p95_latency_ms"]
    with pytest.raises(ValueError, match="NAME=THRESHOLD"):
        gates.parse_gates(["nope=1"])
    with pytest.raises(ValueError, match="not a number"):
        gates.parse_gates(["error_rate=x"])


@pytest.mark.parametrize(
    ("n", "canary", "waves", "expected"),
    [
        (4, 1, 2, [1, 2, 1]),
        (10, 0.2, 2, [2, 4, 4]),
        (3, 0, 1, [3]),
        (1, 1, 3, [1]),
        (5, 0.01, 4, [1, 1, 1, 1, 1]),
    ],
)
def test_plan_waves(n: int, canary: float, waves: int, expected: list[int]) -> None:
    edges = [f"e{i}" for i in range(n)]
    plan = plan_waves(edges, canary=canary, waves=waves)
    assert [len(w) for w in plan] == expected
    assert [e for w in plan for e in w] == edges


def test_a_refused_order_is_a_deploy_failure_named_as_refused() -> None:
    result = gates.deploy_gate(["edge-x"], 0, refused=["edge-x"])
    assert result.passed is False
    assert result.detail == "deployment failed on edge-x (order refused by edge-x)"
    assert gates.deploy_gate([], 0).passed is True
