"""The restricted unpickler reads gensim's newsgroups pickle and nothing more dangerous."""

from __future__ import annotations

import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest

from aggregation.errors import DataError
from fedsim.data.gensim_sources import gensim_test_data_dir
from fedsim.data.safe_pickle import load_newsgroups_bunch, load_restricted_pickle


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class TestRestrictedUnpicklerSuccess:
    def test_load_newsgroups_bunch_returns_200_posts_in_two_groups(self):
        # Execute
        bunch = load_newsgroups_bunch(gensim_test_data_dir() / "mini_newsgroup")

        # Assert
        assert bunch["target_names"] == ["alt.atheism", "sci.space"]
        assert len(bunch["data"]) == 200
        assert all(isinstance(post, str) for post in bunch["data"])
        np.testing.assert_array_equal(np.bincount(bunch["target"]), [100, 100])
        assert bunch["filenames"][0].endswith(b"alt.atheism/51251")

    def test_plain_containers_load_when_no_global_is_needed(self):
        assert load_restricted_pickle(pickle.dumps({"a": [1, 2.0, "x"]}, protocol=0)) == {"a": [1, 2.0, "x"]}


class TestRestrictedUnpicklerFailure:
    def test_global_outside_allow_list_is_refused_when_pickle_calls_os_system(self, capfd):
        # Prepare
        payload = pickle.dumps(_Exploit(), protocol=0)

        # Execute / Assert
        with pytest.raises(pickle.UnpicklingError, match="system is not allowed"):
            load_restricted_pickle(payload)
        assert "pwned" not in capfd.readouterr().out

    def test_builtins_other_than_dict_are_refused(self):
        with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
            load_restricted_pickle(b"cbuiltins\neval\n(S'1'\ntR.")

    def test_newsgroups_loader_raises_data_error_when_file_is_not_compressed(self, tmp_path: Path):
        # Prepare
        path = tmp_path / "mini_newsgroup"
        path.write_bytes(b"not zlib")

        # Execute / Assert
        with pytest.raises(DataError, match="not a readable newsgroups pickle"):
            load_newsgroups_bunch(path)

    def test_newsgroups_loader_raises_data_error_when_pickle_is_not_a_bunch(self, tmp_path: Path):
        path = tmp_path / "mini_newsgroup"
        path.write_bytes(zlib.compress(pickle.dumps([1, 2], protocol=0)))
        with pytest.raises(DataError, match="expected a dict"):
            load_newsgroups_bunch(path)
