"""RQ job functions and the worker entry point (see worker.jobs for a job's life)."""
