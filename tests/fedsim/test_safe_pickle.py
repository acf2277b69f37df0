"""The allow-list unpickler: plain data and plain numpy arrays come back; code, forged objects never run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.safe_pickle import NO_GLOBALS, NUMPY_ARRAYS, dict_subclasses, load_pickle

REPO = Path(__file__).resolve().parents[2]


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


class _Bunch(dict[str, object]):
    pass


def _forged_array(spec: bytes, flags: bytes = b"0") -> bytes:
    """A Python 2 style array pickle whose dtype and raw bytes are whatever the attacker writes.

    With numpy's real ``_reconstruct``, ``dtype`` and ``ndarray`` allowed, ``spec=b"O8"`` turns the bytes
    ``AAAAAAAA`` into an object pointer, and reading the array crashes the interpreter.
    """
    return (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR(I1\n(I1\ntcnumpy\ndtype\n"
            b"(S'" + spec + b"'\nI0\nI1\ntR(I3\nS'|'\nNNNI-1\nI-1\nI" + flags + b"\ntbI00\nS'AAAAAAAA'\ntb.")


class TestLoadPickleSuccess:
    def test_plain_containers_load_when_no_global_is_allowed(self) -> None:
        # Prepare
        data = {"a": [1, 2.0, "x", None], (1, 2): {3: True}}

        # Execute / Assert
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            assert load_pickle(pickle.dumps(data, protocol=protocol), allow=NO_GLOBALS) == data

    @pytest.mark.parametrize("array", [
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.array([True, False]),
        np.array(["ab", "c"]),
        np.array([b"x", b"yz"]),
        np.array(1 + 2j, dtype=np.complex64),
        np.zeros((0, 3), np.uint8),
    ], ids=["int32-big-endian", "float64-fortran", "bool", "unicode", "bytes", "complex-0d", "empty"])
    def test_plain_arrays_round_trip_with_dtype_layout_and_sharing(self, array: np.ndarray) -> None:
        # Prepare: the same array twice, once inside a tuple: both places must get one array back
        payload = pickle.dumps({"k": [array, (array,)]}, protocol=4)

        # Execute
        loaded = load_pickle(payload, allow=NUMPY_ARRAYS)["k"]

        # Assert
        np.testing.assert_array_equal(loaded[0], array)
        assert loaded[0].dtype.str == array.dtype.str
        assert (loaded[0].flags.c_contiguous, loaded[0].flags.f_contiguous) == (array.flags.c_contiguous,
                                                                                array.flags.f_contiguous)
        assert loaded[0].flags.writeable
        assert loaded[1][0] is loaded[0]

    def test_dict_subclass_loads_as_plain_dict_without_importing_its_class(self) -> None:
        # Prepare: protocol 0 writes copyreg._reconstructor(<class>, dict, contents)
        payload = pickle.dumps(_Bunch(x=[1]), protocol=0)
        allow = dict_subclasses((__name__, "_Bunch"))

        # Execute
        loaded = load_pickle(payload, allow=allow)

        # Assert
        assert type(loaded) is dict and loaded == {"x": [1]}


class TestLoadPickleFailure:
    def test_global_outside_allow_list_is_refused_when_pickle_calls_os_system(
            self, capfd: pytest.CaptureFixture[str]) -> None:
        # Prepare
        payload = pickle.dumps(_Exploit(), protocol=0)

        # Execute / Assert
        with pytest.raises(pickle.UnpicklingError, match="system is not allowed"):
            load_pickle(payload, allow=NUMPY_ARRAYS)
        assert "pwned" not in capfd.readouterr().out

    def test_builtins_eval_is_refused(self) -> None:
        with pytest.raises(pickle.UnpicklingError, match=r"global builtins\.eval is not allowed"):
            load_pickle(b"cbuiltins\neval\n(S'1'\ntR.", allow=dict_subclasses(("m", "C")))

    def test_forged_object_array_is_refused_not_crashing_the_interpreter(self) -> None:
        # Prepare: in a child process, so that a regression segfaults the child, not the test run
        code = ("import pickle, sys; from fedsim.safe_pickle import load_pickle, NUMPY_ARRAYS\n"
                "try:\n"
                "    a = load_pickle(sys.stdin.buffer.read(), allow=NUMPY_ARRAYS, encoding='latin1')\n"
                "    print('loaded', repr(a[0]))\n"
                "except pickle.UnpicklingError as exc:\n"
                "    print('refused:', exc)\n")

        # Execute
        for flags in (b"0", b"63"):  # 63: the flags numpy writes for an object dtype
            done = subprocess.run([sys.executable, "-c", code], input=_forged_array(b"O8", flags), cwd=REPO,
                                  capture_output=True, timeout=120)

            # Assert
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            assert done.stdout.decode().strip() == "refused: dtype 'O8' is not allowed: only booleans, numbers and " \
                                                   "fixed-width strings"

    def test_object_flags_on_a_plain_dtype_are_refused(self) -> None:
        with pytest.raises(pickle.UnpicklingError, match="flags 63 are not allowed"):
            load_pickle(_forged_array(b"i8", b"63"), allow=NUMPY_ARRAYS, encoding="latin1")

    @pytest.mark.parametrize("obj", [
        np.array([None, 1], dtype=object),
        np.dtype("O"),
        np.dtype([("a", "i8"), ("b", "O")]),
        np.zeros(2, dtype=[("a", "i8"), ("b", "O")]),
        np.zeros(2, dtype=[("a", "i8")]),
    ], ids=["object-array", "object-dtype", "structured-dtype-object-field", "structured-array-object-field",
            "structured-array"])
    def test_object_and_structured_dtypes_are_refused(self, obj: object) -> None:
        with pytest.raises(pickle.UnpicklingError, match=r"dtype '[OV]\d+' is not allowed"):
            load_pickle(pickle.dumps(obj, protocol=4), allow=NUMPY_ARRAYS)

    def test_numpy_is_refused_where_the_caller_allows_no_globals(self) -> None:
        with pytest.raises(pickle.UnpicklingError, match=r"global numpy\._?core\.multiarray\._reconstruct"):
            load_pickle(pickle.dumps(np.arange(3), protocol=4), allow=NO_GLOBALS)

    def test_array_whose_bytes_do_not_fill_its_shape_is_refused(self) -> None:
        # Prepare: 8 raw bytes for a shape of 2 int64
        payload = _forged_array(b"i8").replace(b"(I1\n(I1\nt", b"(I1\n(I2\nt")

        # Execute / Assert
        with pytest.raises(pickle.UnpicklingError, match=r"array \(2,\) of <i8 needs 16 bytes, found 8"):
            load_pickle(payload, allow=NUMPY_ARRAYS, encoding="latin1")

    def test_malformed_stream_raises_unpickling_error(self) -> None:
        with pytest.raises(pickle.UnpicklingError):
            load_pickle(b"(lp0\n", allow=NO_GLOBALS)
