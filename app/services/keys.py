"""API keys: create (shown once), list, revoke, verify.

A key reads `sk_<id>_<secret>`: the id is public (it names the key in listings, logs and job
rows), the secret is 256 random bits. The database keeps only SHA-256(secret). A slow password
hash (bcrypt, scrypt) exists to make guessing *low-entropy* passwords expensive; nobody can
enumerate 2^256 secrets, so one fast hash is as safe here and keeps every request cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from datetime import datetime
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ApiKey, Scope

PREFIX = "sk"
SCOPES = tuple(s.value for s in Scope)
_KEY = re.compile(r"sk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class KeyCommandError(ValueError):
    """A bad name, scope or id given to the keys commands."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str, scope: str) -> tuple[ApiKey, str]:
    """(stored row, the full key). The key is not recoverable afterwards: print it once."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise KeyCommandError("a key name needs 1 to 100 characters")
    if scope not in SCOPES:
        raise KeyCommandError(f"unknown scope {scope!r}: choose one of {', '.join(SCOPES)}")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = ApiKey(id=key_id, name=name, scope=scope, secret_sha256=_digest(secret))
    session.add(row)
    session.commit()
    return row, f"{PREFIX}_{key_id}_{secret}"


def verify_key(session: Session, token: str) -> ApiKey | None:
    """The live key `token` names, or None (malformed, unknown, wrong secret or revoked)."""
    match = _KEY.fullmatch(token.strip())
    if match is None:
        return None
    key_id, secret = match.groups()
    row = session.get(ApiKey, key_id)
    if row is None:
        return None
    # Constant time: the comparison's duration says nothing about how much of it matched.
    if not hmac.compare_digest(_digest(secret), row.secret_sha256):
        return None
    return None if row.revoked_at is not None else row


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Mark the key revoked (its jobs keep their owner); revoking twice is harmless."""
    row = session.get(ApiKey, key_id.strip())
    if row is None:
        raise KeyCommandError(f"no key {key_id!r} (`surfing keys list` shows the ids)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def command(action: str, name: str | None = None, scope: str | None = None,
            key_id: str | None = None, out: TextIO | None = None) -> None:
    """`surfing keys create|list|revoke` against the configured database (DATABASE_URL, or the
    embedded SQLite file, migrated first like `surfing serve` would)."""
    out = out or sys.stdout
    from app.db import session_factory, upgrade_database
    from app.settings import get_settings

    settings = get_settings()
    if settings.should_migrate:
        upgrade_database(settings.sqlalchemy_url)
    with session_factory(settings.sqlalchemy_url)() as session:
        if action == "create":
            row, key = create_key(session, name or "", scope or "")
            print(f"created key {row.id} ({row.name!r}, scope {row.scope}):\n\n  {key}\n", file=out)
            print("This is the only time the key is shown; store it now. Send it as\n"
                  "  Authorization: Bearer <key>", file=out)
        elif action == "list":
            print(f"{'id':16}  {'scope':6}  {'created (UTC)':19}  {'revoked (UTC)':19}  name",
                  file=out)
            for k in list_keys(session):
                print(f"{k.id:16}  {k.scope:6}  {_when(k.created_at):19}  "
                      f"{_when(k.revoked_at):19}  {k.name}", file=out)
        elif action == "revoke":
            row = revoke_key(session, key_id or "")
            print(f"revoked key {row.id} ({row.name!r}) at {_when(row.revoked_at)} UTC", file=out)
        else:
            raise KeyCommandError(f"unknown action {action!r}")
