"""The device's side of enrollment: broker credentials from an enrollment bundle, or a claim first.

- ``enrollment_file`` exists: the agent logs in with the bundle's username, password and client id,
  trusts its CA (written beside it as ``<file>.ca.pem`` for TLS), and connects to its ``broker_url``
  unless the agent's settings name a ``broker.url`` themselves.
- It does not exist and ``claim_token_file`` is set (first start): the agent makes its own secret
  (``new_secret``), logs in to its configured broker as ``claim-TOKEN_ID`` with the token's secret,
  sends the secret's *hash* for its ``device_id`` and waits (``claim_timeout_s``) for the cloud's answer.
  It then writes the enrollment file (0600, its own secret as password) and waits
  (``claim_sync_timeout_s``) until the broker, synced by ``edgefleet broker run``, accepts the new
  identity. The secret is kept in ``<file>.claim`` (0600) from before the request until the bundle is
  written: a device that crashes or loses the answer asks again with the same secret, which the
  cloud answers like the first time.

Standard library + paho + pydantic only (no cryptography, no numpy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Final

from pydantic import SecretStr, ValidationError

from device_agent.errors import AgentError
from shared.enrollment import (
    ClaimRequest,
    EnrollmentBundle,
    EnrollmentError,
    claim_username,
    decode_claim_response,
    encode,
    load_bundle,
    read_claim_token,
    trust_file,
    write_bundle,
    write_private_file,
)
from shared.errors import MqttError, SchemaError
from shared.identity import IdentityKind, broker_hash, new_secret
from shared.mqtt import LinkEvent, MqttLink
from shared.settings import AgentSettings, MqttSettings

logger = logging.getLogger(__name__)

RESEND_S: Final = 10.0  # no answer yet: publish the (idempotent) request again this often
POLL_S: Final = 0.2
LOST_ANSWER_PROBE_S: Final = 10.0
PENDING_SUFFIX: Final = ".claim"
CA_SUFFIX: Final = ".ca.pem"
# Answers after which asking again cannot help.
FINAL_ERRORS: Final = frozenset(
    {"bad_request", "token_unknown", "token_used", "token_expired", "wrong_kind", "id_taken", "id_reserved"}
)


class ClaimError(EnrollmentError):
    """A claim that did not give this device an identity; the message says why and what to do."""


def resolve(settings: AgentSettings, *, stop: threading.Event | None = None) -> AgentSettings:
    """``settings`` with the broker credentials of the enrollment bundle (claimed first if needed);
    unchanged when no ``enrollment_file`` is set."""
    path = settings.enrollment_file
    if path is None:
        if settings.claim_token_file is not None:
            raise EnrollmentError(
                "claim_token_file needs enrollment_file: where the claimed identity is written and read"
            )
        return settings
    fresh = False
    if not path.exists():
        if settings.claim_token_file is None:
            raise EnrollmentError(
                f"enrollment file {path} does not exist: write the bundle of 'edgefleet fleet enroll "
                f"{settings.device_id} --kind device --out FILE' there, or set claim_token_file"
            )
        claim(settings, stop=stop)
        fresh = True
    bundle = load_bundle(path)
    if bundle.kind is not IdentityKind.DEVICE:
        raise EnrollmentError(f"enrollment file {path} is for a {bundle.kind}, not a device")
    if bundle.identity_id != settings.device_id:
        raise EnrollmentError(
            f"enrollment file {path} is device {bundle.identity_id!r}, "
            f"but this agent is {settings.device_id!r}"
        )
    resolved = settings.model_copy(
        update={
            "broker": bundle_broker(settings.broker, bundle, path, settings.data_dir),
            "client_id": bundle.client_id,
        }
    )
    if fresh:
        wait_accepted(resolved, stop=stop)
    return resolved


def bundle_broker(broker: MqttSettings, bundle: EnrollmentBundle, path: Path, data_dir: Path) -> MqttSettings:
    """``broker`` with the bundle's credentials; its URL unless ``broker.url`` was set explicitly; its CA
    (written beside ``path``) when the URL asks for TLS and no ``tls_ca`` is set."""
    url = broker.url if "url" in broker.model_fields_set else bundle.broker_url
    fields: dict[str, object] = {
        **broker.model_dump(exclude={"password", "username", "url"}),
        "url": url,
        "username": bundle.username,
        "password": bundle.password,
    }
    if bundle.topic_prefix != broker.topic_prefix:
        logger.warning(
            "enrollment file %s names topic prefix %s; this agent uses %s (broker.topic_prefix)",
            path,
            bundle.topic_prefix,
            broker.topic_prefix,
        )
    probe = MqttSettings(url=url)
    if bundle.ca_certificate and broker.tls_ca is None and probe.address.tls:
        fields["tls_ca"] = trust_file(path, CA_SUFFIX, bundle.ca_certificate, fallback_dir=data_dir)
    try:
        return MqttSettings.model_validate(fields)
    except ValidationError as exc:
        raise EnrollmentError(f"enrollment file {path}: its broker settings are invalid: {exc}") from exc


# -- the claim ----------------------------------------------------------------------------------------


def _pending(settings: AgentSettings, token_id: str) -> tuple[str, str, bool]:
    """The secret and request id of this claim: made now, or those of an interrupted one (same token
    and device id, then the third value is True), so that asking again gets the first answer."""
    if settings.enrollment_file is None:
        raise EnrollmentError("a claim needs enrollment_file")
    path = settings.enrollment_file.with_name(settings.enrollment_file.name + PENDING_SUFFIX)
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if (
            isinstance(data, dict)
            and data.get("token_id") == token_id
            and data.get("device_id") == settings.device_id
            and isinstance(data.get("secret"), str)
            and isinstance(data.get("request_id"), str)
        ):
            logger.info("claim %s: asking again with the secret of the interrupted claim", token_id)
            return data["secret"], data["request_id"], True
    secret, request_id = new_secret(), uuid.uuid4().hex
    record = {
        "token_id": token_id,
        "device_id": settings.device_id,
        "secret": secret,
        "request_id": request_id,
    }
    write_private_file(path, json.dumps(record).encode())
    return secret, request_id, False


def claim(settings: AgentSettings, *, stop: threading.Event | None = None) -> EnrollmentBundle:
    """Claim this device's identity with its claim token and write its enrollment file (0600)."""
    if settings.enrollment_file is None or settings.claim_token_file is None:
        raise EnrollmentError("a claim needs both enrollment_file and claim_token_file")
    token_id, token_secret = read_claim_token(settings.claim_token_file)
    topics = settings.broker.topics
    secret, request_id, asked = _pending(settings, token_id)
    request = ClaimRequest(
        device_id=settings.device_id, secret_hash=broker_hash(secret), request_id=request_id
    )
    username = claim_username(token_id)
    link = MqttLink(
        settings.broker.model_copy(update={"username": username, "password": SecretStr(token_secret)}),
        client_id=username,
        clean_session=True,
    )
    response_topic = topics.claim_response(token_id)
    link.subscribe(response_topic, qos=1)
    logger.info(
        "device %s: claiming its identity with token %s at %s",
        settings.device_id,
        token_id,
        settings.broker.url,
    )
    deadline = time.monotonic() + settings.claim_timeout_s
    last_refusal = ""
    resend_at = 0.0
    link.start()
    try:
        while True:
            now = time.monotonic()
            if stop is not None and stop.is_set():
                raise ClaimError(f"claim {token_id}: stopped before an answer came")
            if now >= deadline:
                link.stop()
                if asked and _accepted(settings, secret):
                    return _claimed_without_answer(settings, token_id, secret)
                raise ClaimError(_timeout_message(settings, token_id, link, last_refusal))
            last_refusal = _drain_events(link, last_refusal)
            if link.connected and link.wait_subscribed(0) and now >= resend_at:
                link.publish(topics.claim_request(token_id), encode(request), qos=1)
                asked = True
                resend_at = now + RESEND_S
            try:
                message = link.inbox.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if message.topic != response_topic:
                continue
            try:
                response = decode_claim_response(message.payload)
            except SchemaError as exc:
                logger.warning("claim %s: ignoring an answer that does not decode: %s", token_id, exc)
                continue
            if response.request_id and response.request_id != request_id:
                continue
            if response.ok and response.bundle is not None:
                bundle = response.bundle.model_copy(update={"password": secret})
                if bundle.identity_id != settings.device_id or bundle.kind is not IdentityKind.DEVICE:
                    raise ClaimError(
                        f"claim {token_id}: the cloud answered for {bundle.kind} {bundle.identity_id!r}, "
                        f"not device {settings.device_id!r}"
                    )
                write_bundle(bundle, settings.enrollment_file)
                with contextlib.suppress(FileNotFoundError):
                    settings.enrollment_file.with_name(
                        settings.enrollment_file.name + PENDING_SUFFIX
                    ).unlink()
                logger.info(
                    "device %s: claimed with token %s, enrollment written to %s",
                    settings.device_id,
                    token_id,
                    settings.enrollment_file,
                )
                return bundle
            if response.error in FINAL_ERRORS:
                raise ClaimError(f"claim {token_id} refused ({response.error}): {response.message}")
            logger.warning("claim %s: %s (%s); asking again", token_id, response.message, response.error)
            resend_at = min(resend_at, time.monotonic() + RESEND_S)
    finally:
        link.stop()


def _accepted(settings: AgentSettings, secret: str) -> bool:
    """Whether the broker lets this device log in with ``secret``: a claim whose answer was lost (the
    broker dropped the token's login once it was used) did enroll the device."""
    broker = settings.broker.model_copy(
        update={"username": settings.device_id, "password": SecretStr(secret)}
    )
    link = MqttLink(broker, client_id=settings.device_id, clean_session=True)
    link.start()
    try:
        return link.wait_connected(LOST_ANSWER_PROBE_S)
    finally:
        link.stop()


def _claimed_without_answer(settings: AgentSettings, token_id: str, secret: str) -> EnrollmentBundle:
    """The bundle of a device whose claim went through but whose answer was lost: what the agent's own
    settings say of the broker (no CA or cloud key beyond them)."""
    if settings.enrollment_file is None:
        raise EnrollmentError("a claim needs enrollment_file")
    bundle = EnrollmentBundle(
        identity_id=settings.device_id,
        kind=IdentityKind.DEVICE,
        username=settings.device_id,
        password=secret,
        client_id=settings.device_id,
        broker_url=_plain_url(settings.broker),
        topic_prefix=settings.broker.topic_prefix,
        enrolled_via=f"claim:{token_id}",
    )
    write_bundle(bundle, settings.enrollment_file)
    with contextlib.suppress(FileNotFoundError):
        settings.enrollment_file.with_name(settings.enrollment_file.name + PENDING_SUFFIX).unlink()
    logger.warning(
        "device %s: the answer to claim %s was lost but the broker accepts the claimed identity; "
        "enrollment written to %s from the agent's own broker settings",
        settings.device_id,
        token_id,
        settings.enrollment_file,
    )
    return bundle


def _plain_url(broker: MqttSettings) -> str:
    """The broker's URL without credentials."""
    addr = broker.address
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{'mqtts' if addr.tls else 'mqtt'}://{host}:{addr.port}"


def _drain_events(link: MqttLink, last: str) -> str:
    while True:
        try:
            event: LinkEvent = link.events.get_nowait()
        except queue.Empty:
            return last
        if not event.connected:
            last = event.reason
            logger.debug("claim link: %s", event.reason)


def _timeout_message(settings: AgentSettings, token_id: str, link: MqttLink, refusal: str) -> str:
    if link.connects == 0:
        why = f" (last: {refusal})" if refusal else ""
        return (
            f"claim {token_id}: the broker at {settings.broker.url} did not let the token log in within "
            f"{settings.claim_timeout_s:g} s{why}: the token is unknown, used or expired, or the broker is "
            "not reachable or not synced with the registry (edgefleet broker run)"
        )
    return (
        f"claim {token_id}: no answer from the cloud within {settings.claim_timeout_s:g} s "
        "(is 'edgefleet broker run' handling claims?)"
    )


def wait_accepted(settings: AgentSettings, *, stop: threading.Event | None = None) -> None:
    """Wait (``claim_sync_timeout_s``) until the broker accepts the identity just claimed: it does once
    ``edgefleet broker run`` has written it to the broker's password file."""
    client_id = settings.client_id or settings.device_id
    link = MqttLink(settings.broker, client_id=client_id, clean_session=True)
    deadline = time.monotonic() + settings.claim_sync_timeout_s
    last = ""
    link.start()
    try:
        while not link.wait_connected(POLL_S):
            last = _drain_events(link, last)
            if stop is not None and stop.is_set():
                raise AgentError("stopped while waiting for the broker to accept the claimed identity")
            if time.monotonic() >= deadline:
                raise ClaimError(
                    f"device {settings.device_id} claimed its identity (in {settings.enrollment_file}), but "
                    f"the broker at {settings.broker.url} still refuses it after "
                    f"{settings.claim_sync_timeout_s:g} s ({last or 'no answer'}): is 'edgefleet broker run' "
                    "syncing? Restarting the agent retries with the same identity"
                )
    except MqttError as exc:
        raise ClaimError(f"device {settings.device_id}: {exc}") from exc
    finally:
        link.stop()
    logger.info("device %s: the broker accepts its claimed identity", settings.device_id)
