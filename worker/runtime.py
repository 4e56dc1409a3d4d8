"""Process-wide worker state: its name, its device, its warm checkpoint caches."""

from __future__ import annotations

import logging
import os
import socket
import threading

import torch

from app.settings import Settings
from worker.cache import WarmStore

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pick_device(settings: Settings) -> torch.device:
    """CUDA when present (device='auto'), else what the settings name."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


_stores: dict[tuple[str, int, str], WarmStore] = {}
_stores_lock = threading.Lock()


def warm_store(settings: Settings, device: torch.device) -> WarmStore:
    """One warm cache per (store root, budget, device) per process."""
    key = (str(settings.models_dir), settings.warm_cache_mb, str(device))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = WarmStore(
                settings.models_dir, settings.warm_cache_mb * 1024 * 1024, device
            )
        return store


def prepare_runtime(settings: Settings) -> torch.device:
    """Worker start-up: thread count, TF32 and device (logged once, so deployments can check)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    torch.backends.cudnn.allow_tf32 = settings.tf32
    device = pick_device(settings)
    log.info(
        "surfing worker: device %s%s, torch %s, %d threads, TF32 convolutions %s, CUDA graphs %s",
        device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
        torch.__version__,
        torch.get_num_threads(),
        settings.tf32,
        settings.cuda_graphs,
    )
    return device
