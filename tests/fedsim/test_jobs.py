"""The configuration a Ray job receives: every local file it names is absolute, since the job runs elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.jobs import job_config


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
