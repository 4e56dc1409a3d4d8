"""HTTP layer: routers only; the work is in app.services."""

from fastapi import APIRouter, Depends

from app.api.routes import events, health, jobs, models, submit, ui
from app.auth import AUTH_RESPONSES, require

api_router = APIRouter()
api_router.include_router(submit.router)
api_router.include_router(jobs.router)
api_router.include_router(events.router)
# Reading models needs a key (scope read) when auth is on; POST/DELETE /models check admin.
api_router.include_router(
    models.router, dependencies=[Depends(require("read"))], responses=AUTH_RESPONSES
)
api_router.include_router(health.router)
api_router.include_router(ui.router)  # the page at / (app/web)
