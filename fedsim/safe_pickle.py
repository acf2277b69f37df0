"""Unpickle untrusted bytes: only the globals a caller allows, and numpy arrays without numpy's unpickling.

A pickle stream names callables and the unpickler calls them, so a plain ``pickle.loads`` runs whatever a
file asks for. :func:`load_pickle` resolves a global only through the caller's allow-list (FedScale traces
allow none; gensim's newsgroups pickle allows its handful) and refuses every other one.

numpy's own names cannot be on such a list: ``_reconstruct`` + ``ndarray.__setstate__`` build an array of
any dtype from raw bytes, and an object array made from forged bytes holds wild pointers that crash the
interpreter when read. :data:`NUMPY_ARRAYS` therefore answers numpy's names with stand-ins that only
record what the stream asks for (dtype string, byte order, shape, raw bytes); the arrays are then made
with ``np.frombuffer`` for booleans, numbers and fixed-width strings only. Object dtypes, structured
(field) dtypes and subarray dtypes cannot be expressed, so they are refused rather than built.

Every failure, whatever the stream did wrong, comes out as :class:`pickle.UnpicklingError`; the call
sites turn it into their one-line error naming the file.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

Allow = Mapping[tuple[str, str], object]
"""An allow-list: ``(module, name)`` as written in the pickle -> the object the stream gets."""

NO_GLOBALS: Allow = MappingProxyType({})


class _Name:
    """A global the stream may name but never call: an argument that a stand-in checks by identity."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_NDARRAY = _Name("numpy.ndarray")
_DTYPE = _Name("numpy.dtype")
_RECONSTRUCT = _Name("numpy _reconstruct")
_DICT_SUBCLASS = _Name("a dict subclass")

NUMPY_ARRAYS: Allow = MappingProxyType({
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1.x and Python 2 spelling
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2
})
"""Plain numpy arrays (``ndarray.__reduce__``'s form), rebuilt without numpy's unpickling."""

# numpy's dtype strings for fixed-size plain data: bool, signed/unsigned int, float, complex, bytes, unicode.
_PLAIN_DTYPE = re.compile(r"[biufcSU][0-9]{1,9}")
_PLAIN_KINDS = frozenset("biufcSU")


def dict_subclasses(*names: tuple[str, str]) -> Allow:
    """Allow-list entries that read pickled instances of the dict subclasses ``names`` as plain dicts.

    Covers the form protocols 0 and 1 write, ``copyreg._reconstructor(cls, dict, contents)``; the class
    itself is never imported (e.g. scikit-learn's ``Bunch`` without scikit-learn).
    """
    return MappingProxyType({
        **dict.fromkeys(names, _DICT_SUBCLASS),
        ("copy_reg", "_reconstructor"): _dict_from_reconstructor,  # Python 2 spelling
        ("copyreg", "_reconstructor"): _dict_from_reconstructor,
        ("__builtin__", "dict"): dict,
        ("builtins", "dict"): dict,
    })


def _dict_from_reconstructor(cls: object, base: object, state: object) -> dict[Any, Any]:
    if cls is not _DICT_SUBCLASS or base is not dict or not isinstance(state, dict):
        raise pickle.UnpicklingError(f"_reconstructor({cls!r}, {base!r}, ...) is not an allowed dict subclass")
    return dict(state)


def _flag(value: object) -> bool:
    """Read a pickled flag: True/False, or the ints 0/1 that Python 2 and numpy write."""
    if type(value) not in (bool, int) or value not in (0, 1):
        raise pickle.UnpicklingError(f"expected a flag 0/1, found {value!r}")
    return bool(value)


class _PendingDtype:
    """What ``numpy.dtype(spec, align, copy)`` and its BUILD asked for; :meth:`build` makes the real dtype."""

    __slots__ = ("_dtype",)
    __hash__ = None  # type: ignore[assignment]  # keeps it out of dict keys and sets, where it could hide

    def __init__(self, spec: object, align: object = 0, copy: object = 1) -> None:
        _flag(align)
        _flag(copy)
        dtype = np.dtype(spec) if isinstance(spec, str) and _PLAIN_DTYPE.fullmatch(spec) else None
        if dtype is None or dtype.kind not in _PLAIN_KINDS or dtype.hasobject or not dtype.itemsize:
            raise pickle.UnpicklingError(f"dtype {spec!r:.40} is not allowed: only booleans, numbers and "
                                         "fixed-width strings")
        self._dtype = dtype

    def __setstate__(self, state: object) -> None:
        """Check numpy's dtype state ``(version, order, subarray, names, fields, elsize, alignment, flags[, meta])``."""
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise pickle.UnpicklingError(f"dtype {self._dtype.str}: unexpected state {state!r:.80}")
        _, order, subarray, names, fields, elsize, _alignment, flags, *meta = state
        if any(part is not None for part in (subarray, names, fields, *meta)) or flags != self._dtype.flags:
            raise pickle.UnpicklingError(f"dtype {self._dtype.str}: fields, subarrays, metadata or flags {flags!r:.20} "
                                         "are not allowed")
        if order not in ("<", ">", "|", "=") or elsize not in (-1, self._dtype.itemsize):
            raise pickle.UnpicklingError(f"dtype {self._dtype.str}: byte order {order!r}, size {elsize!r}")
        self._dtype = self._dtype.newbyteorder(order)

    def build(self) -> np.dtype[Any]:
        return self._dtype


class _PendingArray:
    """What ``_reconstruct(ndarray, ...)`` and its BUILD asked for; the BUILD makes the array with frombuffer."""

    __slots__ = ("_array",)
    __hash__ = None  # type: ignore[assignment]  # unhashable, as _PendingDtype: never a dict key or set member

    def __init__(self) -> None:
        self._array: np.ndarray[Any, Any] | None = None

    def __setstate__(self, state: object) -> None:
        """Build the array from numpy's state ``(version, shape, dtype, is_fortran, raw bytes)``."""
        if self._array is not None:
            raise pickle.UnpicklingError("an array's state is set twice")
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise pickle.UnpicklingError(f"unexpected array state {state!r:.80}")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _PendingDtype):
            raise pickle.UnpicklingError(f"array dtype {dtype!r:.80} is not a numpy dtype")
        if (not isinstance(shape, tuple) or len(shape) > 32
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"array shape {shape!r:.80} is not a tuple of sizes")
        if isinstance(raw, str):
            raw = raw.encode("latin1")  # Python 2 ``str`` read with encoding="latin1": the same bytes back
        if not isinstance(raw, bytes):
            raise pickle.UnpicklingError(f"array data is {type(raw).__name__}, expected bytes")
        plain = dtype.build()
        if len(raw) != math.prod(shape) * plain.itemsize:
            raise pickle.UnpicklingError(f"array {shape} of {plain.str} needs {math.prod(shape) * plain.itemsize} "
                                         f"bytes, found {len(raw)}")
        array = np.frombuffer(bytearray(raw), dtype=plain)  # bytearray: writeable, like numpy's own unpickling
        self._array = array.reshape(shape, order="F" if _flag(fortran) else "C")

    def build(self) -> np.ndarray[Any, Any]:
        if self._array is None:
            raise pickle.UnpicklingError("an array has no data (no BUILD after _reconstruct)")
        return self._array


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allow: Allow, encoding: str) -> None:
        super().__init__(io.BytesIO(data), encoding=encoding)
        self._allow = allow
        self.made_stand_ins = False

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self._allow[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in this pickle") from None
        if found is _DTYPE:
            self.made_stand_ins = True
            return _PendingDtype
        if found is _RECONSTRUCT:
            self.made_stand_ins = True
            return _reconstruct
        return found


def _reconstruct(subtype: object, shape: object, dtype: object) -> _PendingArray:
    """Stand-in for numpy's ``_reconstruct``; ``ndarray.__reduce__`` always writes ``(ndarray, (0,), b"b")``."""
    if subtype is not _NDARRAY or shape != (0,) or dtype not in ("b", b"b"):
        raise pickle.UnpicklingError(f"_reconstruct({subtype!r}, {shape!r:.20}, {dtype!r:.20}) is not a plain ndarray")
    return _PendingArray()


_IN_PROGRESS = _Name("a tuple being rebuilt")


def _materialise(obj: Any, done: dict[int, Any]) -> Any:
    """Swap the stand-ins for their arrays and dtypes, keeping shared and cyclic references shared.

    Stand-ins are unhashable, so the top level, lists, dict values and tuples are the only places they can sit.
    """
    if isinstance(obj, (_PendingArray, _PendingDtype)):
        return obj.build()
    if type(obj) not in (list, dict, tuple):
        return obj
    if id(obj) in done:
        if done[id(obj)] is _IN_PROGRESS:
            raise pickle.UnpicklingError("a tuple that contains itself (through a list or dict) is not supported "
                                         "next to numpy arrays")
        return done[id(obj)]
    if type(obj) is tuple:
        done[id(obj)] = _IN_PROGRESS
        done[id(obj)] = rebuilt = tuple(_materialise(item, done) for item in obj)
        return rebuilt
    done[id(obj)] = obj
    if type(obj) is list:
        obj[:] = [_materialise(item, done) for item in obj]
    else:
        for key, value in obj.items():
            obj[key] = _materialise(value, done)
    return obj


def load_pickle(data: bytes, *, allow: Allow, encoding: str = "ASCII") -> Any:
    """Unpickle ``data``, resolving globals only through ``allow``.

    Parameters
    ----------
    data : bytes
        The pickle stream, any protocol. numpy arrays load as Python 2 (protocols 0-2) and Python 3
        (protocols 3-4) write them; Python 3's protocols 0-2 and protocol 5 name other globals.
    allow : Allow
        The globals this caller's files may name: :data:`NO_GLOBALS`, or a merge of :data:`NUMPY_ARRAYS`
        and :func:`dict_subclasses`.
    encoding : str
        How Python 2 ``str`` objects are decoded; ``"latin1"`` for Python 2 pickles holding numpy arrays.

    Raises
    ------
    pickle.UnpicklingError
        For a global outside ``allow``, an array of a refused dtype, or any malformed stream.
    """
    try:
        unpickler = _Unpickler(data, allow, encoding)
        obj = unpickler.load()
        return _materialise(obj, {}) if unpickler.made_stand_ins else obj
    except pickle.UnpicklingError:
        raise
    except Exception as exc:  # whatever a malformed stream makes the unpickler raise is the data's fault
        raise pickle.UnpicklingError(str(exc) or type(exc).__name__) from exc
