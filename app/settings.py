"""Service configuration, read from the environment only (no secrets in code or files).

`DATABASE_URL` and `REDIS_URL` are read without prefix because that is what every hosting
platform and docker-compose file already calls them; everything else is `SURFING_*`.
Leaving both unset selects the *embedded* mode: SQLite under the data folder and an
in-process job runner, so `surfing serve` works on a laptop with no other services.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All knobs of the API and the worker; both processes read the same variables."""

    model_config = SettingsConfigDict(
        env_prefix="SURFING_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "SURFING_DATABASE_URL"),
        description="SQLAlchemy URL; unset = SQLite file in state_dir (embedded mode).",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "SURFING_REDIS_URL"),
        description="Redis URL for RQ; unset = in-process runner (embedded mode).",
    )
    state_dir: Path = Field(
        Path("data"), description="Where the embedded SQLite file lives (SURFING_STATE_DIR)."
    )
    models_dir: Path = Field(Path("data/models"), description="Root of the models store.")
    queue_name: str = Field("surfing", description="RQ queue the API fills and workers drain.")

    # Input caps: checked before anything is decoded, so hostile uploads cost little.
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4_000_000, ge=1, description="width*height cap (PNG/JPEG).")
    max_batch: int = Field(64, ge=1, description="Most targets one job may carry.")

    # Model administration (POST/DELETE /models): with auth on, admin-scope API keys may do it;
    # with auth off (the local embedded mode) only once an operator turns it on here, and then
    # only with the token as a Bearer if one is set.
    model_admin: bool = Field(
        False, description="With auth off: enable POST /models and DELETE /models/{id}."
    )
    admin_token: SecretStr | None = Field(
        None, description="With auth off: the admin endpoints require `Bearer <token>` if set."
    )
    max_model_upload_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Cap on a POST /models archive (and on its contents)."
    )

    # Credentials (app.auth): API keys from `surfing keys create`, sent as a Bearer token.
    auth: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: off only in the embedded mode (no Redis, SQLite) bound to a loopback "
        "host; on everywhere else.",
    )
    bind_host: str = Field(
        "127.0.0.1",
        description="The address the API listens on (`surfing serve --host` sets it); "
        "auth=auto reads it. Set it when starting uvicorn yourself.",
    )
    # Admission control (app.services.admission): over a limit -> 429 with Retry-After.
    rate_limit_per_min: float = Field(
        60.0, ge=0, description="Job-creating POSTs per key per minute, per API process (0 = off)."
    )
    rate_limit_burst: int = Field(20, ge=1, description="Submissions a key may make at once.")
    max_active_jobs_per_key: int = Field(
        20, ge=1, description="Queued + running jobs one key may have."
    )
    max_queued_jobs: int = Field(1000, ge=1, description="Queued jobs of all keys together.")
    max_job_evals: int = Field(
        20_000_000,
        ge=1,
        description="Per-job compute cap: generator evaluations x targets the request may "
        "spend (steps, stages, restarts; app.services.admission.estimate_evals).",
    )
    admission_retry_after_s: int = Field(
        5, ge=1, description="Retry-After of a 429 for a full quota or queue."
    )

    # Bounded time: a stopped or frozen PostgreSQL/Redis gives a fast 503, never a hang.
    db_connect_timeout_s: float = Field(3.0, gt=0, description="Opening a db connection.")
    db_statement_timeout_s: float = Field(
        10.0, gt=0, description="Server-side cap per SQL statement; the client waits 1 s more."
    )
    db_pool_timeout_s: float = Field(3.0, gt=0, description="Wait for a free pooled connection.")
    db_probe_timeout_s: float = Field(
        1.0,
        gt=0,
        description="A call kept waiting starts a probe (fresh connection + SELECT 1) with this "
        "deadline; while PostgreSQL does not answer it, calls give up at once (app.dbwait).",
    )
    redis_connect_timeout_s: float = Field(1.5, gt=0, description="Opening a Redis connection.")
    redis_socket_timeout_s: float = Field(
        1.5, gt=0, description="Per Redis command (RQ raises it for a worker's blocking pop)."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 for a dependency down.")

    # Job execution.
    job_timeout_s: int = Field(3600, ge=1, description="Hard wall-clock limit per attempt.")
    max_attempts: int = Field(2, ge=1, description="Attempts before a lost job is failed.")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0, description="No heartbeat this long = worker lost.")
    progress_interval_s: float = Field(1.0, ge=0, description="Least gap between db writes.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    warm_cache_mb: int = Field(1024, ge=0, description="Checkpoint cache kept by a worker.")
    coalesce_max_targets: int = Field(
        256,
        ge=0,
        description="A worker that takes a job also takes queued jobs that can share its pass "
        "over the trajectory, up to this many targets in all (0 = one job per pass).",
    )
    cuda_graphs: bool = Field(
        False,
        description="Run surfing's fixed-shape steps (the paper schedule's Adam, the 'lm' "
        "schedule's stages; the default 'auto' = 'lm-stride' has none) as "
        "CUDA graphs replayed per checkpoint (surfing.graphs); on a CPU the same arithmetic runs "
        "eagerly. Off until measured end to end on a GPU (scripts/gpu_issue5.sh).",
    )
    tf32: bool = Field(
        True,
        description="Let cuDNN run a GPU worker's convolutions on TF32 (PyTorch's default). "
        "false: latents ~1000x closer to the exact solution (bench/tf32_emulation.py), at a "
        "speed cost not yet measured on a GPU.",
    )
    torch_threads: int | None = Field(None, ge=1)
    events_max_s: float = Field(
        3600, gt=0, description="Longest life of one GET /jobs/{id}/events stream (then a "
        "`timeout` event; clients reconnect)."
    )
    retention_days: int = Field(
        30,
        ge=0,
        description="Inputs and result payloads (latents, reconstructions, traces) of jobs "
        "finished more than this many days ago are purged; the job row and its summary stay "
        "(app.lifecycle.retention; 0 = keep forever).",
    )
    # Webhooks (app.lifecycle.webhooks): off until an operator names where callbacks may go.
    webhook_allow: str = Field(
        "",
        description="Comma-separated host[:port] patterns (`hooks.example.com`, "
        "`*.example.com:8443`) or CIDRs/addresses (`10.1.0.0/16`, `127.0.0.1:9000`) that a "
        "job's callback_url may name; empty = webhooks refused. Private and loopback addresses "
        "are reached only when an address or CIDR entry names them.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        min_length=16,
        description="HMAC-SHA256 key of X-Surfing-Signature; required with SURFING_WEBHOOK_ALLOW.",
    )
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="POSTs before giving up.")
    webhook_retry_s: float = Field(
        15.0,
        gt=0,
        description="First retry delay; each next one is 3x longer (15 s: about 10 min in all).",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Per webhook request.")
    rq_result_ttl_s: int = Field(3600, ge=0)
    rq_failure_ttl_s: int = Field(7 * 24 * 3600, ge=0)
    auto_migrate: bool | None = Field(
        None, description="Run Alembic upgrade at start-up; default: only for SQLite."
    )

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Settings:
        # A heartbeat must fit several times into the stale window, or healthy jobs get reaped.
        if self.stale_after_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                "SURFING_STALE_AFTER_S must be at least 2x SURFING_HEARTBEAT_INTERVAL_S"
            )
        return self

    @model_validator(mode="after")
    def _check_webhooks(self) -> Settings:
        if self.webhook_allow.strip():
            from app.lifecycle.webhooks import parse_allow

            parse_allow(self.webhook_allow)  # a typo fails at start-up, not at the first job
            if self.webhook_secret is None:
                raise ValueError(
                    "SURFING_WEBHOOK_ALLOW needs SURFING_WEBHOOK_SECRET (16+ characters): "
                    "receivers check the signature made with it"
                )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The database to use: DATABASE_URL, else the embedded SQLite file."""
        if self.database_url:
            from app.db import normalize_url

            return normalize_url(self.database_url)
        return f"sqlite:///{self.state_dir / 'surfing.db'}"

    @property
    def embedded(self) -> bool:
        """True when jobs run in the API process (no Redis configured)."""
        return not self.redis_url

    @property
    def should_migrate(self) -> bool:
        if self.auto_migrate is not None:
            return self.auto_migrate
        return self.sqlalchemy_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment (tests build Settings objects directly)."""
    return Settings()
