"""The process environment fedsim runs in, in one place: Hugging Face offline, Ray quiet.

Both libraries read these variables when they load, so a script sets them
(``apply``) before it imports them; the driver passes ``ENV`` to every Ray
worker and job. Values already set by the user win.
"""

from __future__ import annotations

import os

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# no downloads at run time: a model or data set must be local (or already in the cache)
HF_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV = {**RAY_ENV, **HF_ENV}


def apply(extra: dict[str, str] | None = None) -> None:
    """Set each of ``ENV`` (and ``extra``) in this process where the user has not set it."""
    for key, value in {**ENV, **(extra or {})}.items():
        os.environ.setdefault(key, value)
