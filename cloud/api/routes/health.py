"""``/healthz``: liveness, without a token."""

from fastapi import APIRouter

from cloud.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    """The API answers (no token needed)."""
    return {"status": "ok"}
