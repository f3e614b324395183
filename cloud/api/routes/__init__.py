"""The admin API routes, one ``APIRouter`` per resource."""
