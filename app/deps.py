"""FastAPI dependencies: settings, db session, models store and queue come from app.state;
the caller (an API key, app.auth) from the Authorization header.

They live on app.state (set by create_app) rather than module globals so that tests can build
several apps with different settings in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth import Principal, require
from app.queue import JobQueue
from app.settings import Settings
from models_store import ModelStore


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_store(request: Request) -> ModelStore:
    return request.app.state.store  # type: ignore[no-any-return]


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ModelStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]

ReadKey = Annotated[Principal, Depends(require("read"))]  # the caller, allowed to read
SubmitKey = Annotated[Principal, Depends(require("submit"))]  # ... to submit and cancel its jobs
