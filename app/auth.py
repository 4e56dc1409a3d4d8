"""Who is asking: API keys as Bearer tokens, their scopes, and whether auth is on at all.

Scopes nest: read (GET own jobs, models) < submit (+ POST jobs, cancel own) < admin (+ model
management, every job). A key sees only its own jobs; another key's job answers 404, exactly
like a job that does not exist, so ids cannot be probed.

SURFING_AUTH=auto turns auth off only for the local embedded mode (no Redis, SQLite) bound to a
loopback address: one user on one machine. There every request is the anonymous local user,
and model management stays behind SURFING_MODEL_ADMIN (app.services.model_admin).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.problems import Problem, problem_response
from app.services.keys import verify_key
from app.settings import Settings

log = logging.getLogger("surfing.auth")

RANK = {"read": 0, "submit": 1, "admin": 2}
HOW_TO_GET_A_KEY = (
    "create one with `surfing keys create --name NAME --scope submit` (run where the API's "
    "DATABASE_URL or SURFING_STATE_DIR is set) and send it as `Authorization: Bearer <key>`"
)

# OpenAPI entries of the answers every route behind a key may give.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API key (problem+json; WWW-Authenticate: Bearer)."},
    403: {"description": "The key's scope does not allow this (problem+json)."},
}

bearer = HTTPBearer(auto_error=False, description="An API key from `surfing keys create`.")


class Rejected(Problem):
    """A problem that carries response headers (WWW-Authenticate on 401, Retry-After on 429)."""

    def __init__(
        self, status: int, detail: str, headers: dict[str, str], title: str, **extra: Any
    ) -> None:
        super().__init__(status, detail, title=title, **extra)
        self.headers = headers


def unauthorized(detail: str) -> Rejected:
    return Rejected(401, detail, {"WWW-Authenticate": "Bearer"}, "Unauthorized")


@dataclass(frozen=True)
class Principal:
    """The caller: an API key, or the anonymous local user when auth is off (key_id None)."""

    key_id: str | None
    scope: str
    name: str

    def allows(self, scope: str) -> bool:
        return RANK[self.scope] >= RANK[scope]

    @property
    def owner_filter(self) -> str | None:
        """Whose jobs this caller may see: its own key's, or None for all (admin, auth off)."""
        return None if self.key_id is None or self.scope == "admin" else self.key_id


ANONYMOUS = Principal(None, "admin", "local user (auth off)")


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def auth_mode(settings: Settings) -> tuple[bool, str]:
    """(auth on?, why) for these settings."""
    if settings.auth != "auto":
        return settings.auth == "on", f"SURFING_AUTH={settings.auth}"
    local = settings.embedded and settings.sqlalchemy_url.startswith("sqlite")
    if local and is_loopback(settings.bind_host):
        return False, (
            f"SURFING_AUTH=auto in the embedded mode (SQLite, in-process runner) bound to the "
            f"loopback address {settings.bind_host}: only this machine can connect"
        )
    why = "the API is bound to a non-loopback address " + repr(settings.bind_host)
    if not local:
        why = "DATABASE_URL/REDIS_URL select a shared deployment"
    return True, f"SURFING_AUTH=auto and {why}"


def authenticate(
    sessions: Callable[[], Session], settings: Settings, token: str | None
) -> Principal:
    """The principal `token` stands for; 401 when auth is on and it names no live key."""
    enabled, _ = auth_mode(settings)
    if not enabled:
        return ANONYMOUS
    if not token:
        raise unauthorized(f"this API needs an API key: {HOW_TO_GET_A_KEY}")
    with sessions() as session:
        row = verify_key(session, token)
    if row is None:
        raise unauthorized("the API key is unknown, malformed or revoked")
    return Principal(row.id, row.scope, row.name)


def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    state = request.app.state
    token = credentials.credentials if credentials else None
    return authenticate(state.sessions, state.settings, token)


def check_scope(principal: Principal, scope: str) -> Principal:
    """`principal`, or 403 unless its scope includes `scope`."""
    if not principal.allows(scope):
        raise Rejected(
            403,
            f"this needs a key with scope {scope!r}; key {principal.key_id} has "
            f"{principal.scope!r}",
            {},
            "Forbidden",
        )
    return principal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def require(scope: str) -> Callable[[Principal], Principal]:
    """A dependency that answers 401 without a valid key and 403 if its scope is too small."""

    def dependency(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        return check_scope(principal, scope)

    return dependency


def install(app: FastAPI, settings: Settings) -> None:
    """Answer `Rejected` with its headers, and say at start-up whether auth is on and why."""

    async def _rejected(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Rejected)
        response = problem_response(exc, request.url.path)
        response.headers.update(exc.headers)
        return response

    app.add_exception_handler(Rejected, _rejected)
    enabled, why = auth_mode(settings)
    if enabled:
        log.info("auth is ON (%s): every request but /healthz, /readyz, /metrics and the docs "
                 "needs an API key; %s", why, HOW_TO_GET_A_KEY)
    else:
        log.warning("auth is OFF (%s); set SURFING_AUTH=on to require API keys", why)
