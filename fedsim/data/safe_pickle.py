"""Read the newsgroups pickle shipped with gensim without running arbitrary code.

``gensim/test/test_data/mini_newsgroup`` is a zlib-compressed, protocol-0
(Python 2) pickle of a scikit-learn ``Bunch`` holding a list of posts, an int64
``target`` array and a bytes ``filenames`` array. A plain ``pickle.load`` would
import whatever the file names, so the unpickler here resolves only the six
globals that file uses (found with ``pickletools.genops``) and refuses any
other. scikit-learn is not needed: its ``Bunch`` is replaced by a plain dict.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray  # type: ignore[no-redef]

from aggregation.errors import DataError


class _Bunch(dict[str, Any]):
    """Stand-in for ``sklearn.utils.Bunch``: a dict, nothing more."""


# (module, name) as written in the pickle (Python 2 spellings) -> object used.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("copy_reg", "_reconstructor"): copyreg._reconstructor,  # type: ignore[attr-defined]
    ("copyreg", "_reconstructor"): copyreg._reconstructor,  # type: ignore[attr-defined]
    ("sklearn.datasets.base", "Bunch"): _Bunch,
    ("sklearn.utils", "Bunch"): _Bunch,
    ("__builtin__", "dict"): dict,
    ("builtins", "dict"): dict,
    ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only an allow-list of globals.

    Python 2 pickles need ``encoding="latin1"`` so that numpy's raw array
    bytes (pickled as ``str``) come back byte for byte.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed object for ``module.name`` or refuse it.

        Raises
        ------
        pickle.UnpicklingError
            For any global outside the allow-list.
        """
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in this pickle"
            ) from None


def load_restricted_pickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (latin1 for Python 2 strings)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_newsgroups_bunch(path: Path) -> dict[str, Any]:
    """Load gensim's ``mini_newsgroup`` file as a plain dict.

    Parameters
    ----------
    path : Path
        The zlib-compressed pickle.

    Returns
    -------
    dict
        Keys ``data`` (list of str posts, headers included), ``target`` (int64
        array [n]), ``target_names`` (list of str), ``filenames`` (bytes array [n]).

    Raises
    ------
    DataError
        When the file is not the expected compressed pickle of a dict.
    """
    try:
        obj = load_restricted_pickle(zlib.decompress(path.read_bytes()))
    except (zlib.error, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"{path}: not a readable newsgroups pickle ({exc})") from exc
    if not isinstance(obj, dict) or not {"data", "target", "target_names"} <= obj.keys():
        raise DataError(f"{path}: expected a dict with data/target/target_names")
    return dict(obj)
