"""The edge's enrollment bundle (``enrollment_file``): its broker identity and the cloud's public key.

The site and cloud links log in with the bundle's identity and password; ``MqttLink`` adds the
connection name (``EDGE/site``, ``EDGE/cloud``, ``EDGE/site-K``, ``EDGE/cloud-K``), which the broker
forces as client id. Both links go to the bundle's broker URL (the broker's site listener) unless
``site_broker.url`` / ``cloud_broker`` are set explicitly. The CA is written beside the bundle
(``<file>.ca.pem``) for ``mqtts://`` URLs, the cloud's signing public key as ``<file>.cloud.pub``, which
becomes ``model.public_key`` unless that is set (both under ``data_dir`` when the bundle's directory is
read-only).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from shared.enrollment import EnrollmentBundle, EnrollmentError, load_bundle, trust_file
from shared.identity import IdentityKind
from shared.settings import EdgeSettings, MqttSettings

logger = logging.getLogger(__name__)

CA_SUFFIX: Final = ".ca.pem"
PUBLIC_KEY_SUFFIX: Final = ".cloud.pub"


def apply(settings: EdgeSettings) -> EdgeSettings:
    """``settings`` with the credentials and trust of its enrollment bundle (unchanged without one)."""
    path = settings.enrollment_file
    if path is None:
        return settings
    bundle = load_bundle(path)
    if bundle.kind is not IdentityKind.EDGE:
        raise EnrollmentError(f"enrollment file {path} is for a {bundle.kind}, not an edge")
    if bundle.identity_id != settings.edge_id:
        raise EnrollmentError(
            f"enrollment file {path} is edge {bundle.identity_id!r}, but this edge is {settings.edge_id!r}"
        )
    site = _broker(settings.site_broker, bundle, path, settings.data_dir)
    cloud = (
        site
        if settings.cloud_broker is None
        else _broker(settings.cloud_broker, bundle, path, settings.data_dir)
    )
    update: dict[str, object] = {"site_broker": site, "cloud_broker": cloud}
    if bundle.cloud_public_key is not None:
        key_path = trust_file(
            path, PUBLIC_KEY_SUFFIX, bundle.cloud_public_key, fallback_dir=settings.data_dir
        )
        if settings.model.public_key is None:
            update["model"] = settings.model.model_copy(update={"public_key": key_path})
        elif settings.model.public_key.resolve() != key_path.resolve():
            logger.info(
                "edge %s: model.public_key %s is set; the bundle's cloud key (id %s) is at %s",
                settings.edge_id,
                settings.model.public_key,
                bundle.cloud_key_id,
                key_path,
            )
    elif settings.model.public_key is None:
        logger.warning("edge %s: the enrollment bundle has no cloud public key", settings.edge_id)
    return settings.model_copy(update=update)


def _broker(broker: MqttSettings, bundle: EnrollmentBundle, path: Path, data_dir: Path) -> MqttSettings:
    url = broker.url if "url" in broker.model_fields_set else bundle.broker_url
    fields: dict[str, object] = {
        **broker.model_dump(exclude={"password", "username", "url"}),
        "url": url,
        "username": bundle.username,
        "password": bundle.password,
    }
    if bundle.ca_certificate and broker.tls_ca is None and MqttSettings(url=url).address.tls:
        fields["tls_ca"] = trust_file(path, CA_SUFFIX, bundle.ca_certificate, fallback_dir=data_dir)
    try:
        return MqttSettings.model_validate(fields)
    except ValidationError as exc:
        raise EnrollmentError(f"enrollment file {path}: its broker settings are invalid: {exc}") from exc
