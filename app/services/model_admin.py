"""Model administration: upload a trajectory archive, delete a model, render its samples.

An upload is streamed to a hidden `.upload-*` folder under the models root (same filesystem),
extracted there member by member under the same size cap, checked in full (manifest schema,
member names, sizes and SHA-256s, the architecture, a strict load of the first and last
checkpoint), and only then renamed into the store: one rename makes it visible, and every
failure path removes the folder. Nothing an archive says is executed or imported.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import math
import os
import re
import shutil
import tarfile
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import numpy as np
from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from app import arrays
from app.auth import auth_mode, authenticate, bearer_token, check_scope
from app.db import session_factory
from app.models import ACTIVE, Job
from app.problems import InvalidInput, NotFound, Problem, TooLarge
from app.services.jobs import load_manifest
from app.settings import Settings
from models_store import (
    ENCODINGS,
    InvalidModelId,
    MalformedManifest,
    Manifest,
    ModelNotFound,
    ModelStore,
    StoreError,
    validate_model_id,
)
from models_store._atomic import fsync_dir
from models_store.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

UPLOAD_ROUTES = frozenset({("POST", "/models")})  # bodies capped here, not by BodySizeLimit
UPLOAD_PREFIX = ".upload-"  # hidden: ModelStore.list_models skips dot-folders
STALE_UPLOAD_S = 3600.0  # an upload folder untouched this long belongs to a dead request
MAX_MEMBERS = 100_000
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
CHUNK = 1024 * 1024
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # as models_store.manifest allows

SAMPLE_COLUMNS, SAMPLE_PAD = 8, 2
SAMPLE_VALUES = 64 * 3 * 64 * 64  # most output values rendered per grid (bounded time)
SAMPLE_SEED = 0


# ---- access ------------------------------------------------------------------------------


def require_admin(settings: Settings, authorization: str | None) -> None:
    """With auth on (app.auth): an admin-scope API key, else 401/403. With auth off (the local
    embedded mode): 403 while SURFING_MODEL_ADMIN is off; then 401 unless the optional
    SURFING_ADMIN_TOKEN matches."""
    if auth_mode(settings)[0]:
        sessions = session_factory(settings.sqlalchemy_url)  # the app's engine (one per URL)
        principal = authenticate(sessions, settings, bearer_token(authorization))
        check_scope(principal, "admin")
        return
    if not settings.model_admin:
        raise Problem(
            403,
            "model administration is off: set SURFING_MODEL_ADMIN=true to enable POST /models "
            "and DELETE /models/{id} (and SURFING_ADMIN_TOKEN to require a bearer token)",
        )
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        # HTTPException, not Problem: the problem handler keeps its WWW-Authenticate header.
        raise HTTPException(
            401,
            "model administration needs `Authorization: Bearer <SURFING_ADMIN_TOKEN>`",
            headers={"WWW-Authenticate": "Bearer"},
        )


# ---- upload ------------------------------------------------------------------------------


def new_upload_dir(root: Path) -> Path:
    """A fresh hidden work folder under the models root (so the final rename is atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}"
    folder.mkdir()
    return folder


def sweep_stale_uploads(root: Path, older_than_s: float = STALE_UPLOAD_S) -> int:
    """Remove `.upload-*` folders nothing has written to for a while (a killed process's)."""
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        if not entry.name.startswith(UPLOAD_PREFIX) or not entry.is_dir():
            continue
        try:
            newest = max(
                [entry.stat().st_mtime]
                + [os.stat(os.path.join(d, f)).st_mtime for d, _, fs in os.walk(entry) for f in fs]
            )
        except OSError:
            continue  # removed meanwhile
        if time.time() - newest > older_than_s:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
            log.info("removed stale upload folder %s", entry)
    return removed


async def save_body(
    chunks: AsyncIterator[bytes], dest: Path, cap: int, declared: str | None
) -> int:
    """Stream the request body into `dest`, refusing (413) as soon as it passes `cap`."""
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _too_large(cap)
    total = 0
    try:
        with open(dest, "wb") as f:
            async for chunk in chunks:
                total += len(chunk)
                if total > cap:
                    raise _too_large(cap)
                f.write(chunk)
    except ClientDisconnect:
        raise Problem(400, "the upload was interrupted before the archive was complete") from None
    if total == 0:
        raise Problem(400, "empty request body: send the model archive (tar or tar.gz) as the body")
    return total


def _too_large(cap: int) -> TooLarge:
    return TooLarge(
        f"model archive exceeds the limit of {cap} bytes (SURFING_MAX_MODEL_UPLOAD_BYTES)",
        limit=cap,
    )


def install_archive(store: ModelStore, archive: Path, work: Path, cap: int) -> Manifest:
    """Check the archive in `work` completely, then rename the model into the store."""
    extracted = work / ".x"  # ids cannot start with ".", so no model id collides with it
    members = _extract(archive, extracted, cap)
    archive.unlink()  # its bytes now live in `extracted`
    if MANIFEST_NAME not in members:
        raise InvalidInput(f"the archive has no {MANIFEST_NAME} at its top level")
    manifest = _parse_manifest(extracted / MANIFEST_NAME)
    model_id = manifest.model_id
    if store.path(model_id).exists():
        raise Problem(409, f"model {model_id!r} already exists", model_id=model_id)
    _check_listing(manifest, members)
    staged = work / model_id
    os.rename(extracted, staged)
    fsync_dir(staged)
    _check_weights(ModelStore(work), manifest)
    try:
        os.rename(staged, store.path(model_id))  # the one step that makes it visible
    except OSError:
        raise Problem(409, f"model {model_id!r} already exists", model_id=model_id) from None
    fsync_dir(store.root)
    log.info("installed uploaded model %s (%d checkpoints)", model_id, len(manifest.checkpoints))
    return store.manifest(model_id)


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The plain file name of a member; None for the archive's own "." folder; else 422."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    if member.isdir() and name.rstrip("/") in ("", "."):
        return None
    if not member.isreg():
        kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else (
            "folder" if member.isdir() else "device or special file"
        )
        raise InvalidInput(
            f"archive member {member.name!r} is a {kind}: only regular files are allowed"
        )
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"archive member {member.name!r} is not a plain file name: the archive must hold "
            f"{MANIFEST_NAME} and the checkpoint files at its top level, nothing else"
        )
    return name


class _WriteFailed(RuntimeError):
    """Writing an extracted file failed (disk full...): the server's problem, not the archive's."""


def _extract(archive: Path, dest: Path, cap: int) -> dict[str, tuple[int, str]]:
    """Extract regular top-level files in one streaming pass: name -> (bytes, sha256)."""
    dest.mkdir()
    found: dict[str, tuple[int, str]] = {}
    total = 0
    try:
        with tarfile.open(archive, mode="r|*") as tf:
            for member in tf:
                name = _member_name(member)
                if name is None:
                    continue
                if name in found:
                    raise InvalidInput(f"archive member {name!r} appears twice")
                if len(found) >= MAX_MEMBERS:
                    raise InvalidInput(f"the archive has more than {MAX_MEMBERS} members")
                if name == MANIFEST_NAME and member.size > MAX_MANIFEST_BYTES:
                    raise InvalidInput(f"{MANIFEST_NAME} is over {MAX_MANIFEST_BYTES} bytes")
                total += member.size
                if total > cap:  # a small compressed archive may unpack to a huge one
                    raise _too_large(cap)
                src = tf.extractfile(member)
                assert src is not None  # a regular file always has a reader
                found[name] = _copy(src, dest / name, member.size)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise Problem(
            400, f"the upload is not a complete tar (or tar.gz) archive: {e}"
        ) from None
    return found


def _copy(src: IO[bytes], path: Path, size: int) -> tuple[int, str]:
    digest, n = hashlib.sha256(), 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with open(fd, "wb", closefd=True) as f:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            n += len(chunk)
            try:
                f.write(chunk)
            except OSError as e:
                raise _WriteFailed(f"cannot write {path}: {e}") from e
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise _WriteFailed(f"cannot write {path}: {e}") from e
    if n != size:
        raise tarfile.ReadError(f"member {path.name!r} is truncated ({n} of {size} bytes)")
    return n, digest.hexdigest()


def _parse_manifest(path: Path) -> Manifest:
    try:
        raw = json.loads(path.read_bytes())
        manifest = Manifest.from_dict(raw)
    except ValueError as e:  # JSON and UTF-8 errors
        raise InvalidInput(f"{MANIFEST_NAME} is not valid JSON: {e}") from None
    except MalformedManifest as e:
        raise InvalidInput(f"{MANIFEST_NAME}: {e}") from None
    if not manifest.complete:
        raise InvalidInput(
            f"{MANIFEST_NAME} says complete: false; upload a finished trajectory"
        )
    if manifest.encoding not in ENCODINGS:
        known = ", ".join(ENCODINGS)
        raise InvalidInput(f"{MANIFEST_NAME}: encoding {manifest.encoding!r} is not {known}")
    if not manifest.checkpoints:
        raise InvalidInput(f"{MANIFEST_NAME} lists no checkpoints")
    steps = [c.step for c in manifest.checkpoints]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise InvalidInput(f"{MANIFEST_NAME}: checkpoint steps must increase, got {steps}")
    from surfing.architectures import UnknownArchitecture, get_factory

    try:
        get_factory(manifest.arch.get("kind"))
    except UnknownArchitecture as e:
        raise InvalidInput(str(e), field="arch") from None
    return manifest


def _check_listing(manifest: Manifest, members: dict[str, tuple[int, str]]) -> None:
    """Exactly the manifest and its checkpoints, with the sizes and hashes it records."""
    files = [c.file for c in manifest.checkpoints]
    if len(set(files)) != len(files) or MANIFEST_NAME in files:
        raise InvalidInput(f"{MANIFEST_NAME} lists a checkpoint file twice")
    extra = sorted(set(members) - {MANIFEST_NAME, *files})
    if extra:
        raise InvalidInput(f"archive member {extra[0]!r} is not listed in {MANIFEST_NAME}")
    missing = [f for f in files if f not in members]
    if missing:
        raise InvalidInput(f"checkpoint {missing[0]!r} listed in {MANIFEST_NAME} is missing")
    for c in manifest.checkpoints:
        size, sha = members[c.file]
        if size != c.bytes:
            raise InvalidInput(f"{c.file}: {size} bytes, {MANIFEST_NAME} says {c.bytes}")
        if sha != c.sha256:
            raise InvalidInput(f"{c.file}: SHA-256 {sha} does not match {MANIFEST_NAME}")


def _check_weights(staged: ModelStore, manifest: Manifest) -> None:
    """The architecture maps the manifest's latents to its output shape, and the first and
    last checkpoint load strictly into it."""
    from surfing.architectures import check_state
    from surfing.importer import infer_shapes

    try:
        infer_shapes(manifest.arch, manifest.latent_dim, manifest.output_shape)
    except ValueError as e:  # ImportFailed, or a config the factory rejects
        raise InvalidInput(f"{MANIFEST_NAME}: {e}", field="arch") from None
    for index in sorted({0, len(manifest.checkpoints) - 1}):
        file = manifest.checkpoints[index].file
        try:
            check_state(manifest.arch, staged.load(manifest.model_id, index))
        except (StoreError, ValueError) as e:  # StateMismatch, a config the factory rejects
            raise InvalidInput(f"checkpoint {index} ({file}): {e}") from None


# ---- delete ------------------------------------------------------------------------------


def delete_model(session: Session, store: ModelStore, model_id: str) -> None:
    """Delete unless jobs for the model are queued or running (409 then)."""
    try:
        validate_model_id(model_id)
    except InvalidModelId as e:
        raise InvalidInput(str(e), field="model_id") from None
    active = session.scalar(
        select(func.count()).select_from(Job).where(
            Job.model_id == model_id, Job.status.in_(ACTIVE)
        )
    )
    if active:
        raise Problem(
            409,
            f"model {model_id!r} has {active} queued or running job(s): cancel them "
            "(DELETE /jobs/{id}) or wait for them to finish, then delete it",
            model_id=model_id,
            active_jobs=active,
        )
    try:
        store.delete(model_id)
    except ModelNotFound:
        raise NotFound(f"unknown model {model_id!r}", model_id=model_id) from None
    log.info("deleted model %s", model_id)


# ---- samples -----------------------------------------------------------------------------

_samples: OrderedDict[tuple[object, ...], tuple[bytes, int]] = OrderedDict()
_samples_lock = threading.Lock()  # one render at a time: concurrent asks wait for the cache


def sample_count(manifest: Manifest, n: int) -> int:
    """n, lowered for big outputs so a grid costs at most SAMPLE_VALUES values (never < 16)."""
    return max(16, min(n, SAMPLE_VALUES // manifest.n_pixels))


def samples_png(store: ModelStore, model_id: str, n: int = 64, scale: int = 2) -> tuple[bytes, int]:
    """(PNG of G_T on seeded prior draws, samples shown); cached per model version."""
    manifest = load_manifest(store, model_id)
    count = sample_count(manifest, n)
    key = (model_id, manifest.created_at, manifest.checkpoints[-1].sha256, count, scale)
    with _samples_lock:
        if key in _samples:
            _samples.move_to_end(key)
            return _samples[key]
        result = _render(store, manifest, count, scale), count
        _samples[key] = result
        while len(_samples) > 32:
            _samples.popitem(last=False)
        return result


def _render(store: ModelStore, manifest: Manifest, count: int, scale: int) -> bytes:
    import torch

    from surfing.latents import sample_latents
    from surfing.trajectory import final_generator

    G = final_generator(store, manifest.model_id)
    z = sample_latents(count, manifest.latent_dim, SAMPLE_SEED, manifest.latent_prior)
    with torch.no_grad():
        out = G(z).float().reshape(count, -1).numpy()
    if out.shape[1] != manifest.n_pixels:
        raise Problem(
            409,
            f"model {manifest.model_id!r}: G_T produces {out.shape[1]} values per sample, the "
            f"manifest's output_shape {manifest.output_shape} has {manifest.n_pixels}",
        )
    grid = sample_grid(out.reshape(count, *manifest.output_shape), manifest.value_range)
    return arrays.to_png(grid, manifest.value_range, scale)


def sample_grid(images: np.ndarray, value_range: list[float]) -> np.ndarray:
    """(N, *shape) samples tiled SAMPLE_COLUMNS wide on a white (value_range high) background,
    as one (C, H, W) picture; 2-d samples are one channel, vectors one row each."""
    n = images.shape[0]
    if images.ndim == 2:
        images = images[:, None, None, :]
    elif images.ndim == 3:
        images = images[:, None]
    elif images.ndim != 4:
        images = images.reshape(n, 1, 1, -1)
    _, c, h, w = images.shape
    cols = min(SAMPLE_COLUMNS, n)
    rows = math.ceil(n / cols)
    pad = SAMPLE_PAD
    grid = np.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), value_range[1], np.float32)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid
