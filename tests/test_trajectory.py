"""surfing.trajectory: how a pass reads its checkpoints (ahead on spare cores, else when due)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from surfing.trajectory import Generators, stream_readers
from tests.conftest import make_tiny_trajectory


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("models_store-prefetch")]


@pytest.mark.parametrize(
    "cores, threads, readers",
    [(2, 2, 0), (2, 1, 1), (1, 1, 0), (16, 16, 0), (16, 14, 2), (16, 8, 4)],
)
def test_cpu_readers_get_only_the_cores_torch_leaves(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int, readers: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert stream_readers(torch.device("cpu")) == readers
    # a GPU solver leaves the host idle: it reads ahead whatever torch's CPU threads are
    assert stream_readers(torch.device("cuda")) == min(4, max(1, cores // 2))


@pytest.mark.parametrize("readers", [0, 1])
def test_reading_when_due_or_ahead_hands_out_the_same_networks(
    tmp_path: Path, readers: int
) -> None:
    store = make_tiny_trajectory(tmp_path, "tiny", n_ckpt=5)
    expected = [store.load("tiny", i) for i in range(5)]
    during: list[list[str]] = []
    for index, _, G in Generators(store, "tiny", readers=readers):
        during.append(prefetch_threads())
        state = G.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected[index].items())
    assert len(during) == 5
    if readers == 0:  # read in the consumer's own thread: nothing runs beside the solver
        assert not any(during)
    else:
        assert all(during[:-1])
    assert not prefetch_threads()
