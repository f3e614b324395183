"""Health and quality gates of a rollout wave: pure functions over edge metrics and uplinked samples.

Each gate returns a ``GateResult``: ``passed`` is True/False, or None when there is not enough data yet
(a wave waits for data on its required gates; a quality gate with no data at all is recorded as skipped).
Edge metrics counters are cumulative per edge process, so a gate works on the difference between the
first and the last metrics message an edge sent while serving the candidate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Gate name -> default threshold. Ratios are in [0, 1]; latency in milliseconds.
DEFAULT_GATES: dict[str, float] = {
    "deploy_failures": 0,  # edges of the wave whose deployment failed
    "error_rate": 0.02,  # (errors + dead letters) / windows, at most
    "p95_latency_ms": 50.0,  # worst edge's inference p95, at most
    "confidence_shift": 0.35,  # total variation distance of confidence histograms vs previous (downwards)
    "teacher_agreement": 0.8,  # share of uplinked samples whose prediction the teacher agrees with, at least
    "accuracy_drop": 0.05,  # previous accuracy - candidate accuracy on labelled windows, at most
    "min_accuracy": 0.0,  # candidate accuracy on labelled windows, at least
}
REQUIRED_GATES = ("deploy_failures", "error_rate", "p95_latency_ms")
MIN_SAMPLES = 10  # uplinked samples needed before agreement counts


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome: passed (None while data is missing), the measured value, threshold and why."""

    name: str
    passed: bool | None
    value: float | None
    threshold: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict, as stored in ``rollouts.gate_results`` and shown by the CLI."""
        return asdict(self)


@dataclass(frozen=True)
class MetricsWindow:
    """Deltas of one edge's cumulative counters over the time it served one model version."""

    edge_id: str
    windows: int
    errors: int
    dead_letters: int
    labelled: int
    correct: int
    confidence_histogram: list[int]
    p95_latency_ms: float


def window_from_records(edge_id: str, records: Sequence[Mapping[str, Any]]) -> MetricsWindow | None:
    """The deltas between the first and last of ``records`` (EdgeMetrics dicts of one version, in time
    order). A counter that went down means the edge restarted: the last value alone is then used."""
    if len(records) < 2:
        return None
    first, last = records[0], records[-1]

    def delta(key: str) -> int:
        a, b = int(first.get(key, 0)), int(last.get(key, 0))
        return b - a if b >= a else b

    first_hist = list(first.get("confidence_histogram") or [])
    last_hist = list(last.get("confidence_histogram") or [])
    if len(first_hist) == len(last_hist) and all(b >= a for a, b in zip(first_hist, last_hist, strict=True)):
        hist = [b - a for a, b in zip(first_hist, last_hist, strict=True)]
    else:
        hist = last_hist
    latency = last.get("inference_latency") or {}
    return MetricsWindow(
        edge_id=edge_id,
        windows=delta("windows_total"),
        errors=delta("errors_total"),
        dead_letters=delta("dead_letters_total"),
        labelled=delta("labelled_windows"),
        correct=delta("labelled_correct"),
        confidence_histogram=hist,
        p95_latency_ms=float(latency.get("p95_ms", 0.0)),
    )


def deploy_gate(failed: Sequence[str], threshold: float, refused: Sequence[str] = ()) -> GateResult:
    """Breach when more of the wave's edges failed to deploy than ``threshold`` allows. ``refused``:
    those of ``failed`` that refused the order itself (signature, key, expiry, revision, downgrade):
    a refused order is a failure, never a deployment."""
    value = float(len(failed))
    detail = f"deployment failed on {', '.join(failed)}" if failed else "every edge of the wave deployed"
    if refused:
        detail += f" (order refused by {', '.join(refused)})"
    return GateResult("deploy_failures", value <= threshold, value, threshold, detail)


def error_rate_gate(windows: Sequence[MetricsWindow], threshold: float, min_windows: int) -> GateResult:
    """(Errors + dead letters) per window over the wave; waits until ``min_windows`` were seen."""
    total = sum(w.windows for w in windows)
    if total < min_windows:
        return GateResult("error_rate", None, None, threshold, f"{total} of {min_windows} windows seen")
    bad = sum(w.errors + w.dead_letters for w in windows)
    rate = bad / total
    return GateResult(
        "error_rate", rate <= threshold, rate, threshold, f"{bad} errors and dead letters in {total} windows"
    )


def latency_gate(windows: Sequence[MetricsWindow], threshold: float) -> GateResult:
    """The worst edge's inference p95 against ``threshold`` (ms); waits for the first metrics."""
    if not windows:
        return GateResult("p95_latency_ms", None, None, threshold, "no metrics yet")
    worst = max(windows, key=lambda w: w.p95_latency_ms)
    return GateResult(
        "p95_latency_ms",
        worst.p95_latency_ms <= threshold,
        worst.p95_latency_ms,
        threshold,
        f"worst inference p95 on {worst.edge_id}",
    )


def histogram_distance(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Total variation distance between two histograms over the same bins (0 same, 1 disjoint)."""
    if len(a) != len(b) or not a:
        return None
    sa, sb = sum(a), sum(b)
    if sa <= 0 or sb <= 0:
        return None
    return 0.5 * sum(abs(x / sa - y / sb) for x, y in zip(a, b, strict=True))


def _sum_hist(windows: Sequence[MetricsWindow]) -> list[int]:
    bins = max((len(w.confidence_histogram) for w in windows), default=0)
    total = [0] * bins
    for w in windows:
        if len(w.confidence_histogram) == bins:
            total = [t + c for t, c in zip(total, w.confidence_histogram, strict=True)]
    return total


def confidence_shift_gate(
    candidate: Sequence[MetricsWindow],
    previous: Sequence[MetricsWindow],
    threshold: float,
    min_windows: int,
    *,
    accuracy_held: bool = False,
) -> GateResult:
    """Total variation distance between the candidate's and the previous version's confidence histograms.

    The shift is a label-free proxy for quality. ``accuracy_held``: the accuracy gate judged enough
    labelled windows and found no drop; a shift down is then a change of calibration (another training
    run is less sure of itself while being as right), not a regression, and does not breach."""
    cand, prev = _sum_hist(candidate), _sum_hist(previous)
    if sum(prev) < min_windows:
        return GateResult("confidence_shift", None, None, threshold, "no baseline of the previous version")
    if sum(cand) < min_windows:
        return GateResult("confidence_shift", None, None, threshold, f"{sum(cand)} of {min_windows} windows")
    distance = histogram_distance(cand, prev)
    if distance is None:
        return GateResult("confidence_shift", None, None, threshold, "histograms differ in bins")
    before, after = histogram_mean(prev), histogram_mean(cand)
    # A shift towards higher confidence is what a better model does; only a shift down is a breach
    # (a model that got confidently wrong is the accuracy and teacher gates' job).
    passed = distance <= threshold or after >= before or accuracy_held
    detail = (
        f"total variation distance over {sum(cand)} vs {sum(prev)} windows; "
        f"mean confidence {before:.3f} -> {after:.3f}"
    )
    if distance > threshold and after < before and accuracy_held:
        detail += "; lower, but labelled accuracy held: a calibration change, not a breach"
    return GateResult("confidence_shift", passed, distance, threshold, detail)


def histogram_mean(counts: Sequence[int]) -> float:
    """Mean of a histogram over [0, 1] with equal bins, each at its centre."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    width = 1.0 / len(counts)
    return sum((i + 0.5) * width * c for i, c in enumerate(counts)) / total


def teacher_agreement_gate(pairs: Sequence[tuple[str, str]], threshold: float) -> GateResult:
    """``pairs``: (edge prediction, teacher label) of samples uplinked under the candidate."""
    if len(pairs) < MIN_SAMPLES:
        return GateResult(
            "teacher_agreement",
            None,
            None,
            threshold,
            f"{len(pairs)} of {MIN_SAMPLES} teacher-labelled samples",
        )
    agree = sum(1 for predicted, label in pairs if predicted == label)
    share = agree / len(pairs)
    return GateResult(
        "teacher_agreement", share >= threshold, share, threshold, f"{agree} of {len(pairs)} samples agree"
    )


def accuracy(windows: Sequence[MetricsWindow]) -> tuple[float | None, int]:
    """Share of labelled windows the edges got right, and how many there were (None, 0 without labels)."""
    labelled = sum(w.labelled for w in windows)
    if labelled == 0:
        return None, 0
    return sum(w.correct for w in windows) / labelled, labelled


def accuracy_gates(
    candidate: Sequence[MetricsWindow],
    previous: Sequence[MetricsWindow],
    *,
    max_drop: float,
    min_accuracy: float,
    min_windows: int,
) -> list[GateResult]:
    """``min_accuracy`` of the candidate, and its ``accuracy_drop`` against the previous version, on
    labelled windows; each waits until ``min_windows`` labelled windows were seen."""
    cand, n_cand = accuracy(candidate)
    prev, n_prev = accuracy(previous)
    results = []
    if cand is None or n_cand < min_windows:
        results.append(
            GateResult(
                "min_accuracy", None, None, min_accuracy, f"{n_cand} of {min_windows} labelled windows"
            )
        )
        results.append(GateResult("accuracy_drop", None, None, max_drop, "not enough labelled windows"))
        return results
    results.append(
        GateResult("min_accuracy", cand >= min_accuracy, cand, min_accuracy, f"{n_cand} labelled windows")
    )
    if prev is None or n_prev < min_windows:
        results.append(GateResult("accuracy_drop", None, None, max_drop, "no labelled baseline"))
    else:
        drop = prev - cand
        results.append(
            GateResult(
                "accuracy_drop",
                drop <= max_drop,
                drop,
                max_drop,
                f"accuracy {prev:.3f} -> {cand:.3f} ({n_prev} -> {n_cand} labelled windows)",
            )
        )
    return results


@dataclass(frozen=True)
class WaveVerdict:
    """``decision``: 'wait' (not enough data), 'pass' (next wave) or 'breach' (halt and roll back)."""

    decision: str
    results: list[GateResult]

    @property
    def breaches(self) -> list[GateResult]:
        """The gates that failed."""
        return [r for r in self.results if r.passed is False]

    def reason(self) -> str:
        """The breaches in one line (name, value vs threshold, detail), as recorded when a rollout halts."""
        return "; ".join(f"{r.name}={_fmt(r.value)} vs {r.threshold:g} ({r.detail})" for r in self.breaches)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def verdict(results: Sequence[GateResult], *, quality_data_ready: bool) -> WaveVerdict:
    """A breach anywhere halts. A required gate without data waits. Quality gates without data wait
    until ``quality_data_ready`` (enough windows or soak time), then count as skipped."""
    results = list(results)
    if any(r.passed is False for r in results):
        return WaveVerdict("breach", results)
    if any(r.passed is None and r.name in REQUIRED_GATES for r in results):
        return WaveVerdict("wait", results)
    if any(r.passed is None for r in results) and not quality_data_ready:
        return WaveVerdict("wait", results)
    return WaveVerdict("pass", results)


def parse_gates(items: Sequence[str]) -> dict[str, float]:
    """``NAME=THRESHOLD`` strings over the defaults; unknown names are an error naming them."""
    gates = dict(DEFAULT_GATES)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in DEFAULT_GATES:
            raise ValueError(
                f"gate {item!r}: expected NAME=THRESHOLD with NAME one of {sorted(DEFAULT_GATES)}"
            )
        try:
            gates[name] = float(value)
        except ValueError as exc:
            raise ValueError(f"gate {item!r}: threshold {value!r} is not a number") from exc
    return gates
