"""Signing and desired state: the cloud's key pair, manifests signed with it, and desired-state orders
published to edges (retained, QoS1, on the edge's ``desired`` topic) with their revisions recorded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cloud.errors import PublishError
from shared.mqtt import MqttLink
from shared.schemas import DesiredAction, DesiredState, ModelManifest, encode_message
from shared.settings.cloud import CloudSettings
from shared.signing import generate_keypair, key_id, load_private_key, sign_manifest
from shared.topics import EdgeTopic, Topics

logger = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 10.0


def ensure_keys(settings: CloudSettings) -> tuple[Path, Path]:
    """The configured key pair; in dev mode a missing pair is generated under ``data_dir``."""
    private, public = settings.key_paths()
    if not private.exists():
        if not settings.dev_mode:
            raise PublishError(
                f"signing key {private} does not exist: create one with 'edgefleet cloud keygen'"
            )
        generate_keypair(private, public)
        logger.warning("dev mode: generated a signing key pair at %s", private.parent)
    return private, public


def sign(manifest: ModelManifest, settings: CloudSettings) -> ModelManifest:
    """Sign ``manifest`` with the cloud's private key (made in dev mode if missing), naming the key by id."""
    private, public = ensure_keys(settings)
    return sign_manifest(manifest, load_private_key(private), key_id=key_id(public.read_bytes()))


# -- desired state -----------------------------------------------------------------------------


def publish_desired(
    *, link: MqttLink, topics: Topics, desired: DesiredState, timeout: float = PUBACK_TIMEOUT_S
) -> None:
    """Publish ``desired`` retained at QoS1 on the edge's desired topic and wait for the PUBACK."""
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
            desired = DesiredState(
                edge_id=edge_id, revision=revision, action=action, model=manifest, rollout_id=rollout_id
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
        for desired in messages:
            publish_desired(link=active, topics=settings.broker.topics, desired=desired)
            logger.info(
                "desired state r%d (%s) published to %s", desired.revision, model_ref, desired.edge_id
            )
    finally:
        if own_link:
            active.stop()
    return messages
