"""gensim's newsgroups pickle loads through the allow-list unpickler exactly as numpy's own unpickling reads it."""

from __future__ import annotations

import io
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregation.errors import DataError
from fedsim.data.gensim_sources import gensim_test_data_dir, load_newsgroups_bunch


class _Bunch(dict[str, Any]):
    pass


class _TrustingUnpickler(pickle.Unpickler):
    """Numpy's real array unpickling, for a reference reading of the (trusted) file shipped with gensim."""

    def find_class(self, module: str, name: str) -> Any:
        return _Bunch if name == "Bunch" else super().find_class(module, name)


class TestNewsgroupsSuccess:
    def test_load_newsgroups_bunch_returns_200_posts_in_two_groups(self) -> None:
        # Execute
        bunch = load_newsgroups_bunch(gensim_test_data_dir() / "mini_newsgroup")

        # Assert
        assert bunch["target_names"] == ["alt.atheism", "sci.space"]
        assert len(bunch["data"]) == 200
        assert all(isinstance(post, str) for post in bunch["data"])
        np.testing.assert_array_equal(np.bincount(bunch["target"]), [100, 100])
        assert bunch["filenames"][0].endswith(b"alt.atheism/51251")

    def test_newsgroups_file_loads_as_numpy_itself_would_read_it(self) -> None:
        # Prepare
        path = gensim_test_data_dir() / "mini_newsgroup"
        raw = zlib.decompress(path.read_bytes())
        reference = dict(_TrustingUnpickler(io.BytesIO(raw), encoding="latin1").load())

        # Execute
        bunch = load_newsgroups_bunch(path)

        # Assert
        assert type(bunch) is dict and list(bunch) == list(reference) == ["DESCR", "data", "target", "target_names",
                                                                          "filenames"]
        assert bunch["DESCR"] is None and bunch["data"] == reference["data"]
        assert bunch["target_names"] == reference["target_names"]
        for key, dtype in (("target", "<i8"), ("filenames", "|S47")):
            assert bunch[key].dtype.str == reference[key].dtype.str == dtype
            assert bunch[key].shape == reference[key].shape == (200,)
            assert bunch[key].tobytes() == reference[key].tobytes()


class TestNewsgroupsFailure:
    def test_newsgroups_loader_raises_data_error_when_file_is_not_compressed(self, tmp_path: Path) -> None:
        # Prepare
        path = tmp_path / "mini_newsgroup"
        path.write_bytes(b"not zlib")

        # Execute / Assert
        with pytest.raises(DataError, match="not a readable newsgroups pickle"):
            load_newsgroups_bunch(path)

    def test_newsgroups_loader_raises_data_error_when_pickle_is_not_a_bunch(self, tmp_path: Path) -> None:
        path = tmp_path / "mini_newsgroup"
        path.write_bytes(zlib.compress(pickle.dumps([1, 2], protocol=0)))
        with pytest.raises(DataError, match="expected a dict"):
            load_newsgroups_bunch(path)

    def test_newsgroups_loader_raises_data_error_naming_the_file_when_an_array_is_an_object_array(
            self, tmp_path: Path) -> None:
        # Prepare
        path = tmp_path / "mini_newsgroup"
        path.write_bytes(zlib.compress(pickle.dumps({"target": np.array([None], dtype=object)}, protocol=3)))

        # Execute / Assert
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable newsgroups pickle "
                                            r"\(dtype 'O8' is not allowed"):
            load_newsgroups_bunch(path)
