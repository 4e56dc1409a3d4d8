"""Application factory and `serve()`, the function behind `surfing serve`.

`create_app(settings)` wires settings, the db session factory, the models store and the
queue onto app.state; the lifespan migrates the embedded SQLite database, starts the queue
(the in-process runner in embedded mode) and the housekeeper (reaper + queue reconciler).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from app.api import api_router
from app.auth import install as install_auth
from app.db import session_factory, upgrade_database
from app.lifecycle import Housekeeper, reap_stale_jobs, requeue_orphans
from app.metrics import Metrics
from app.middleware import BodySizeLimit, RequestMetrics
from app.openapi_docs import finish_openapi
from app.problems import install_handlers
from app.queue import RunnerFactory, make_queue
from app.schemas import CSRecoverRequest, InvertRequest
from app.services.model_admin import UPLOAD_ROUTES, sweep_stale_uploads
from app.settings import Settings, get_settings
from app.web import install as install_web
from models_store import ModelStore

log = logging.getLogger("surfing.app")

DESCRIPTION = """
Invert trained generative networks by **surfing** their training trajectory
(Song, Fan & Lafferty 2019): given an image `y` (or compressed measurements `A·y`) and a model
id, find the latent `x` with `G(x) ≈ y`.

Submitting (`POST /invert`, `POST /cs-recover`) answers **202** with `Location: /jobs/{id}`;
poll `GET /jobs/{id}` for progress and the result. Errors are RFC 9457
`application/problem+json`.
"""


def schema_head() -> str | None:
    """Latest migration revision, for /readyz (None when migrations are not shipped)."""
    try:
        from alembic.script import ScriptDirectory

        from app.db import alembic_config

        return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    except Exception:  # no alembic.ini next to the code: skip the revision check
        return None


def _openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with the JSON request models registered.

    /invert and /cs-recover read their bodies themselves (JSON or multipart on one URL), so
    FastAPI does not see their models; the routes reference them by $ref and we add them here.
    """
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (InvertRequest, CSRecoverRequest):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in js.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = js
    app.openapi_schema = finish_openapi(schema)
    return schema


def create_app(settings: Settings | None = None, runner: RunnerFactory | None = None) -> FastAPI:
    """A configured app; with no argument, settings come from the environment. `runner`
    builds the embedded job runner (default: app.queue.load_runner())."""
    settings = settings or get_settings()
    sessions = session_factory(settings.sqlalchemy_url)
    queue = make_queue(settings, runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.should_migrate:
            await run_in_threadpool(upgrade_database, settings.sqlalchemy_url)
        queue.start()
        await run_in_threadpool(sweep_stale_uploads, app.state.store.root)
        if settings.embedded:
            # Nothing of a previous process can still be running: settle its jobs now.
            await run_in_threadpool(reap_stale_jobs, sessions, queue, settings, assume_dead=True)
            await run_in_threadpool(requeue_orphans, sessions, queue)
        reaper = Housekeeper(sessions, queue, settings).start()
        log.info(
            "surfing API: database %s, queue %s, models %s",
            settings.sqlalchemy_url.split("@")[-1],
            queue.kind,
            settings.models_dir,
        )
        try:
            yield
        finally:
            reaper.stop()
            queue.close()

    app = FastAPI(
        title="Surfing",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served offline by app.web (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.store = ModelStore(settings.models_dir)
    app.state.queue = queue
    app.state.schema_head = schema_head()
    app.state.metrics = Metrics(sessions, lambda: app.state.queue)
    install_handlers(app)
    install_auth(app, settings)
    app.include_router(api_router)
    install_web(app)  # /static, and /docs + /redoc from local assets
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # add_middleware wraps what is there: RequestMetrics (added last) is outermost, so it also
    # counts the 413s that BodySizeLimit answers without reaching the app.
    # POST /models streams a model archive to disk under its own, larger cap.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes, exempt=UPLOAD_ROUTES)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    return app


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the API with uvicorn (one process: the embedded runner lives inside it)."""
    import uvicorn

    logging.basicConfig(
        level=os.environ.get("SURFING_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    settings = get_settings().model_copy(update={"bind_host": host})  # for auth=auto
    store = ModelStore(settings.models_dir)
    if not store.list_models():
        log.warning(
            "no models in %s yet: create a small demo trajectory with `surfing demo` "
            "(or train one with `surfing train`)",
            settings.models_dir,
        )
    if settings.embedded:
        log.info(
            "embedded mode: SQLite at %s and an in-process job runner "
            "(set DATABASE_URL and REDIS_URL to use PostgreSQL and RQ workers)",
            settings.sqlalchemy_url,
        )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", workers=1)
