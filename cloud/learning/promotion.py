"""The promotion gate: a candidate passes only if it matches or beats production within a margin."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a candidate may replace production, and why."""

    passed: bool
    reason: str


def decide(
    *,
    candidate_accuracy: float,
    production_accuracy: float | None,
    margin: float,
    min_accuracy: float = 0.0,
    production_ref: str | None = None,
) -> PromotionDecision:
    """Pure decision, with the reason stated either way (recorded in the registry)."""
    if candidate_accuracy < min_accuracy:
        return PromotionDecision(
            False, f"accuracy {candidate_accuracy:.4f} is below the floor {min_accuracy:.4f}"
        )
    if production_accuracy is None:
        return PromotionDecision(
            True, f"no production model yet; accuracy {candidate_accuracy:.4f} >= floor {min_accuracy:.4f}"
        )
    needed = production_accuracy - margin
    against = f"production {production_ref}" if production_ref else "production"
    if candidate_accuracy >= needed:
        return PromotionDecision(
            True,
            f"accuracy {candidate_accuracy:.4f} >= {against} {production_accuracy:.4f} - margin {margin:.4f}",
        )
    return PromotionDecision(
        False,
        f"accuracy {candidate_accuracy:.4f} < {against} {production_accuracy:.4f} - margin {margin:.4f}",
    )
