"""Pydantic request and response models (the API's public contract, shown at /docs).

Option bounds here are the hard limits; per-deployment caps (batch size, upload bytes, image
pixels) come from settings and are checked in the service layer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["surf", "adam", "adam-restarts", "hybrid", "lm-restarts"]
Schedule = Literal[
    "portfolio", "auto", "adaptive", "adaptive-adam", "lm", "lm-stride", "paper"
]  # surfing.solvers.SCHEDULES
Status = Literal["queued", "running", "succeeded", "failed", "canceled"]

MODEL_ID_DESCRIPTION = "Trajectory id from GET /models."
IMAGE_DESCRIPTION = (
    "Target image: a nested list of floats in the model's value range with the model's "
    "output shape (or a batch [B, ...] of them), or a base64 string of a PNG/JPEG (converted "
    "to the model's channels, size and value range) or of a .npy float array."
)
CALLBACK_DESCRIPTION = (
    "Webhook: an http(s) URL that gets one signed POST of the job document when the job "
    "succeeds, fails or is canceled (README, Webhooks). Its host must match "
    "SURFING_WEBHOOK_ALLOW; no credentials in the URL."
)


class SolveOptions(BaseModel):
    """Solver options shared by /invert and /cs-recover. Unset = the solver's default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Method = Field(
        "surf",
        description="surf (by default schedule portfolio: Levenberg-Marquardt on the final "
        "network from x_init (a target not yet fitted stops once two accepted steps in a row "
        "each lowered its objective by less than 1 %), then up to 2 rounds (20 when m <= 3k) "
        "of fresh starts drawn from the model's latent prior for the targets whose relative "
        "residual "
        "||A G(x) - b||^2 / ||b||^2 is above 1e-5; then, only for the targets still not "
        "fitted, a surf of the trajectory (every "
        "recorded checkpoint in training order, each stage warm-started from the last, as "
        "Alg. 3.1) with schedule lm-stride: the paper's Adam stage on theta_0, one "
        "Levenberg-Marquardt step per checkpoint with Jacobian reuse and skips, LM to "
        "convergence on the final network, latents kept within 5 sqrt(k), and its one rescue "
        "round from a fresh draw (`rescue`); each target keeps its lowest objective; other "
        "ways of surfing: `schedule`), adam (direct descent on the final "
        "network), adam-restarts (best of `restarts` direct descents), hybrid (surf plus "
        "restarts, lowest objective kept), lm-restarts (Levenberg-Marquardt on the final "
        "network only, from x_init, stopping as in portfolio; then up to `restarts` rounds "
        "(default 3) of fresh starts drawn from the model's latent prior for the targets "
        "whose relative residual is still above 1e-5, each target keeping its lowest "
        "objective; uses `restarts` and `seed`, never the trajectory).",
    )
    schedule: Schedule | None = Field(
        None,
        description="How method=surf runs (surfing.solvers). portfolio (default): "
        "Levenberg-Marquardt on the final network from x_init (a target not yet fitted stops "
        "once two accepted steps in a row each lowered its objective by less than 1 %), then up"
        " to 2 rounds (20 when m <= 3k) of fresh prior draws for the targets with relative "
        "residual above 1e-5 (as lm-restarts), then, for the targets still not fitted, a surf "
        "of the trajectory with lm-stride and its one rescue round; each target keeps its "
        "lowest objective; the trajectory is read only when some target needs it. The others "
        "surf every target from x_init, and every one but paper starts with the paper's Adam "
        "stage on the first checkpoint and re-surfs unfitted targets once (`rescue`): auto (lm-"
        "stride, or paper when m <= 2k; the default before portfolio), adaptive (Adam stages "
        "that stop per target when the objective stalls, Levenberg-Marquardt on the final "
        "network), adaptive-adam (the same with Adam at the end), lm (Levenberg-Marquardt on "
        "every stage), lm-stride (one LM step per checkpoint, skipping checkpoints where a "
        "target's predicted step is tiny and reusing Jacobians across checkpoints; LM to "
        "convergence on the final network; latents within 5 sqrt(k)), paper (exactly `steps` "
        "Adam steps per stage and `final_steps` at the end, Algorithm 3.1 as published).",
    )
    rescue: bool | None = Field(
        None,
        description="method=surf with any schedule but paper: a target whose final residual "
        "is above about 0.3 % of the target in norm (relative residual 1e-5) surfs the "
        "trajectory again from a fresh start and "
        "keeps the better result (default true; on targets that lie on the model's range this "
        "finds the optimum where the first pass missed it). Images off the model's range are "
        "never fitted that well, so each takes the extra pass: set false to skip it. With "
        "portfolio, false drops only the rescue round after its surf; its restart rounds on "
        "the final network and the choice of which targets surf keep the same miss test.",
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Adam steps per surfing stage (a cap for the adaptive schedules; default 20).",
    )
    final_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Adam steps on the final network when surfing (default 1000).",
    )
    direct_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Adam steps of each direct descent: adam, "
        "adam-restarts, and the restarts of hybrid (default 2000).",
    )
    tol: float | None = Field(
        None, ge=0, le=1e6, description="Stop a stage once every target's gradient norm < tol."
    )
    lr: float | None = Field(None, gt=0, le=100, description="Adam learning rate (default 0.01).")
    stride: int = Field(
        1,
        ge=1,
        le=1_000_000,
        description="Use every stride-th checkpoint (first and last always kept).",
    )
    restarts: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Random starts for adam-restarts and hybrid (default 4); restart rounds "
        "after the first solve for lm-restarts (default 3) and for surf with schedule "
        "portfolio, before the trajectory (default 2, 20 when m <= 3k: an off-range image "
        "takes every round, so fewer keep it cheap); not for surf's other schedules.",
    )
    seed: int = Field(0, ge=0, le=2**62, description="Seed of x_init (and of restarts).")
    x_init: list[float] | list[list[float]] | None = Field(
        None,
        description="Starting latent, length k (or B x k); default: drawn from the model's "
        "latent prior (manifest latent_prior) with seed.",
    )

    @model_validator(mode="after")
    def _schedule_is_for_surf(self) -> SolveOptions:
        for name in ("schedule", "rescue"):
            if getattr(self, name) is not None and self.method != "surf":
                raise ValueError(f"{name} applies to method 'surf' only, not {self.method!r}")
        if self.method == "surf" and self.restarts is not None and self.schedule not in (
            None, "portfolio"
        ):
            raise ValueError(
                f"restarts applies to surf's schedule 'portfolio' only, not {self.schedule!r}"
            )
        return self


class JobRequest(SolveOptions):
    """What every submission carries besides its data. A form is validated with this model
    once its uploads are taken out, so JSON and form fields cannot drift apart."""

    model_id: str = Field(..., description=MODEL_ID_DESCRIPTION)
    callback_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://[!-~]+$",
        description=CALLBACK_DESCRIPTION,
    )


class InvertRequest(JobRequest):
    """JSON body of POST /invert."""

    image: list[Any] | str = Field(..., description=IMAGE_DESCRIPTION)


class MatrixSeed(BaseModel):
    """A Gaussian matrix named by its seed: the server regenerates it (see /measurement-matrix)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(..., ge=0, le=2**62)
    m: int = Field(..., ge=1, description="Number of measurements (1 <= m <= n).")


class CSRecoverRequest(JobRequest):
    """JSON body of POST /cs-recover."""

    measurements: list[Any] = Field(
        ..., description="The vector A·y (length m), or a batch [B, m]."
    )
    matrix: MatrixSeed | list[list[Any]] = Field(
        ...,
        description="{seed, m} to regenerate the documented Gaussian matrix, or an "
        "explicit m x n nested list.",
    )
    true_image: list[Any] | str | None = Field(
        None,
        description="Optional true image y (same forms as /invert's image): the result "
        "then reports the per-pixel error too.",
    )


class JobAccepted(BaseModel):
    job_id: str
    status: Status
    links: dict[str, str]


PassName = Literal["surf", "rescue", "final", "restart", "adam"]


class Progress(BaseModel):
    """Where a job is: a sequence of passes, each with its own stage counter (never goes back).

    surf: the trajectory, stage t of T checkpoints; rescue: surf's re-surf of the targets it did
    not fit (round pass_round), T stages again; restart: the R direct descents of hybrid and
    adam-restarts, run together as one batch (stage = Adam step), or the round pass_round of
    lm-restarts or of surf's portfolio (1 stage); final: hybrid's polish of both candidates on
    the final network, or the first Levenberg-Marquardt solve of lm-restarts or of surf's
    portfolio (1 stage); adam: direct descent (stage = Adam step). surf with schedule
    portfolio (the default) runs final, then restart 1, restart 2, surf and rescue 1, each only
    while some target is not fitted. lm-restarts shows each pass once it has finished."""

    model_config = ConfigDict(populate_by_name=True)

    pass_: PassName | None = Field(
        None, alias="pass", description="The pass in progress (the last one once finished)."
    )
    pass_index: int | None = Field(None, description="Passes before this one (0-based).")
    pass_round: int | None = Field(
        None, description="Rescue or restart round (1, 2, ...); else null."
    )
    stage: int | None = Field(None, description="Stage in progress within the pass, 1-based.")
    stages: int | None = Field(
        None, description="Stages of this pass, fixed when it starts (checkpoints or steps)."
    )
    step: int | None = Field(
        None, description="Training step of the checkpoint in progress; null off the trajectory."
    )
    objective: float | None = Field(None, description="Current mean objective over targets.")
    updated_at: datetime | None = None


class Timings(BaseModel):
    queued_s: float | None = Field(None, description="From submission to the last start.")
    run_s: float | None = Field(None, description="Of the last attempt (so far, if running).")
    solve_s: float | None = Field(None, description="Solver time of the successful attempt.")


class StageTraceOut(BaseModel):
    """One stage of the solve, as the solver reported it (surfing.solvers.StageTrace)."""

    model_config = ConfigDict(populate_by_name=True)

    stage: int
    total: int | None = None
    index: int = Field(..., description="Checkpoint index (-1: unknown).")
    step: int
    steps_used: int
    objective_mean: float
    x_norm_mean: float
    rescued: int | None = Field(
        None,
        description="Stages that work on some targets only (a rescue or restart round, "
        "portfolio's surf of the unfitted targets): how many of the job's targets; else null.",
    )
    pass_: PassName | None = Field(
        None, alias="pass", description="The pass this stage belongs to (null in old results)."
    )
    pass_round: int | None = Field(None, description="Rescue or restart round; else null.")
    pass_index: int | None = Field(None, description="Passes before this one (0-based).")


class JobResultOut(BaseModel):
    latent: list[list[float]] = Field(..., description="Latent x per target (B x k).")
    objective: list[float] = Field(..., description="Final 1/2 ||A G(x) - b||^2 per target.")
    pixel_error: list[float] | None = Field(
        None, description="||G(x) - y||^2 / n per target (when y is known)."
    )
    measurement_residual: list[float] | None = Field(
        None, description="||A G(x) - b||^2 / m per target (/cs-recover)."
    )
    evals: int = Field(..., description="Generator forward+backward passes per target.")
    device: str
    pass_jobs: int = Field(
        1,
        description="Jobs solved together in one pass over the trajectory (queued jobs for the "
        "same model, matrix and options are coalesced); 1 = this job ran alone.",
    )
    pass_targets: int | None = Field(
        None, description="Targets in that pass; timings.solve_s is the pass's solver time."
    )
    trace: list[StageTraceOut]
    reconstruction_url: str


class JobOut(BaseModel):
    job_id: str
    kind: Literal["invert", "cs"]
    model_id: str
    method: Method
    status: Status
    params: dict[str, Any]
    n_targets: int
    attempt: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    progress: Progress | None
    timings: Timings
    error: str | None
    result: JobResultOut | None
    links: dict[str, str]


class CheckpointOut(BaseModel):
    index: int
    step: int
    bytes: int
    sha256: str


class ModelSummary(BaseModel):
    model_id: str
    arch: dict[str, Any]
    latent_dim: int
    output_shape: list[int]
    value_range: list[float]
    n_pixels: int
    training: dict[str, Any]
    dataset: str
    created_at: str
    complete: bool
    n_checkpoints: int
    first_step: int | None
    last_step: int | None


class ModelDetail(ModelSummary):
    format_version: int
    encoding: str
    latent_prior: str = Field("uniform", description="Where starts are drawn: uniform | normal.")
    checkpoints: list[CheckpointOut]
    samples_url: str = Field(..., description="PNG grid of G_T on seeded prior draws.")


class MeasurementMatrixOut(BaseModel):
    model_id: str
    seed: int
    m: int
    n: int
    generator: str
    matrix: list[list[float]]
