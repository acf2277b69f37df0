"""The configuration a Ray job receives: every local file it names is absolute, since the job runs elsewhere."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from fedsim.jobs import job_config, stage


def test_job_config_makes_every_local_path_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a data file and a base directory named relative to where the user submits from
    monkeypatch.chdir(tmp_path)
    Path("docs.csv").write_text("text,label\na b c,x\nd e f,y\n")
    Path("base").mkdir()
    # Execute
    cfg = job_config(None, ["data.source=docs.csv", "model.pretrained=./base", "cache_dir=.cache"], "runs")
    # Assert
    assert cfg.data.source == str(tmp_path / "docs.csv")
    assert cfg.model.pretrained == str(tmp_path / "base")
    assert (cfg.out_dir, cfg.cache_dir) == (str(tmp_path / "runs"), str(tmp_path / ".cache"))
    assert cfg.workers.ray_address == "auto"


def test_job_config_leaves_built_in_sources_and_hub_ids_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert job_config(None, [], None).data.source == "gensim_topics"
    assert job_config(None, ["model.pretrained=allenai/OLMoE-1B-7B-0924"], None).model.pretrained == (
        "allenai/OLMoE-1B-7B-0924"
    )


def test_stage_ships_a_user_strategy_module_and_only_then(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the worked example's module, importable as its README says
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples" / "custom_strategy"))
    user = job_config(None, ["strategy.name=fedavgm:FedAvgM"], "runs")
    builtin = job_config(None, [], "runs")

    # Execute
    staged, plain = stage(user), stage(builtin)
    try:
        # Assert: the job's working directory holds the module beside the packages; a built-in ships nothing more
        assert (staged / "fedavgm.py").read_text() == (Path(sys.modules["fedavgm"].__file__ or "")).read_text()
        assert sorted(p.name for p in staged.iterdir()) == sorted([*(p.name for p in plain.iterdir()), "fedavgm.py"])
    finally:
        shutil.rmtree(staged)
        shutil.rmtree(plain)
