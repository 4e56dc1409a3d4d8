"""Kept for existing imports: the reaper now lives in `app.lifecycle` (reaper.py), and the
periodic thread (`PeriodicReaper`) also reconciles the queue (`app.lifecycle.housekeeping`)."""

from app.lifecycle.housekeeping import Housekeeper as PeriodicReaper
from app.lifecycle.reaper import reap_stale_jobs
from app.lifecycle.reconciler import requeue_orphans

__all__ = ["PeriodicReaper", "reap_stale_jobs", "requeue_orphans"]
