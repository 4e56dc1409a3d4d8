"""Service configuration, read from the environment only (no secrets in code or files).

`DATABASE_URL` and `REDIS_URL` are read without prefix because that is what every hosting
platform and docker-compose file already calls them; everything else is `SURFING_*`.
Leaving both unset selects the *embedded* mode: SQLite under the data folder and an
in-process job runner, so `surfing serve` works on a laptop with no other services.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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

    # Model administration (POST/DELETE /models): off until an operator turns it on, since the
    # API has no user credentials yet; with a token set, requests must carry it as a Bearer.
    model_admin: bool = Field(False, description="Enable POST /models and DELETE /models/{id}.")
    admin_token: SecretStr | None = Field(
        None, description="If set, the admin endpoints require `Authorization: Bearer <token>`."
    )
    max_model_upload_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Cap on a POST /models archive (and on its contents)."
    )

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
