"""Coalescing: one pass over a trajectory for every queued job that can share it.

Targets are independent under surfing (see `surfing.solvers`), so jobs for the same model with
the same measurement matrix and the same solver options can run as one batch: each checkpoint
is loaded and evaluated once for all of them, which is where batching's throughput comes from
(docs/performance.md). Each job still gets exactly its own result (`split_result`), its own
seeded starting points and its own guarded status transitions; the batch is only a way of
doing the arithmetic.

A job may join another's pass only when that cannot change its answer:
- same kind, model, method and options (the seed excepted: starting points are drawn per job);
- the same matrix A (same seed and m, or byte-identical explicit matrices);
- a method whose per-target path ignores the rest of the batch. hybrid and adam-restarts draw
  their starts for the whole batch from one seed, and Adam with a gradient tolerance stops
  when *every* target is below it (so does the Adam stage on theta_0 that every surf schedule
  runs), so those always run alone. lm-restarts draws each target's restarts from its own
  x_init and the seed (`surfing.solvers.restart_latents`), so it shares a pass with jobs of
  the same seed. surf's default schedule, portfolio, draws its restarts and rescues from each
  target's x_init with fixed salts, and which targets surf depends only on their own
  residuals, so its jobs share a pass whatever their seeds.

Only first attempts share a pass. A retry (a job re-queued after its attempt was lost, perhaps
because that very job crashed its worker) runs alone: its leader never takes companions
(`worker.attempt`) and it is never taken as one (attempt == 0 below), so a crash it causes
again costs no other job an attempt.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, JobInput, JobStatus

# Options that differ per job without changing how its targets are solved.
PER_JOB_PARAMS = frozenset({"seed", "x_init", "source", "true_image"})
# How many queued jobs one claim looks at (oldest first); the rest wait for the next pass.
SCAN_LIMIT = 500


def can_share_pass(method: str, params: dict[str, Any]) -> bool:
    """True when a job's targets follow the same path inside a bigger batch as alone."""
    if method in ("surf", "adam"):  # tol ends an Adam stage (surf: at least θ_0's) only once
        return params.get("tol") is None  # every target of the batch is below it
    if method == "lm-restarts":  # per-target LM and per-target restart draws
        return True
    return False  # hybrid, adam-restarts: restart starts are drawn for the batch as a whole


def pass_key(job: Job) -> str | None:
    """Jobs with equal keys can share a pass if their explicit matrices (if any) are equal too;
    None = this job always runs alone. The params hold the matrix spec ({seed, m} or
    "explicit"), so rows need not be loaded with their arrays to be compared."""
    params = dict(job.params)
    if not can_share_pass(job.method, params):
        return None
    per_job = PER_JOB_PARAMS - {"seed"} if job.method == "lm-restarts" else PER_JOB_PARAMS
    shared = {k: v for k, v in sorted(params.items()) if k not in per_job}
    return json.dumps([job.kind, job.model_id, job.method, shared], sort_keys=True, default=str)


def _matrix_digest(session: Session, job_id: str) -> str | None:
    matrix = session.scalar(select(JobInput.matrix).where(JobInput.job_id == job_id))
    return hashlib.sha256(matrix).hexdigest() if matrix is not None else None


def find_companions(sessions: sessionmaker[Session], leader_id: str, max_targets: int) -> list[str]:
    """Queued jobs that can join the leader's pass, oldest first, while the pass holds at most
    `max_targets` targets. The caller claims them one by one with the usual guarded
    `queued -> running` UPDATE, so one that another worker took (or a client canceled) in the
    meantime is simply skipped; the queue entries of claimed jobs stay behind and are skipped
    as "not queued" when a worker pops them."""
    with sessions() as s:
        leader = s.get(Job, leader_id)
        if leader is None:
            return []
        key = pass_key(leader)
        room = max_targets - leader.n_targets
        if key is None or room <= 0:
            return []
        explicit = leader.params.get("matrix") == "explicit"
        digest = _matrix_digest(s, leader_id) if explicit else None
        candidates = s.scalars(
            select(Job)
            .where(
                Job.status == JobStatus.queued.value,
                Job.attempt == 0,  # retries run alone
                Job.model_id == leader.model_id,
                Job.kind == leader.kind,
                Job.method == leader.method,
                Job.id != leader_id,
                Job.n_targets <= room,
            )
            .order_by(Job.created_at, Job.id)
            .limit(SCAN_LIMIT)
        ).all()
        chosen = []
        for job in candidates:
            if job.n_targets > room or pass_key(job) != key:
                continue
            if explicit and _matrix_digest(s, job.id) != digest:
                continue
            chosen.append(job.id)
            room -= job.n_targets
        return chosen
