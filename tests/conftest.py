"""Suite-wide environment: loopback-only Ray, no usage stats, no hub downloads."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsim import environment

E2E = Path(__file__).resolve().parent / "e2e"

environment.apply()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not ray"` must see these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``ray`` every test that starts Ray, so ``make test-fast`` leaves them all out.

    Those are the tests using ``ray_session`` and everything under tests/e2e/ (real runs, some of them starting
    their own Ray in a child process).
    """
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) or item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One real local Ray (2 CPUs, loopback) shared by every test that needs it."""
    import ray

    from actors import embedded_system_config

    # what the driver picks for the tests' runs (a few tiny updates a round): Ray's default inlining; the
    # shared-store-only limit runs in tests/e2e/test_multinode.py
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _system_config=embedded_system_config(update_bytes=64 * 1024, clients_per_round=8))
    yield
    ray.shutdown()
