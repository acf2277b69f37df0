"""fedsim.environment: the variables a process is started with, the user's own values first."""

from __future__ import annotations

import os

import pytest

from fedsim import environment


def test_thread_env_sets_every_thread_pool_to_the_count() -> None:
    # Execute
    env = environment.thread_env(3)

    # Assert
    assert env == {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_apply_keeps_a_thread_count_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)

    # Execute
    environment.apply(environment.thread_env(1))

    # Assert
    assert os.environ["OMP_NUM_THREADS"] == "2"
    assert os.environ["MKL_NUM_THREADS"] == "1"
