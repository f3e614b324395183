"""``/v1/fleet/devices``: the fleet's devices, and their desired config."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any

from fastapi import APIRouter

from cloud.api.deps import AUTH_RESPONSES, Operator, SessionDep, SettingsDep, Viewer
from cloud.api.schemas import DeviceConfigRequest, DeviceConfigResult, DeviceDetail, DeviceRow, ErrorDetail
from cloud.fleet import device_config
from cloud.registry import fleet

router = APIRouter(prefix="/v1/fleet/devices", tags=["fleet"], responses=AUTH_RESPONSES)


@router.get("", response_model=list[DeviceRow])
def list_devices(_who: Viewer, session: SessionDep) -> list[dict[str, Any]]:
    """Every device: its edge, online state, last seen, group, tags, desired vs reported config
    revision (``config_in_sync``) and health."""
    return fleet.fleet_devices(session)


@router.get("/{device_id}", response_model=DeviceDetail, responses={404: {"model": ErrorDetail}})
def show_device(device_id: str, _who: Viewer, session: SessionDep) -> dict[str, Any]:
    """One device: its fleet row, desired vs reported config, what its birth said and its last
    heartbeat's health figures."""
    return fleet.fleet_device(session, device_id=device_id)


@router.put(
    "/{device_id}/config",
    response_model=DeviceConfigResult,
    responses={
        400: {"model": ErrorDetail, "description": "a setting a running device cannot change"},
        503: {"model": ErrorDetail, "description": "recorded, not published: beat publishes it later"},
    },
)
def set_device_config(
    device_id: str, body: DeviceConfigRequest, who: Operator, settings: SettingsDep
) -> dict[str, Any]:
    """A new desired-config revision, published retained on the device's desired topic; an
    empty body publishes the current one again."""
    return device_config.set_device_config(
        settings=settings,
        device_id=device_id,
        changes=body.set,
        unset=body.unset,
        actor=f"api:{who.name}",
    )
