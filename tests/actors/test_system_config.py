"""The embedded Ray's inlining limit follows the size of a round's updates."""

from __future__ import annotations

from actors import INLINE_BUDGET_BYTES, RAY_INLINE_DEFAULT_BYTES, SHARED_STORE_ONLY_BYTES, embedded_system_config

KIB = 1024


def test_a_few_small_updates_keep_rays_default_inlining() -> None:
    # 10 updates of 56 KiB: 560 KiB inlined at most
    assert embedded_system_config(56 * KIB, 10) == {}


def test_many_small_updates_go_to_the_shared_store() -> None:
    # 500 updates of 56 KiB: 28 MiB would be inlined into the aggregator
    assert embedded_system_config(56 * KIB, 500) == {"max_direct_call_object_size": SHARED_STORE_ONLY_BYTES}


def test_updates_over_rays_limit_are_never_inlined_so_the_default_holds_for_any_cohort() -> None:
    assert embedded_system_config(RAY_INLINE_DEFAULT_BYTES, 10_000) == {}


def test_the_budget_is_inclusive() -> None:
    size = 32 * KIB
    at_budget = INLINE_BUDGET_BYTES // size
    assert embedded_system_config(size, at_budget) == {}
    assert embedded_system_config(size, at_budget + 1) != {}
