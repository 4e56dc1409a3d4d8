"""surfing.trajectory: a pass reads its checkpoints ahead (default) or each when it is due."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from surfing.trajectory import Generators
from tests.conftest import make_tiny_trajectory


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("models_store-prefetch")]


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
