"""configs/paper/: the paper's settings, and each config preparing and training unchanged but for its hub names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregation.messages import ClientInstructions
from fedsim.config import load_config
from fedsim.driver import engine_spec
from fedsim.prepare import prepare
from tests.fedsim.engine.test_choice_engine import write_hellaswag, write_mmlu

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
CONFIGS = sorted(PAPER.glob("*.yaml"))
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
# A tiny base of the same family in place of the hub checkpoint, built from the same data
TINY_BASE = ["progress=false", "model.pretrained=null", "model.hidden_size=32", "model.num_layers=2",
             "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=32", "model.num_experts=4",
             "model.pretrain.steps=0", "model.pretrain.tokenizer_vocab=400", "data.max_length=48",
             "data.max_option_length=12"]


def write_agnews(path: Path, per_label: int = 12) -> Path:
    """A JSON-lines file in ag_news' schema, with its label names as strings."""
    rows = [{"text": f"report {i} on {label.lower()} news from the wire", "label": label}
            for label in AGNEWS_LABELS for i in range(per_label)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_paper_config_is_one_of_two_models_on_three_tasks_at_two_alphas() -> None:
    names = {p.stem for p in CONFIGS}
    assert names == {f"{m}-{d}-a{a}"
                     for m in ("switch", "deepseek") for d in ("agnews", "mmlu", "hellaswag") for a in ("0.1", "1.0")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_has_the_papers_settings(path: Path) -> None:
    cfg = load_config(path)
    assert (cfg.data.num_clients, cfg.clients_per_round, cfg.rounds) == (10, 10, 25)
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == float(path.stem.split("-a")[-1])
    assert (cfg.train.lr, cfg.train.local_epochs) == (1e-4, 1)
    assert cfg.strategy.name == "fedalign_moe" and cfg.strategy.fedalign.reg_lambda == 0.1
    family = {"switch": "switch_transformers", "deepseek": "deepseek_v2"}[path.stem.split("-")[0]]
    assert cfg.model.family == family and cfg.model.pretrained
    task = path.stem.split("-")[1]
    assert cfg.data.format == {"agnews": "text", "mmlu": "mmlu", "hellaswag": "hellaswag"}[task]
    assert cfg.data.partition_by == {"agnews": "label", "mmlu": "subject", "hellaswag": "activity_label"}[task]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.endswith("a0.1")], ids=lambda p: p.stem)
def test_paper_config_prepares_and_trains_a_client_with_local_stand_ins(path: Path, tmp_path: Path) -> None:
    # Prepare: the config as shipped; only the hub names become local files in the same schemas, on CPU
    task = path.stem.split("-")[1]
    writers = {"agnews": write_agnews, "mmlu": write_mmlu, "hellaswag": write_hellaswag}
    source = writers[task](tmp_path / f"{task}.jsonl")
    offline = [f"data.source={source}", f"cache_dir={tmp_path / 'cache'}", "workers.gpus_per_worker=0",
               "data.num_clients=3", "clients_per_round=3", "data.min_examples=2", "train.local_steps=2"]
    top_k = ["model.top_k=1"] if "switch" in path.stem else ["model.top_k=2"]
    built = prepare(load_config(path, [*offline, *TINY_BASE, *top_k]))
    cfg = load_config(path, [*offline, f"model.pretrained={built.base_path}", *TINY_BASE[2:]])
    # Execute
    prepared = prepare(cfg)
    engine = engine_spec(cfg, prepared)()
    update = engine.train(prepared.partitions[0], engine.initial_payload,
                          ClientInstructions(client_id=0, round_idx=1, seed=0))
    # Assert: the shipped settings reached the engine (bf16, the task's scoring) and a client trained
    assert engine.spec.precision == "bf16" and engine.spec.task == ("label_word" if task == "agnews" else "choice")
    assert update is not None and np.isfinite(update.metric("train_loss")) and np.abs(update.delta).sum() > 0
    if task == "agnews":
        assert prepared.label_names == tuple(sorted(AGNEWS_LABELS)) and len(set(prepared.label_token_ids)) == 4


def test_switch_config_loads_a_sentencepiece_only_tokenizer(tmp_path: Path) -> None:
    # Prepare: google/switch-base-* ship their tokenizer as spiece.model alone; transformers converts it with
    # sentencepiece (pinned) and protobuf (Ray's). A stand-in base: the tiny Switch's weights beside a
    # sentencepiece model trained here, T5's special ids (pad 0, eos 1, unk 2)
    import sentencepiece
    from transformers import AutoTokenizer

    path = PAPER / "switch-mmlu-a0.1.yaml"
    source = write_mmlu(tmp_path / "mmlu.jsonl")
    offline = [f"data.source={source}", f"cache_dir={tmp_path / 'cache'}", "workers.gpus_per_worker=0",
               "data.num_clients=3", "clients_per_round=3", "data.min_examples=2", "train.local_steps=2"]
    built = prepare(load_config(path, [*offline, *TINY_BASE, "model.top_k=1"]))
    base = tmp_path / "switch-spiece"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        (base / name).write_bytes((Path(built.base_path) / name).read_bytes())
    text = tmp_path / "text.txt"
    text.write_text("".join(json.loads(line)["question"] + "\n" for line in source.read_text().splitlines()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(base / "spiece"), vocab_size=60, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    (base / "spiece.vocab").unlink()
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    cfg = load_config(path, [*offline, f"model.pretrained={base}", *TINY_BASE[2:]])
    # Execute
    prepared = prepare(cfg)
    engine = engine_spec(cfg, prepared)()
    update = engine.train(prepared.partitions[0], engine.initial_payload,
                          ClientInstructions(client_id=0, round_idx=1, seed=0))
    # Assert: the sentencepiece tokenizer was the one loaded, and a client trained through it
    assert type(AutoTokenizer.from_pretrained(base)).__name__ == "T5Tokenizer" and Path(prepared.base_path) == base
    assert update is not None and np.isfinite(update.metric("train_loss")) and np.abs(update.delta).sum() > 0
