"""Checkpoint files: an atomic round trip, and one-line errors for what is not one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregation.errors import FedsimError
from fedsim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    # Prepare
    rng = np.random.default_rng(3)
    state = Checkpoint(7, np.arange(4, dtype=np.float32), {"m": np.ones(2), "alpha": {1: [0.5]}},
                       rng.bit_generator.state)

    # Execute
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)

    # Assert: the sampler continues where it stopped
    assert back.round_idx == 7 and back.strategy_state["alpha"] == {1: [0.5]}
    np.testing.assert_array_equal(back.payload, state.payload)
    restored = np.random.default_rng()
    restored.bit_generator.state = back.sampler_state
    assert restored.integers(1 << 30) == rng.integers(1 << 30)
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FedsimError, match=r"checkpoint.pkl: no checkpoint"):
        load_checkpoint(tmp_path)


def test_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pkl").write_bytes(b"not a pickle")
    with pytest.raises(FedsimError, match=r"checkpoint.pkl: unreadable checkpoint"):
        load_checkpoint(tmp_path)
