"""Admission control for job-creating POSTs, and Idempotency-Key replays.

Each rule answers 429 problem+json with Retry-After:
- rate: a token bucket per key (SURFING_RATE_LIMIT_BURST, refilled at _PER_MIN). It lives in
  the API process, so N API processes together admit up to N times the rate.
- active: a key's queued + running jobs <= SURFING_MAX_ACTIVE_JOBS_PER_KEY.
- queue: queued jobs of everyone <= SURFING_MAX_QUEUED_JOBS.
- compute: the job's generator evaluations x targets (`estimate_evals`) <= SURFING_MAX_JOB_EVALS.
With auth off there is no key: only the queue and compute rules apply.

The counts and the insert they admit happen under one lock, held from the count until the
job row commits: a process lock for threads and, on PostgreSQL, a transaction-scoped advisory
lock for API processes. So concurrent submits never overshoot a quota.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from types import TracebackType
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app.auth import Principal, Rejected
from app.models import ACTIVE, Job, JobStatus
from app.problems import InvalidInput
from app.settings import Settings

# The solver defaults a request leaves unset (surfing.solvers.surf/direct, worker restarts).
SURF_STEPS, FINAL_STEPS, DIRECT_STEPS, RESTARTS = 20, 1000, 2000, 4
# lm-restarts: surfing.solvers.LM_RESTART_ROUNDS and StageRule.lm_iters
LM_ROUNDS, LM_ITERS = 3, 40
# surf's default schedule and its restart rounds on G_T: surfing.solvers.DEFAULT_SCHEDULE and
# surfing.portfolio.PORTFOLIO_ROUNDS / FEW_MEASUREMENT_ROUNDS (the latter when m <= 3k:
# FEW_MEASUREMENTS_PER_LATENT; kept here: the API does not import torch to admit a job)
DEFAULT_SCHEDULE, PORTFOLIO_ROUNDS, FEW_MEASUREMENT_ROUNDS = "portfolio", 2, 20
FEW_MEASUREMENTS_PER_LATENT = 3
ADVISORY_LOCK = 0x5355_5246  # "SURF": one cluster-wide lock id for admissions

_admit_lock = threading.Lock()


def too_many(detail: str, retry_after: float, rule: str, **extra: Any) -> Rejected:
    seconds = max(1, math.ceil(retry_after))
    return Rejected(
        429, detail, {"Retry-After": str(seconds)}, "Too many requests", rule=rule, **extra
    )


# ---- rate ------------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by key: `burst` at once, refilled continuously at `per_min`."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, per_min: float, burst: int) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is there."""
        if per_min <= 0:
            return 0.0
        rate = per_min / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate


limiter = RateLimiter()


def check_rate(settings: Settings, principal: Principal) -> None:
    if principal.key_id is None:
        return
    wait = limiter.take(principal.key_id, settings.rate_limit_per_min, settings.rate_limit_burst)
    if wait > 0:
        raise too_many(
            f"key {principal.key_id} may submit {settings.rate_limit_per_min:g} jobs per minute "
            f"(bursts of {settings.rate_limit_burst}); retry in {math.ceil(wait)} s",
            wait,
            "rate",
            limit_per_min=settings.rate_limit_per_min,
        )


# ---- compute ---------------------------------------------------------------------------------


def estimate_evals(method: str, params: dict[str, Any], n_targets: int) -> int:
    """Generator evaluations x targets the request allows: its Adam-step budget.

    surf: (checkpoints - 1) x steps + final_steps, doubled for the rescue pass every schedule
    but paper may run; with schedule portfolio (the default) plus its LM solves on G_T, as
    lm-restarts with `restarts` rounds, by default PORTFOLIO_ROUNDS (FEW_MEASUREMENT_ROUNDS when
    m <= 3k); adam:
    direct_steps; adam-restarts: restarts x direct_steps; hybrid: the surf pass (no rescue)
    + restarts x direct_steps; lm-restarts: (1 + restarts) solves of at most LM_ITERS
    Jacobians ((k + 1) / 2 each) and trial points (1/2 each), k = latent_dim.
    `params["stages"]` already counts stride.
    """
    steps = int(params.get("steps") or SURF_STEPS)
    final = int(params.get("final_steps") or FINAL_STEPS)
    direct = int(params.get("direct_steps") or DIRECT_STEPS)
    restarts = int(params.get("restarts") or RESTARTS)
    stages = int(params.get("stages") or 1)
    if method == "adam":
        per_target = direct
    elif method == "adam-restarts":
        per_target = restarts * direct
    elif method == "lm-restarts":
        per_target = lm_solves(params, int(params.get("restarts") or LM_ROUNDS))
    else:
        surfed = stages - 1 if method == "hybrid" else stages
        per_target = max(surfed - 1, 0) * steps + final
        if method == "hybrid":
            per_target += restarts * direct
        elif params.get("schedule") != "paper" and params.get("rescue") is not False:
            per_target *= 2
        if method == "surf" and (params.get("schedule") or DEFAULT_SCHEDULE) == "portfolio":
            per_target += lm_solves(params, portfolio_rounds(params))
    return per_target * n_targets


def portfolio_rounds(params: dict[str, Any]) -> int:
    """The request's `restarts`, else surfing.portfolio.portfolio_rounds from the job's params
    (m is set for cs jobs)."""
    if params.get("restarts") is not None:
        return int(params["restarts"])
    m, k = params.get("m"), int(params.get("latent_dim") or 1)
    few = m is not None and int(m) <= FEW_MEASUREMENTS_PER_LATENT * k
    return FEW_MEASUREMENT_ROUNDS if few else PORTFOLIO_ROUNDS


def lm_solves(params: dict[str, Any], rounds: int) -> int:
    """Evaluations per target of a first LM solve on G_T and `rounds` restarts, each at most
    LM_ITERS Jacobians ((k + 1) / 2 evaluations) plus a trial point (1/2), k = latent_dim."""
    k = int(params.get("latent_dim") or 1)
    return math.ceil((1 + rounds) * LM_ITERS * (k + 2) / 2)


def check_compute(settings: Settings, job: Job) -> None:
    cost = estimate_evals(job.method, job.params, job.n_targets)
    if cost > settings.max_job_evals:
        raise too_many(
            f"this job may cost {cost:,} generator evaluations x targets, over the per-job "
            f"cap of {settings.max_job_evals:,} (SURFING_MAX_JOB_EVALS): lower steps, "
            "final_steps, direct_steps or restarts, raise stride, or send fewer targets; "
            "resending it unchanged will not help",
            settings.admission_retry_after_s,
            "compute",
            estimate=cost,
            limit=settings.max_job_evals,
        )


# ---- idempotency -----------------------------------------------------------------------------


def idempotency_key(value: str | None) -> str | None:
    """The header's value, checked: 1-255 visible ASCII characters."""
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not all(33 <= ord(c) <= 126 for c in value):
        raise InvalidInput(
            "Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is ideal)",
            field="Idempotency-Key",
        )
    return value


def request_hash(path: str, fields: dict[str, Any], files: dict[str, bytes]) -> str:
    """SHA-256 of the canonical request: the URL path, the fields as sorted compact JSON and
    each upload's SHA-256 (so key order and whitespace do not make two requests differ)."""
    canonical = {
        "path": path,
        "fields": fields,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class Replay(Exception):
    """The request repeats an earlier one: answer with that job."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def find_replay(session: Session, owner: str | None, key: str, digest: str) -> str | None:
    """The job an earlier request with this key created (None if none); 422 if its body
    differed."""
    owner_is = Job.owner_key_id.is_(None) if owner is None else Job.owner_key_id == owner
    row = session.execute(
        select(Job.id, Job.request_hash).where(owner_is, Job.idempotency_key == key)
    ).one_or_none()
    if row is None:
        return None
    if row.request_hash != digest:
        raise InvalidInput(
            f"Idempotency-Key {key!r} was already used for a different request (job "
            f"{row.id}); use a new key for a new request",
            field="Idempotency-Key",
            job_id=row.id,
        )
    return str(row.id)


# ---- the gate --------------------------------------------------------------------------------


class Gate:
    """`with Gate(...) as gate: create_*_job(..., admit=gate)`: the job service calls the gate
    with the finished row just before committing it; the gate checks the rules, stamps owner
    and idempotency key, and holds the admission lock until that commit (or the block's end)."""

    def __init__(
        self,
        settings: Settings,
        principal: Principal,
        idem_key: str | None = None,
        digest: str | None = None,
    ) -> None:
        self.settings, self.principal = settings, principal
        self.idem_key, self.digest = idem_key, digest
        self._held = False

    def __enter__(self) -> Gate:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()

    def _release(self, *_: Any) -> None:
        if self._held:
            self._held = False
            _admit_lock.release()

    def __call__(self, session: Session, job: Job) -> None:
        settings, owner = self.settings, self.principal.key_id
        check_compute(settings, job)
        if not _admit_lock.acquire(timeout=10):
            raise too_many("the API is busy admitting jobs", settings.admission_retry_after_s,
                           "busy")
        self._held = True
        event.listen(session, "after_commit", self._release, once=True)
        if session.get_bind().dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(ADVISORY_LOCK)))
        if self.idem_key is not None:
            assert self.digest is not None
            earlier = find_replay(session, owner, self.idem_key, self.digest)
            if earlier is not None:
                raise Replay(earlier)
        queued = session.scalar(
            select(func.count()).select_from(Job).where(Job.status == JobStatus.queued.value)
        )
        if queued is not None and queued >= settings.max_queued_jobs:
            raise too_many(
                f"the queue is full ({queued} jobs waiting, SURFING_MAX_QUEUED_JOBS = "
                f"{settings.max_queued_jobs}); retry later",
                settings.admission_retry_after_s,
                "queue",
                limit=settings.max_queued_jobs,
            )
        if owner is not None:
            active = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.owner_key_id == owner, Job.status.in_(ACTIVE))
            )
            if active is not None and active >= settings.max_active_jobs_per_key:
                raise too_many(
                    f"key {owner} has {active} queued or running jobs, its limit "
                    f"(SURFING_MAX_ACTIVE_JOBS_PER_KEY = {settings.max_active_jobs_per_key}); "
                    "retry when one has finished, or cancel one",
                    settings.admission_retry_after_s,
                    "active",
                    limit=settings.max_active_jobs_per_key,
                )
        job.owner_key_id = owner
        job.idempotency_key, job.request_hash = self.idem_key, self.digest
