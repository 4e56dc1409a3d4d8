"""HTTP layer: routers only; the work is in app.services."""

from fastapi import APIRouter

from app.api.routes import health, jobs, models, submit

api_router = APIRouter()
api_router.include_router(submit.router)
api_router.include_router(jobs.router)
api_router.include_router(models.router)
api_router.include_router(health.router)
