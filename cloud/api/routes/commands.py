"""``/v1/commands``: commands to devices, with their acks."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from cloud.api.deps import AUTH_RESPONSES, Operator, SettingsDep
from cloud.api.schemas import CommandRequest, CommandResult, ErrorDetail
from cloud.fleet import commands

router = APIRouter(prefix="/v1/commands", tags=["commands"], responses=AUTH_RESPONSES)


@router.post(
    "", response_model=CommandResult, responses={400: {"model": ErrorDetail}, 404: {"model": ErrorDetail}}
)
def send_command(body: CommandRequest, who: Operator, settings: SettingsDep) -> dict[str, Any]:
    """Send a command to one device, a group or tag, or every device behind an edge, and wait up to
    ``wait_s`` for their acks (later acks are recorded by the ingest)."""
    targets = commands.resolve_targets(
        settings=settings, device=body.device, group=body.group, edge=body.edge
    )
    result = commands.send_commands(
        settings=settings,
        device_ids=targets,
        name=body.name,
        args=body.args,
        ttl_s=body.ttl_s,
        wait_s=body.wait_s,
        sender=f"api:{who.name}",
    )
    return {"summary": result.summary(), "outcomes": [asdict(o) for o in result.outcomes]}
