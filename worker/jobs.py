"""The job function, `run_job(job_id)` (the same under RQ and in the embedded runner), and its
solve step: load the pass, run the solver, split the result per job.

What happens to the rows (claim, companions, heartbeat, finish, fail) is `worker.attempt`'s
business, through `app.lifecycle`; progress and cancellation checks from inside the solver are
`worker.progress`'s. This module only computes: `solve_pass` turns the claimed members of a
pass into one `JobResult` per job.

An attempt may carry companions (`worker.coalesce`): queued jobs for the same model, matrix and
options, solved in the same pass over the trajectory on the concatenated targets (each job with
its own seeded or given starting points) and split back with `split_result`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app import arrays
from app.db import session_factory
from app.lifecycle import (
    Heartbeat,
    JobAborted,
    Member,
    claim,
    fail,
    reap_stale_jobs,
)
from app.lifecycle import finish as _finish
from app.models import Job, JobResult
from app.settings import Settings, get_settings
from surfing.architectures import get_factory
from surfing.latents import sample_latents
from surfing.measure import gaussian_matrix
from surfing.solvers import (
    DEFAULT_SCHEDULE,
    LM_RESTART_ROUNDS,
    SolveResult,
    StageRule,
    StageTrace,
    direct,
    direct_restarts,
    hybrid,
    lm_restarts,
    split_result,
    surf,
)
from surfing.trajectory import final_generator, generators
from worker.attempt import Outcome, PassOutcome, run_attempt
from worker.cache import WarmStore
from worker.progress import Hooked, JobTimedOut, Tracker
from worker.runtime import pick_device, prepare_runtime, warm_store, worker_name

log = logging.getLogger(__name__)

# Kept importable from here: tests and tools reach the transitions through this module.
__all__ = [
    "Heartbeat",
    "JobAborted",
    "JobTimedOut",
    "Member",
    "_finish",
    "claim",
    "embedded_runner",
    "fail",
    "on_rq_failure",
    "pick_device",
    "prepare_runtime",
    "run_job",
    "solve_pass",
    "warm_store",
    "worker_name",
]


def run_job(job_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Run one attempt of job `job_id` (RQ calls this with the id only), together with the
    queued jobs that can share its pass over the trajectory."""
    settings = settings or get_settings()
    return run_attempt(session_factory(settings.sqlalchemy_url), job_id, settings, solve_pass)


def embedded_runner(settings: Settings) -> Any:
    """The in-process runner's factory (app.queue.EMBEDDED_RUNNER): set up torch once, then
    run jobs by id."""
    prepare_runtime(settings)
    return lambda job_id: run_job(job_id, settings=settings)


def _opts(params: dict[str, Any], *names: str) -> dict[str, Any]:
    """Solver keyword arguments the client set; unset ones keep the solver's defaults."""
    return {n: params[n] for n in names if params.get(n) is not None}


@dataclass
class Pass:
    """The inputs of every job in one pass, concatenated in member order."""

    kind: str
    model_id: str
    n_pixels: int
    method: str
    params: dict[str, Any]  # the first job's; the others differ only in PER_JOB_PARAMS
    stages_total: int
    b: torch.Tensor  # (B, n) images or (B, m) measurements
    x0: torch.Tensor  # (B, k)
    prior: str  # the manifest's latent prior: starts, restarts and rescue draws
    A: torch.Tensor | None
    sizes: list[int]  # targets per member
    targets: list[torch.Tensor | None]  # per member: the true images, when known
    started_at: list[Any]  # per member
    given_x0: bool  # the first job's x_init was given (only matters for restarts)


def _load_pass(
    sessions: sessionmaker[Session], members: list[Member], store: WarmStore, device: torch.device
) -> Pass:
    jobs = []
    with sessions() as s:
        for m in members:
            job = s.scalars(
                select(Job).where(Job.id == m.job_id).options(selectinload(Job.inputs))
            ).one()
            s.expunge(job)
            jobs.append(job)
    first = jobs[0]
    manifest = store.manifest(first.model_id)
    get_factory(manifest.arch.get("kind"))  # UnknownArchitecture before any work is done
    n, k = manifest.n_pixels, manifest.latent_dim
    A: torch.Tensor | None = None
    if first.kind == "cs":
        inp = first.inputs
        if inp.matrix is not None:
            A = torch.from_numpy(arrays.from_npy(inp.matrix))
        else:
            A = gaussian_matrix(int(inp.matrix_seed), int(inp.m), n)
        A = A.to(device)
    bs, x0s, targets = [], [], []
    for job in jobs:
        inp = job.inputs
        target = (
            torch.from_numpy(arrays.from_npy(inp.target)).to(device)
            if inp.target is not None
            else None
        )
        if job.kind == "invert":
            assert target is not None
            b = target.flatten(1)
        else:
            b = torch.from_numpy(arrays.from_npy(inp.measurements)).to(device)
        x0 = (  # each job's own seed, so a coalesced pass starts every job where it would alone
            torch.from_numpy(arrays.from_npy(inp.x_init)).to(device)
            if inp.x_init is not None
            else sample_latents(
                b.shape[0], k, int(job.params.get("seed", 0)), manifest.latent_prior, device
            )
        )
        bs.append(b)
        x0s.append(x0)
        targets.append(target)
    return Pass(
        kind=first.kind,
        model_id=first.model_id,
        n_pixels=n,
        method=first.method,
        params=dict(first.params),
        stages_total=int(first.stages or first.params.get("stages") or 1),
        b=torch.cat(bs),
        x0=torch.cat(x0s),
        prior=manifest.latent_prior,
        A=A,
        sizes=[b.shape[0] for b in bs],
        targets=targets,
        started_at=[job.started_at for job in jobs],
        given_x0=first.inputs.x_init is not None,
    )


def _solve(
    job: Pass, store: WarmStore, device: torch.device, tracker: Tracker, graphs: bool = False
) -> SolveResult:
    """Run the job's method on the whole pass. `graphs` applies to "surf" only: direct Adam
    counts progress with a forward hook, which a replayed graph would not call."""
    params, model_id, b, x0, A = job.params, job.model_id, job.b, job.x0, job.A
    seed = int(params.get("seed", 0))
    stride = int(params.get("stride", 1))
    lr_tol = _opts(params, "lr", "tol")
    restarts = int(params.get("restarts") or 4)
    if job.method in ("surf", "hybrid"):
        stages = Hooked(generators(store, model_id, stride=stride, device=device), tracker)
        if job.method == "surf":
            rule = StageRule(rescue_rtol=None) if params.get("rescue") is False else None
            # `restarts` are the portfolio's rounds; a job queued before the API refused them
            # with another schedule (where they were ignored) still runs, ignoring them
            given = params.get("restarts")
            on_portfolio = (params.get("schedule") or DEFAULT_SCHEDULE) == "portfolio"
            rounds = int(given) if given is not None and on_portfolio else None
            return surf(
                stages,
                b,
                x0,
                A,
                progress=tracker.on_stage,
                graphs=graphs,
                rule=rule,
                prior=job.prior,
                rounds=rounds,
                **_opts(params, "steps", "final_steps", "schedule"),
                **lr_tol,
            )
        # seed + 1 for the restarts: with the same seed the first restart would repeat x0.
        return hybrid(
            stages,
            b,
            x0,
            restarts,
            seed + 1,
            A,
            progress=tracker.on_stage,
            prior=job.prior,
            **_opts(params, "steps", "final_steps", "direct_steps"),
            **lr_tol,
        )
    G = final_generator(store, model_id, device=device)
    G.register_forward_hook(tracker.on_forward)
    if job.method == "lm-restarts":
        ckpts = store.manifest(model_id).checkpoints  # G_T's index and step, for the trace
        return lm_restarts(
            G,
            b,
            x0,
            A,
            int(params.get("restarts") or LM_RESTART_ROUNDS),
            seed=seed,
            prior=job.prior,
            progress=tracker.on_stage,
            index=len(ckpts) - 1,
            step=ckpts[-1].step,
        )
    steps = _opts(params, "direct_steps")
    if "direct_steps" in steps:
        steps = {"steps": steps["direct_steps"]}
    if job.method == "adam":
        return direct(G, b, x0, A, **steps, **lr_tol)
    return direct_restarts(
        G,
        b,
        restarts,
        seed,
        A,
        x0 if job.given_x0 else None,
        prior=job.prior,
        latent_dim=x0.shape[1],
        **steps,
        **lr_tol,
    )


def solve_pass(
    sessions: sessionmaker[Session], members: list[Member], settings: Settings, beat: Heartbeat
) -> PassOutcome:
    """The solve step of an attempt: one pass for all members, one JobResult per member."""
    started = time.monotonic()
    device = pick_device(settings)
    store = warm_store(settings, device)
    job = _load_pass(sessions, members, store, device)

    tracker = Tracker(
        sessions=sessions,
        members=members,
        sizes=job.sizes,
        stages=job.stages_total,
        interval=settings.progress_interval_s,
        deadline=started + settings.job_timeout_s,
        timeout_s=settings.job_timeout_s,
        heartbeat=beat,
        b=job.b,
        A=job.A,
    )
    tracker.maybe_write(force=True)
    t0 = time.perf_counter()
    res = _solve(job, store, device, tracker, settings.cuda_graphs)
    solve_s = time.perf_counter() - t0
    tracker.check()

    G_T = final_generator(store, job.model_id, device=device)
    with torch.no_grad():
        recon = G_T(res.x.to(device))
        residual = (
            (recon.flatten(1) @ job.A.T - job.b).pow(2).sum(dim=1) / job.A.shape[0]
            if job.A is not None
            else None
        )
    parts = split_result(res, job.sizes) if len(members) > 1 else [res]
    outcomes, lo = [], 0
    for i, (member, part) in enumerate(zip(members, parts, strict=True)):
        hi = lo + job.sizes[i]
        target = job.targets[i]
        with torch.no_grad():
            mine = recon[lo:hi]
            pixel_error = (
                ((mine.flatten(1) - target.flatten(1)).pow(2).sum(dim=1) / job.n_pixels)
                .cpu()
                .tolist()
                if target is not None
                else None
            )
        result = JobResult(
            job_id=member.job_id,
            attempt=member.attempt,
            latent=part.x.detach().cpu().double().tolist(),
            objective=[_finite(v) for v in part.objective.detach().cpu().double().tolist()],
            pixel_error=None if pixel_error is None else [_finite(v) for v in pixel_error],
            measurement_residual=None
            if residual is None
            else [_finite(v) for v in residual[lo:hi].cpu().double().tolist()],
            trace=trace_entries(part.trace),
            evals=int(part.evals),
            device=str(device),
            solve_seconds=solve_s,
            pass_jobs=len(members),
            pass_targets=int(job.b.shape[0]),
            reconstruction=arrays.to_npy(mine.detach().cpu().numpy().astype("float32")),
        )
        stages_total = max(job.stages_total, len(part.trace))  # with this job's rescue stages
        outcomes.append(Outcome(member, result, stages_total, job.started_at[i]))
        lo = hi
    return PassOutcome(
        outcomes=outcomes,
        solve_seconds=solve_s,
        targets=int(job.b.shape[0]),
        objective=parts[0].objective.detach().cpu().double().tolist(),
    )


def trace_entries(trace: list[StageTrace]) -> list[dict[str, Any]]:
    """The result's trace (app.schemas.StageTraceOut): 1-based stages, each with its pass
    (surf, rescue, final, restart), round and pass index, so a reader can tell portfolio's
    passes on G_T from its surf and rescue without counting stages."""
    out, index, prev = [], -1, None
    for t in trace:
        key = (t.pass_name, t.pass_round)
        index += key != prev
        prev = key
        out.append({**t.to_dict(), "stage": t.stage + 1, "pass": t.pass_name,
                    "pass_round": t.pass_round, "pass_index": index})  # fmt: skip
    return out


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def on_rq_failure(job: Any, connection: Any, exc_type: Any, value: Any, tb: Any) -> None:
    """RQ failure callback: a backstop for failures outside run_job's own handling.

    RQ also calls it for *abandoned* jobs (their worker vanished), possibly long after our
    reaper re-queued the job under a new RQ id. So it only touches the row while the row
    still points at this RQ job, and abandoned jobs go through the reaper (retry if attempts
    remain) instead of being failed outright.
    """
    try:
        job_id = job.args[0]
    except (AttributeError, IndexError, TypeError):
        return
    settings = get_settings()
    sessions = session_factory(settings.sqlalchemy_url)
    name = getattr(exc_type, "__name__", str(exc_type))
    if name == "AbandonedJobError":
        from app.queue import RQJobQueue

        reap_stale_jobs(sessions, RQJobQueue(settings), settings, job_id=job_id)
        return
    reason = f"{name}: {value}"
    if name == "JobTimeoutException":
        reason = f"timed out after {job.timeout} s (SURFING_JOB_TIMEOUT_S)"
    fail(sessions, job_id, None, reason, queue_ref=job.id)
