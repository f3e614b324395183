"""The rollout engine: canary cohort, then waves, each gated on health and quality; a breach halts the
rollout and rolls the edges that received the model back to last-good, with the reason recorded.

All state lives in the registry (``rollouts`` / ``rollout_targets``); ``tick`` recomputes everything
from it, so it is idempotent and a restarted cloud resumes where it was. Celery beat runs the
``edgefleet.rollouts.tick`` task every ``TICK_S``; the CLI may also tick in-process."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from cloud.errors import PublishError, RolloutError
from cloud.fleet import wave_gates as gatelib
from cloud.fleet.desired_state import order_action, publish_desired, running_manifest, signed_order
from cloud.fleet.keyring import publish_if_needed
from cloud.registry import crud, fleet
from cloud.registry.db import has_changes, session_scope
from cloud.registry.models import ModelVersion, Rollout, RolloutTarget
from shared.mqtt import MqttLink
from shared.schemas import DesiredAction, DesiredState, ModelManifest
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

TICK_S = float(os.environ.get("EDGEFLEET_ROLLOUT_TICK_S", "2.0"))
LEASE_S = 60.0
REPUBLISH_S = 15.0  # a deploying edge with no progress gets its retained desired state again
RESULTS_EVERY_S = 2.0  # while a wave waits, its gate values are stored at most this often
BASELINE_S = 600.0  # metrics of the previous version this long before the rollout form the baseline
DEFAULT_PARAMS: dict[str, Any] = {"min_windows": 200, "soak_s": 30.0}


class Publisher:
    """Publishes desired states through one MQTT link opened on first use (ticks that publish nothing
    open nothing)."""

    def __init__(self, settings: CloudSettings, link: MqttLink | None = None) -> None:
        self.settings = settings
        self._link = link
        self._own = link is None
        self._ring_checked = False

    def send(self, desired: DesiredState) -> None:
        """Publish one desired state (retained, QoS1, PUBACK awaited), opening the link on first use.
        The key ring goes first if the broker has not acknowledged its latest announcement."""
        if self._link is None:
            self._link = MqttLink(
                self.settings.broker,
                client_id=f"edgefleet-rollouts-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            )
            self._link.connect()
        if not self._ring_checked:
            publish_if_needed(self.settings, self._link)
            self._ring_checked = True
        publish_desired(link=self._link, topics=self.settings.broker.topics, desired=desired)

    def close(self) -> None:
        """Stop the link if this publisher opened it."""
        if self._own and self._link is not None:
            self._link.stop()
            self._link = None


# -- desired state ---------------------------------------------------------------------------------


def _manifest(model: ModelVersion) -> ModelManifest:
    if model.manifest is None or model.signature is None:
        raise RolloutError(f"model {model.ref} is not signed and published; it cannot be deployed")
    return ModelManifest.model_validate(model.manifest)


def _order(
    session: Session,
    settings: CloudSettings,
    *,
    edge_id: str,
    action: DesiredAction,
    model: ModelVersion | None,
    rollout_id: str | None,
    rollback_to: str | None = None,
) -> DesiredState:
    """Allocate the edge's next revision, sign the order and record it (desired state and deployment
    target). A deploy of a model older than the one the edge reports becomes an explicit rollback
    naming that version (edges refuse a plain deploy of an older model)."""
    revision = crud.next_desired_revision(session, edge_id=edge_id)
    manifest = _manifest(model) if model is not None else None
    if action is DesiredAction.DEPLOY and manifest is not None:
        action = order_action(running_manifest(session, edge_id=edge_id), manifest)
    desired = signed_order(
        settings,
        edge_id=edge_id,
        revision=revision,
        action=action,
        model=manifest,
        rollback_to=rollback_to,
        rollout_id=rollout_id,
    )
    crud.record_desired(
        session,
        edge_id=edge_id,
        revision=revision,
        model_version_id=model.id if model is not None else None,
        payload=desired.model_dump(mode="json"),
    )
    if model is not None:
        crud.create_deployment(
            session, model_version_id=model.id, targets={edge_id: revision}, rollout_id=rollout_id
        )
    return desired


def _current_desired(session: Session, *, edge_id: str) -> DesiredState | None:
    row = fleet.current_desired(session, edge_id=edge_id)
    return DesiredState.model_validate(row.payload) if row is not None else None


# -- starting and steering ---------------------------------------------------------------------------


def start_rollout(
    *,
    settings: CloudSettings,
    model_ref: str,
    edge_ids: Sequence[str],
    canary: float = 1,
    waves: int = 2,
    gates: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    actor: str = "cli",
) -> str:
    """Record a rollout (nothing is published until the first tick). Returns its id."""
    rollout_id = f"ro-{uuid.uuid4().hex[:10]}"
    with session_scope(settings.resolved_database_url) as session:
        model = crud.get_model_version(session, ref=model_ref)
        _manifest(model)
        plan = fleet.plan_waves(edge_ids, canary=canary, waves=waves)
        merged = {**DEFAULT_PARAMS, **(params or {})}
        fleet.create_rollout(
            session,
            rollout_id=rollout_id,
            model=model,
            plan=plan,
            gates=gates or dict(gatelib.DEFAULT_GATES),
            params=merged,
            created_by=actor,
        )
        crud.audit(
            session,
            actor=actor,
            action="rollout_start",
            target=model.ref,
            detail={"rollout_id": rollout_id, "waves": plan, "gates": gates, "params": merged},
        )
    logger.info("rollout %s of %s to %d edges in %d waves", rollout_id, model_ref, len(edge_ids), len(plan))
    return rollout_id


def set_state(*, settings: CloudSettings, rollout_id: str, action: str, actor: str = "cli") -> str:
    """``pause`` / ``resume`` / ``abort``. Abort rolls back every edge that received the model."""
    allowed = {"pause": ("running",), "resume": ("paused",), "abort": ("running", "paused")}
    if action not in allowed:
        raise RolloutError(f"unknown rollout action {action!r}")
    with session_scope(settings.resolved_database_url) as session:
        rollout = fleet.get_rollout(session, rollout_id=rollout_id)
        if rollout.state not in allowed[action]:
            raise RolloutError(f"rollout {rollout_id} is {rollout.state}: cannot {action}")
        if action == "pause":
            rollout.state = "paused"
        elif action == "resume":
            rollout.state = "running"
        else:
            rollout.state = "aborted"
            rollout.reason = f"aborted by {actor}"
            for target in rollout.targets:
                if target.state == "pending":
                    target.state = "skipped"
                elif target.state in ("deploying", "serving", "failed", "deferred"):
                    target.state = "rollback_pending"
        rollout.updated_at = time.time()
        crud.audit(session, actor=actor, action=f"rollout_{action}", target=rollout_id)
        if action == "abort":
            _withdraw_if_pipeline(session, rollout, f"rollout {rollout_id} aborted by {actor}", actor)
        state = rollout.state
    if action == "abort":
        tick(settings=settings, rollout_ids=[rollout_id])
    return state


# -- the tick ---------------------------------------------------------------------------------------


def tick(
    *,
    settings: CloudSettings,
    rollout_ids: Sequence[str] | None = None,
    link: MqttLink | None = None,
    lease: bool = True,
) -> list[dict[str, Any]]:
    """Advance every rollout that has work; returns a summary per rollout touched.

    ``lease``: take each rollout's lease in the registry so concurrent ticks never work on the same
    rollout. The Celery task holds one Redis lock over the whole tick instead (``lease=False``):
    two registry writes per rollout every tick would compete with the ingest for SQLite's one writer."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        ids = list(rollout_ids) if rollout_ids is not None else fleet.rollouts_to_tick(session)
    publisher = Publisher(settings, link)
    summaries = []
    try:
        for rollout_id in ids:
            if lease:
                with session_scope(url) as session:
                    if not fleet.acquire_lease(session, rollout_id=rollout_id, seconds=LEASE_S):
                        continue
            try:
                summaries.append(_tick_one(url, rollout_id, publisher))
            finally:
                if lease:
                    with session_scope(url) as session:
                        fleet.release_lease(session, rollout_id=rollout_id)
    finally:
        publisher.close()
    return summaries


def _tick_one(url: str, rollout_id: str, publisher: Publisher) -> dict[str, Any]:
    outbox: list[DesiredState] = []
    settings = publisher.settings
    with session_scope(url) as session:
        rollout = fleet.get_rollout(session, rollout_id=rollout_id)
        now = time.time()
        _collect_progress(session, settings, rollout, now, outbox)
        if rollout.state == "running":
            _advance(session, settings, rollout, now, outbox)
        _start_rollbacks(session, settings, rollout, now, outbox)
        if has_changes(session):
            rollout.updated_at = now
        summary = describe(rollout)
    # Publish after the commit: a crash in between leaves recorded, unpublished orders that the next
    # tick republishes (a revision the edge has seen is ignored by it, so repeats are harmless).
    for desired in outbox:
        try:
            publisher.send(desired)
        except PublishError as exc:
            logger.warning("rollout %s: %s (retried on a later tick)", rollout_id, exc)
    return summary


# Final stages of an edge's DeploymentProgress: done (the order carried out), or not. ``refused`` is
# an order the edge did not accept at all (signature, key, expiry, revision, downgrade): it never
# counts as handled, it fails the target.
DONE_STAGES = ("swapped", "rolled_back")
FAILED_STAGES = ("failed", "refused")


def _collect_progress(
    session: Session, settings: CloudSettings, rollout: Rollout, now: float, outbox: list[DesiredState]
) -> None:
    """Move each published target to serving / failed / rolled_back / deferred from what edges reported."""
    version = rollout.model.version
    for target in rollout.targets:
        if target.state not in ("deploying", "rolling_back", "deferred") or target.revision is None:
            continue
        edge = fleet.get_edge(session, edge_id=target.edge_id)
        reported = (edge.reported or {}) if edge is not None else {}
        seen_revision = reported.get("desired_revision")
        progress = fleet.deployment_target(session, edge_id=target.edge_id, revision=target.revision)
        handled = seen_revision is not None and seen_revision >= target.revision
        refused = progress is not None and progress.stage == "refused"
        if refused:
            handled = False  # a refused order is not handled, whatever revision the edge reports
        if target.state in ("deploying", "deferred"):
            if (progress is not None and progress.stage in DONE_STAGES and progress.ok) or (
                handled and reported.get("model_version") == version and reported.get("last_deploy_ok")
            ):
                target.state, target.serving_at = "serving", now
                continue
            if (progress is not None and progress.stage in FAILED_STAGES) or (
                handled and reported.get("last_deploy_ok") is False
            ):
                target.state = "failed"
                target.reason = (progress.reason if progress is not None else None) or reported.get(
                    "last_deploy_reason"
                )
                continue
            if edge is not None and edge.state == "offline" and target.state == "deploying":
                # Its retained desired state waits on the broker: it converges when it comes back.
                target.state = "deferred"
                target.reason = "edge offline: converges on reconnect"
        elif target.state == "rolling_back":
            if handled and (
                reported.get("model_version") == target.previous_version or target.previous_version is None
            ):
                target.state = "rolled_back"
                continue
            if (progress is not None and progress.stage in FAILED_STAGES) or (
                handled and reported.get("last_deploy_ok") is False
            ):
                target.state = "rollback_failed"
                target.reason = (progress.reason if progress is not None else None) or reported.get(
                    "last_deploy_reason"
                )
                continue
        if target.state in ("deploying", "rolling_back", "deferred") and not handled:
            current = _current_desired(session, edge_id=target.edge_id)
            if current is None or current.revision != target.revision:
                continue
            if _needs_reissue(settings, current, now):
                # Unsigned (recorded before orders were signed) or about to expire: an edge would
                # refuse it, so the target gets a fresh order (next revision) of the same content.
                desired = _reissue(session, settings, current)
                target.revision, target.published_at = desired.revision, now
                outbox.append(desired)
            elif (
                target.state != "deferred"
                and target.published_at is not None
                and now - target.published_at >= REPUBLISH_S
            ):
                outbox.append(current)
                target.published_at = now


def _needs_reissue(settings: CloudSettings, current: DesiredState, now: float) -> bool:
    if current.signature is None or current.expires_at is None:
        return True
    return current.expires_at - now < settings.desired_ttl_s / 4


def _reissue(session: Session, settings: CloudSettings, current: DesiredState) -> DesiredState:
    """A new signed order (next revision) with the content of ``current``, recorded like the first."""
    row = fleet.current_desired(session, edge_id=current.edge_id)
    model_id = row.model_version_id if row is not None else None
    revision = crud.next_desired_revision(session, edge_id=current.edge_id)
    desired = signed_order(
        settings,
        edge_id=current.edge_id,
        revision=revision,
        action=current.action,
        model=current.model,
        rollback_to=current.rollback_to,
        rollout_id=current.rollout_id,
    )
    crud.record_desired(
        session,
        edge_id=current.edge_id,
        revision=revision,
        model_version_id=model_id,
        payload=desired.model_dump(mode="json"),
    )
    if model_id is not None:
        crud.create_deployment(
            session,
            model_version_id=model_id,
            targets={current.edge_id: revision},
            rollout_id=current.rollout_id,
        )
    logger.info("desired state of %s re-issued as r%d (was r%d)", current.edge_id, revision, current.revision)
    return desired


def _publish_wave(
    session: Session,
    settings: CloudSettings,
    rollout: Rollout,
    wave: int,
    *,
    now: float,
    outbox: list[DesiredState],
) -> None:
    for target in rollout.targets:
        if target.wave == wave and target.state == "pending":
            desired = _order(
                session,
                settings,
                edge_id=target.edge_id,
                action=DesiredAction.DEPLOY,
                model=rollout.model,
                rollout_id=rollout.rollout_id,
            )
            target.revision, target.state, target.published_at = desired.revision, "deploying", now
            outbox.append(desired)
    rollout.wave_started_at = now


def _advance(
    session: Session, settings: CloudSettings, rollout: Rollout, now: float, outbox: list[DesiredState]
) -> None:
    while rollout.state == "running":
        wave = rollout.current_wave
        members = [t for t in rollout.targets if t.wave == wave]
        if any(t.state == "pending" for t in members):
            _publish_wave(session, settings, rollout, wave, now=now, outbox=outbox)
            return  # nothing reported yet for a wave just published
        verdict = evaluate_wave(session, rollout, members, now)
        previous = (rollout.gate_results or {}).get(str(wave)) or {}
        fresh = (
            previous.get("decision") != verdict.decision
            or now - float(previous.get("ts", 0)) >= RESULTS_EVERY_S
        )
        if verdict.decision == "wait" and not fresh:
            return  # unchanged: no registry write every tick
        rollout.gate_results = {
            **(rollout.gate_results or {}),
            str(wave): {
                "decision": verdict.decision,
                "gates": [r.as_dict() for r in verdict.results],
                "ts": now,
            },
        }
        if verdict.decision == "wait":
            return
        if verdict.decision == "breach":
            _halt(session, rollout, f"wave {wave}: {verdict.reason()}")
            return
        crud.audit(
            session,
            actor="rollout-engine",
            action="rollout_wave_passed",
            target=rollout.rollout_id,
            detail={"wave": wave},
        )
        if wave + 1 >= rollout.waves:
            rollout.state = "completed"
            crud.audit(session, actor="rollout-engine", action="rollout_completed", target=rollout.rollout_id)
            return
        rollout.current_wave = wave + 1


def evaluate_wave(
    session: Session, rollout: Rollout, members: Sequence[RolloutTarget], now: float
) -> gatelib.WaveVerdict:
    """Gate one wave from its targets and metrics: deploy failures first, then error rate, latency,
    confidence shift, teacher agreement and accuracy against the previous version."""
    gates, params = rollout.gates or {}, rollout.params or {}
    threshold = {**gatelib.DEFAULT_GATES, **gates}
    min_windows = int(params.get("min_windows", DEFAULT_PARAMS["min_windows"]))
    soak_s = float(params.get("soak_s", DEFAULT_PARAMS["soak_s"]))
    failed = [t.edge_id for t in members if t.state == "failed"]
    refused = [t.edge_id for t in members if t.state == "failed" and (t.reason or "").startswith("refused")]
    serving = [t for t in members if t.state == "serving"]
    waiting = [t for t in members if t.state == "deploying"]
    results = [gatelib.deploy_gate(failed, threshold["deploy_failures"], refused)]
    if failed and results[0].passed is False:
        return gatelib.WaveVerdict("breach", results)
    if waiting or not serving:
        detail = (
            "no serving edge in this wave yet" if not serving else f"{len(waiting)} edges still deploying"
        )
        results.append(gatelib.GateResult("error_rate", None, None, threshold["error_rate"], detail))
        return gatelib.WaveVerdict("wait", results)
    version = rollout.model.version
    candidate, previous = [], []
    for target in serving:
        since = target.serving_at or 0.0
        window = gatelib.window_from_records(
            target.edge_id,
            fleet.metrics_of(session, edge_id=target.edge_id, model_version=version, since=since),
        )
        if window is not None:
            candidate.append(window)
        if target.previous_version is not None:
            base = gatelib.window_from_records(
                target.edge_id,
                fleet.metrics_of(
                    session,
                    edge_id=target.edge_id,
                    model_version=target.previous_version,
                    since=rollout.created_at - BASELINE_S,
                ),
            )
            if base is not None:
                previous.append(base)
    accuracy = gatelib.accuracy_gates(
        candidate,
        previous,
        max_drop=threshold["accuracy_drop"],
        min_accuracy=threshold["min_accuracy"],
        min_windows=min_windows,
    )
    accuracy_held = any(r.name == "accuracy_drop" and r.passed is True for r in accuracy)
    results.append(gatelib.error_rate_gate(candidate, threshold["error_rate"], min_windows))
    results.append(gatelib.latency_gate(candidate, threshold["p95_latency_ms"]))
    results.append(
        gatelib.confidence_shift_gate(
            candidate, previous, threshold["confidence_shift"], min_windows, accuracy_held=accuracy_held
        )
    )
    pairs = fleet.teacher_pairs(
        session,
        edge_ids=[t.edge_id for t in serving],
        model_version=version,
        since=rollout.wave_started_at or 0.0,
    )
    results.append(gatelib.teacher_agreement_gate(pairs, threshold["teacher_agreement"]))
    results.extend(accuracy)
    windows = sum(w.windows for w in candidate)
    ready = windows >= min_windows and now - (rollout.wave_started_at or now) >= soak_s
    return gatelib.verdict(results, quality_data_ready=ready)


def _halt(session: Session, rollout: Rollout, reason: str) -> None:
    rollout.state = "halted"
    rollout.reason = reason
    for target in rollout.targets:
        if target.state == "pending":
            target.state = "skipped"  # never received the model
        elif target.state in ("deploying", "serving", "failed", "deferred"):
            target.state = "rollback_pending"
    crud.audit(
        session,
        actor="rollout-engine",
        action="rollout_halted",
        target=rollout.rollout_id,
        detail={"reason": reason},
    )
    _withdraw_if_pipeline(
        session, rollout, f"rollout {rollout.rollout_id} halted: {reason}", "rollout-engine"
    )
    logger.warning("rollout %s halted: %s", rollout.rollout_id, reason)


def _withdraw_if_pipeline(session: Session, rollout: Rollout, reason: str, actor: str) -> None:
    """The pipeline promotes a model when it publishes it; when the rollout it started for that model
    stops short, the promotion is withdrawn (the previous production version is restored). An
    operator's own rollout of a model changes nothing about which version is production."""
    if rollout.created_by.startswith("pipeline"):
        crud.withdraw(session, model_id=rollout.model_version_id, reason=reason, actor=actor)


def _start_rollbacks(
    session: Session, settings: CloudSettings, rollout: Rollout, now: float, outbox: list[DesiredState]
) -> None:
    """Targets marked rollback_pending get their previous model back by a signed rollback order naming
    it: with its manifest when the registry knows it (a no-op on an edge still serving it), else by
    version alone (the edge restores the last-good model it keeps on disk if that is the one named).
    A target whose previous version nobody knows cannot be rolled back: rollback_failed."""
    for target in rollout.targets:
        if target.state != "rollback_pending":
            continue
        previous = fleet.model_by_id(session, model_id=target.previous_model_id)
        if previous is not None and previous.manifest is not None and previous.signature is not None:
            desired = _order(
                session,
                settings,
                edge_id=target.edge_id,
                action=DesiredAction.ROLLBACK,
                model=previous,
                rollout_id=rollout.rollout_id,
            )
        elif target.previous_version is not None:
            desired = _order(
                session,
                settings,
                edge_id=target.edge_id,
                action=DesiredAction.ROLLBACK,
                model=None,
                rollout_id=rollout.rollout_id,
                rollback_to=target.previous_version,
            )
        else:
            target.state = "rollback_failed"
            target.reason = f"{rollout.reason}; no previous version known to roll back to"
            continue
        target.revision, target.state, target.published_at = desired.revision, "rolling_back", now
        target.reason = rollout.reason
        outbox.append(desired)


# -- manual rollback and reading -----------------------------------------------------------------


def rollback_edges(
    *,
    settings: CloudSettings,
    edge_ids: Sequence[str],
    to_ref: str | None,
    actor: str = "cli",
    link: MqttLink | None = None,
) -> list[DesiredState]:
    """``edgefleet model rollback``: a signed rollback order naming ``to_ref`` to the edges, or (None)
    naming the last-good version each edge reports (``RolloutError`` if one reports none)."""
    sent = []
    with session_scope(settings.resolved_database_url) as session:
        model = crud.get_model_version(session, ref=to_ref) if to_ref else None
        for edge_id in edge_ids:
            last_good: str | None = None
            if model is None:
                edge = fleet.get_edge(session, edge_id=edge_id)
                last_good = ((edge.reported or {}) if edge is not None else {}).get("last_good_version")
                if last_good is None:
                    raise RolloutError(
                        f"edge {edge_id} reports no last-good model: name the version to go back to"
                    )
            sent.append(
                _order(
                    session,
                    settings,
                    edge_id=edge_id,
                    action=DesiredAction.ROLLBACK,
                    model=model,
                    rollout_id=None,
                    rollback_to=last_good,
                )
            )
        crud.audit(
            session,
            actor=actor,
            action="model_rollback",
            target=to_ref or "last-good",
            detail={"edges": list(edge_ids)},
        )
    publisher = Publisher(settings, link)
    try:
        for desired in sent:
            publisher.send(desired)
    finally:
        publisher.close()
    return sent


def describe(rollout: Rollout) -> dict[str, Any]:
    """A rollout as a JSON-able dict: state, waves, gates, latest gate results and every target."""
    return {
        "rollout_id": rollout.rollout_id,
        "model": rollout.model.ref,
        "state": rollout.state,
        "current_wave": rollout.current_wave,
        "waves": rollout.waves,
        "reason": rollout.reason,
        "created_by": rollout.created_by,
        "created_at": rollout.created_at,
        "gates": rollout.gates,
        "params": rollout.params,
        "gate_results": rollout.gate_results,
        "targets": [
            {
                "edge_id": t.edge_id,
                "wave": t.wave,
                "state": t.state,
                "revision": t.revision,
                "previous_version": t.previous_version,
                "reason": t.reason,
            }
            for t in rollout.targets
        ],
    }


def status(*, settings: CloudSettings, rollout_id: str) -> dict[str, Any]:
    """``describe`` of one rollout, read from the registry (``NotFoundError`` if there is none)."""
    with session_scope(settings.resolved_database_url) as session:
        return describe(fleet.get_rollout(session, rollout_id=rollout_id))
