"""The process environment fedsim runs in, in one place: Hugging Face offline, Ray quiet, thread counts.

Each library reads its variables when it loads, so a script sets them
(``apply``) before it imports them; the driver passes ``ENV`` to every Ray
worker and job. Values already set by the user win.
"""

from __future__ import annotations

import os

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# no downloads at run time: a model or data set must be local (or already in the cache)
HF_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV = {**RAY_ENV, **HF_ENV}
# the thread pools of OpenMP (torch), OpenBLAS and MKL (numpy's BLAS, whichever it is built with)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """``THREAD_VARS`` set to ``threads``: for a process that is started with them, as BLAS reads them once, at load."""
    return dict.fromkeys(THREAD_VARS, str(threads))


def apply(extra: dict[str, str] | None = None) -> None:
    """Set each of ``ENV`` (and ``extra``) in this process where the user has not set it."""
    for key, value in {**ENV, **(extra or {})}.items():
        os.environ.setdefault(key, value)
