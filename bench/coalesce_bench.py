"""Benchmark: throughput of the service's job function with and without coalescing.

Issue 5, goal 2: a 300-target job should have >= 50x the throughput of 300 one-target jobs,
and the worker should coalesce queued jobs for the same model into one pass. This drives
`worker.jobs.run_job` exactly as a worker does (SQLite job database, real model store, warm
cache as configured) and prints, in one run:

- one-target jobs run one by one (coalescing off): `--solo` of them, timed, per-job time;
- `--jobs` one-target jobs queued together and taken by one worker call (coalescing on);
- one job carrying all `--jobs` targets.

Targets are G_T(x*) with x* ~ U[-1,1]^k, so each row also reports the exact-recovery rate
(||x_T - x*|| < 0.01). Not a timed test; run it by hand, e.g.

    flock /tmp/surfing-heavy.lock python bench/coalesce_bench.py --model dcgan-k10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app.db import session_factory, upgrade_database
from app.models import Job, JobResult
from app.schemas import SolveOptions
from app.services.jobs import create_invert_job
from app.settings import Settings
from models_store import ModelStore, default_store_root
from surfing.solvers import DEFAULT_SCHEDULE, uniform_latents
from surfing.trajectory import final_generator
from worker import jobs as worker_jobs

SUCCESS = 0.01


class NullQueue:
    """Accepts enqueues and runs nothing: the benchmark calls the job function itself."""

    kind = "null"

    def start(self) -> None: ...

    def close(self) -> None: ...

    def enqueue(self, job_id: str) -> str:
        return f"bench.{job_id}"

    def discard(self, queue_ref: str | None) -> None: ...

    def depth(self) -> int:
        return 0

    def workers(self) -> int:
        return 1

    def ping(self) -> None: ...


def submit(
    settings: Settings, store: ModelStore, model: str, images: np.ndarray, opts: dict
) -> str:
    sessions = session_factory(settings.sqlalchemy_url)
    with sessions() as s:
        job = create_invert_job(
            s,
            store,
            settings,
            NullQueue(),
            model,
            SolveOptions.model_validate({"method": "surf", **opts}),
            images.tolist(),
            "bench",
        )
        return job.id


def surfed(trace: list[dict], targets: int) -> int:
    """How many of a job's targets surfed the trajectory (the default, portfolio, surfs only
    those LM and its restarts on G_T left unfitted; other schedules surf every target)."""
    moved = [t["rescued"] for t in trace if t.get("pass") == "surf"]
    return max((targets if n is None else n for n in moved), default=0)


def latents(settings: Settings, job_ids: list[str]) -> tuple[np.ndarray, list[int], int]:
    """Recovered latents of finished jobs, in order, the pass size each was solved in, and
    how many targets surfed the trajectory."""
    sessions = session_factory(settings.sqlalchemy_url)
    xs, passes, n_surfed = [], [], 0
    with sessions() as s:
        for jid in job_ids:
            job, res = s.get(Job, jid), s.get(JobResult, jid)
            if job is None or res is None or job.status != "succeeded":
                raise SystemExit(
                    f"job {jid} did not succeed: {job and job.status} {job and job.error}"
                )
            xs.append(np.asarray(res.latent))
            passes.append(res.pass_jobs)
            n_surfed += surfed(res.trace, len(res.latent))
    return np.concatenate(xs), passes, n_surfed


def success(x: np.ndarray, x_star: torch.Tensor) -> float:
    return float((np.linalg.norm(x - x_star.numpy(), axis=1) < SUCCESS).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dcgan-k10")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=300, help="one-target jobs queued together")
    ap.add_argument("--solo", type=int, default=10, help="one-target jobs timed one by one")
    ap.add_argument(
        "--schedule", default=None, help="surf schedule; default: the service's (not sent)"
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm-cache-mb", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = args.models_dir or default_store_root()
    store = ModelStore(root)
    manifest = store.manifest(args.model)
    k = manifest.latent_dim
    x_star = uniform_latents(args.jobs, k, args.seed)
    with torch.no_grad():
        images = final_generator(store, args.model)(x_star).numpy()
    opts = {} if args.schedule is None else {"schedule": args.schedule}

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            database_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
            redis_url=None,
            state_dir=Path(tmp),
            models_dir=root,
            max_batch=args.jobs,
            coalesce_max_targets=args.jobs,
            warm_cache_mb=args.warm_cache_mb,
            job_timeout_s=24 * 3600,
            torch_threads=args.threads,
        )
        upgrade_database(settings.sqlalchemy_url)
        alone = settings.model_copy(update={"coalesce_max_targets": 0})
        rows = []

        # x_init given per job: every variant starts each target from the same point.
        x0 = uniform_latents(args.jobs, k, args.seed + 1).numpy()

        def one_target_jobs(n: int) -> list[str]:
            return [
                submit(
                    settings,
                    store,
                    args.model,
                    images[i : i + 1],
                    {**opts, "x_init": x0[i].tolist()},
                )
                for i in range(n)
            ]

        ids = one_target_jobs(args.solo)
        t0 = time.perf_counter()
        for jid in ids:
            worker_jobs.run_job(jid, alone)
        wall = time.perf_counter() - t0
        x, _, n_surfed = latents(settings, ids)
        rows.append(
            (
                "one-target jobs, one per pass",
                args.solo,
                args.solo,
                wall,
                success(x, x_star[: args.solo]),
                n_surfed,
            )
        )

        ids = one_target_jobs(args.jobs)
        t0 = time.perf_counter()
        out = worker_jobs.run_job(ids[0], settings)
        wall = time.perf_counter() - t0
        x, passes, n_surfed = latents(settings, ids)
        if len(out.get("coalesced", [])) != args.jobs - 1 or set(passes) != {args.jobs}:
            raise SystemExit(f"expected one pass of {args.jobs} jobs, got pass sizes {set(passes)}")
        rows.append(
            (
                f"{args.jobs} one-target jobs, coalesced",
                args.jobs,
                args.jobs,
                wall,
                success(x, x_star),
                n_surfed,
            )
        )

        jid = submit(settings, store, args.model, images, {**opts, "x_init": x0.tolist()})
        t0 = time.perf_counter()
        worker_jobs.run_job(jid, settings)
        wall = time.perf_counter() - t0
        x, _, n_surfed = latents(settings, [jid])
        row = (f"one {args.jobs}-target job", 1, args.jobs, wall, success(x, x_star), n_surfed)
        rows.append(row)

    base = rows[0][2] / rows[0][3]
    n_ckpt = len(manifest.checkpoints)
    schedule = args.schedule or f"default ({DEFAULT_SCHEDULE})"
    print(f"model {args.model} (k={k}, {n_ckpt} checkpoints), schedule {schedule}, ", end="")
    print(f"{args.threads} threads, warm cache {args.warm_cache_mb} MB")
    header = ("variant", "jobs", "targets", "wall s", "targets/s", "x solo", "success", "surfed")
    print("{:<34} {:>5} {:>7} {:>8} {:>10} {:>7} {:>8} {:>7}".format(*header))
    for name, jobs, targets, wall, ok, n_surfed in rows:
        rate = targets / wall
        cells = (
            name,
            jobs,
            targets,
            f"{wall:.1f}",
            f"{rate:.3f}",
            f"{rate / base:.1f}",
            f"{ok:.1%}",
            n_surfed,
        )
        print("{:<34} {:>5} {:>7} {:>8} {:>10} {:>7} {:>8} {:>7}".format(*cells))


if __name__ == "__main__":
    main()
