"""Silence the libraries' own progress bars and chatter: fedsim shows one progress display of its own."""

from __future__ import annotations

import logging

import datasets
import transformers

from fedsim.console import debug_enabled, route_to_run_log

# - DeepSpeed's logger prints to stdout through a handler of its own (it does not propagate). transformers' and
#   accelerate's unwrapping in ``save_pretrained`` imports deepspeed whenever it is installed, and that import warns
#   "Setting accelerator to CPU" on a machine without a GPU, even in a run that never uses DeepSpeed.
# - Ray 2.60 turns token authentication on for every new local cluster and warns that it did. Setting
#   RAY_AUTH_MODE=token first would silence it only if set before Ray reads its config (set later, the driver's
#   Ray still runs without a token while its GCS requires one, and ray.init fails), so the line is routed instead.
LIBRARY_LOGGERS = ("DeepSpeed", "ray._private.authentication.authentication_token_setup")


def quiet_libraries() -> None:
    """Turn off datasets' and transformers' tqdm bars and transformers' info chatter (idempotent).

    Outside debug mode (``console.debug_enabled``), DeepSpeed's and Ray's token-setup log lines also go to
    run.log instead of the console.
    """
    datasets.disable_progress_bars()
    # transformers leaves these two unannotated
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    if not debug_enabled():
        for name in LIBRARY_LOGGERS:
            route_to_run_log(logging.getLogger(name))
