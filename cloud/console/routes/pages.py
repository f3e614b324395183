"""Every page router of the console, in the order they are mounted (sign-in is mounted first by
``cloud.console.app``)."""

from __future__ import annotations

from fastapi import APIRouter

from cloud.console.routes import admin, audit, fleet, learning, models, rollouts

ROUTERS: tuple[APIRouter, ...] = (
    fleet.router,
    models.router,
    rollouts.router,
    learning.router,
    audit.router,
    admin.router,
)
