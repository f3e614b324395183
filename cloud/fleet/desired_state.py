"""Signing and desired state: the cloud's key ring (``cloud/fleet/keyring.py``), manifests signed with
its current key, and desired-state orders, signed as a whole (``signed_order``: the one place orders
are made), published to edges (retained, QoS1, on the edge's ``desired`` topic) with their revisions
recorded."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from cloud.errors import PublishError
from cloud.fleet.keyring import CloudKeyRing, ensure_pair, publish_if_needed
from shared.mqtt import MqttLink
from shared.schemas import DesiredAction, DesiredState, ModelManifest, encode_message
from shared.settings.cloud import CloudSettings
from shared.signing import sign_desired, sign_manifest
from shared.topics import EdgeTopic, Topics

logger = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 10.0


def ensure_keys(settings: CloudSettings) -> tuple[Path, Path]:
    """The configured key pair (the root of the edges' key rings); in dev mode a missing pair is
    generated under ``data_dir``."""
    return ensure_pair(settings)


def sign(manifest: ModelManifest, settings: CloudSettings) -> ModelManifest:
    """Sign ``manifest`` with the ring's current key (made in dev mode if missing), naming the key by id."""
    private_key, kid = CloudKeyRing(settings).signer()
    return sign_manifest(manifest, private_key, key_id=kid)


def signed_order(
    settings: CloudSettings,
    *,
    edge_id: str,
    revision: int,
    action: DesiredAction = DesiredAction.DEPLOY,
    model: ModelManifest | None = None,
    rollback_to: str | None = None,
    rollout_id: str | None = None,
    config: dict[str, JsonValue] | None = None,
) -> DesiredState:
    """A desired-state order signed by the ring's current key, valid for ``settings.desired_ttl_s``.

    A ``rollback`` names the version it goes back to: ``rollback_to``, or its model's version."""
    if action is DesiredAction.ROLLBACK:
        rollback_to = rollback_to or (model.version if model is not None else None)
        if rollback_to is None:
            raise PublishError(f"a rollback order for {edge_id} must name the version it goes back to")
    issued = time.time()
    extra: dict[str, Any] = {"config": config} if config else {}
    desired = DesiredState(
        edge_id=edge_id,
        revision=revision,
        action=action,
        model=model,
        rollout_id=rollout_id,
        rollback_to=rollback_to if action is DesiredAction.ROLLBACK else None,
        issued_at=issued,
        expires_at=issued + settings.desired_ttl_s,
        **extra,
    )
    private_key, kid = CloudKeyRing(settings).signer()
    return sign_desired(desired, private_key, key_id=kid)


def order_action(current: ModelManifest | None, target: ModelManifest) -> DesiredAction:
    """``deploy`` unless ``target`` is older than what the edge runs (``current``, by the manifests'
    signed ``created_at``): edges install an older model only on an explicit rollback naming it."""
    if current is not None and current.sha256 != target.sha256 and target.created_at < current.created_at:
        return DesiredAction.ROLLBACK
    return DesiredAction.DEPLOY


# -- desired state -----------------------------------------------------------------------------


def publish_desired(
    *, link: MqttLink, topics: Topics, desired: DesiredState, timeout: float = PUBACK_TIMEOUT_S
) -> None:
    """Publish ``desired`` retained at QoS1 on the edge's desired topic and wait for the PUBACK."""
    if desired.signature is None:
        raise PublishError(f"refusing to publish an unsigned desired state to {desired.edge_id}")
    topic = topics.edge(desired.edge_id, EdgeTopic.DESIRED)
    if link.publish(topic, encode_message(desired), qos=1, retain=True).wait(timeout):
        return
    raise PublishError(
        f"desired state for {desired.edge_id} was not acknowledged by the broker in {timeout:.0f} s"
    )


def publish_desired_state(
    *,
    settings: CloudSettings,
    edge_ids: list[str],
    model_ref: str,
    rollout_id: str | None = None,
    action: DesiredAction = DesiredAction.DEPLOY,
    actor: str = "cli",
    link: MqttLink | None = None,
) -> list[DesiredState]:
    """Send the signed, published ``model_ref`` (NAME@VERSION) to ``edge_ids`` as their desired state.

    Revisions are allocated per edge in the registry (monotonic), the deployment and its targets are
    recorded, then each message is published retained at QoS1. ``link`` may be a connected MqttLink
    otherwise one is opened for the call."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: signing alone needs no registry)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: signing alone needs no registry)

    url = settings.resolved_database_url
    messages: list[DesiredState] = []
    with session_scope(url) as session:
        model = crud.get_model_version(session, ref=model_ref)
        if model.manifest is None or model.signature is None:
            raise PublishError(f"model {model.ref} is not signed and published; it cannot be deployed")
        manifest = ModelManifest.model_validate(model.manifest)
        targets: dict[str, int] = {}
        for edge_id in edge_ids:
            revision = crud.next_desired_revision(session, edge_id=edge_id)
            if action is DesiredAction.DEPLOY:
                action_for_edge = order_action(running_manifest(session, edge_id=edge_id), manifest)
            else:
                action_for_edge = action
            desired = signed_order(
                settings,
                edge_id=edge_id,
                revision=revision,
                action=action_for_edge,
                model=manifest,
                rollout_id=rollout_id,
            )
            crud.record_desired(
                session,
                edge_id=edge_id,
                revision=revision,
                model_version_id=model.id,
                payload=desired.model_dump(mode="json"),
            )
            targets[edge_id] = revision
            messages.append(desired)
        crud.create_deployment(session, model_version_id=model.id, targets=targets, rollout_id=rollout_id)
        crud.audit(
            session, actor=actor, action="publish_desired", target=model.ref, detail={"edges": targets}
        )
    own_link = link is None
    active = link or MqttLink(settings.broker, client_id=f"edgefleet-cloud-desired-{os.getpid()}")
    if own_link:
        active.connect()
    try:
        publish_if_needed(settings, active)
        for desired in messages:
            publish_desired(link=active, topics=settings.broker.topics, desired=desired)
            logger.info(
                "desired state r%d (%s) published to %s", desired.revision, model_ref, desired.edge_id
            )
    finally:
        if own_link:
            active.stop()
    return messages


def running_manifest(session: Any, *, edge_id: str) -> ModelManifest | None:
    """The signed manifest of the model ``edge_id`` reports it runs, if the registry has it."""
    from cloud.registry import fleet  # noqa: PLC0415  (SQLAlchemy: signing alone needs no registry)

    edge = fleet.get_edge(session, edge_id=edge_id)
    reported = (edge.reported or {}) if edge is not None else {}
    name, version = reported.get("model_name"), reported.get("model_version")
    if not (name and version):
        return None
    from sqlalchemy import select  # noqa: PLC0415  (SQLAlchemy: signing alone needs no registry)

    from cloud.registry.models import ModelVersion  # noqa: PLC0415  (SQLAlchemy: signing alone needs no registry)

    model = session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )
    if model is None or model.manifest is None:
        return None
    return ModelManifest.model_validate(model.manifest)
