"""The torch engine on multiple-choice files in the MMLU and HellaSwag schemas, causal and seq2seq (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregation.messages import ClientInstructions
from fedsim.config import load_config
from fedsim.data.choice import ChoiceBatch, ChoiceSplit
from fedsim.driver import engine_spec
from fedsim.engine.torch_engine import TorchEngine
from fedsim.prepare import PreparedRun, prepare

SUBJECTS = ("astronomy", "botany", "chemistry")
ACTIVITIES = ("baking cookies", "washing a car")
TINY = [
    "progress=false", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=32", "model.num_experts=4", "model.pretrain.steps=0", "model.pretrain.tokenizer_vocab=400",
    "lora.rank=2", "data.num_clients=3", "data.min_examples=2", "data.max_length=48", "data.max_option_length=12",
    "train.batch_size=4", "train.lr=0.01", "clients_per_round=3",
]


def write_mmlu(path: Path, per_subject: int = 10) -> Path:
    """A JSON-lines file in cais/mmlu's schema: the answer cycles through the four choices."""
    rows = []
    for s, subject in enumerate(SUBJECTS):
        for i in range(per_subject):
            rows.append({"question": f"In {subject}, which number follows {i + s}?", "subject": subject,
                         "choices": [str(i + s + d) for d in (1, 2, 3, 4)][::-1] if i % 2
                         else [str(i + s + d) for d in (1, 2, 3, 4)],
                         "answer": 3 if i % 2 else 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_hellaswag(path: Path, per_activity: int = 12) -> Path:
    """A JSON file in Rowan/hellaswag's schema, endings of different lengths."""
    rows = []
    for a, activity in enumerate(ACTIVITIES):
        for i in range(per_activity):
            endings = ["then rinses it.", "then dries it with a towel slowly.", "sings.", f"waits {i} minutes."]
            rows.append({"ind": a * 100 + i, "activity_label": activity, "ctx_a": f"A person is {activity}.",
                         "ctx_b": "they", "endings": endings, "label": str((i + a) % 4)})
    path.write_text(json.dumps(rows))
    return path


def _engine(tmp_path: Path, *overrides: str) -> tuple[TorchEngine, PreparedRun]:
    cfg = load_config(None, [*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])
    prepared = prepare(cfg)
    return engine_spec(cfg, prepared)(), prepared  # the recipe the driver hands its workers


def _brute_force_scores(engine: TorchEngine, batch: ChoiceBatch) -> torch.Tensor:
    """Each option's summed log-likelihood from one plain forward pass per (example, option)."""
    body, config = engine._body, engine._body.config
    scores = torch.zeros(len(batch), batch.num_options)
    for b in range(len(batch)):
        context = batch.context_ids[b, : batch.context_len[b]].tolist()
        for n in range(batch.num_options):
            option = batch.option_ids[b, n, : batch.option_len[b, n]].tolist()
            if config.is_encoder_decoder:
                decoder = [config.decoder_start_token_id, *option[:-1]]
                logits = body(input_ids=torch.tensor([context]), decoder_input_ids=torch.tensor([decoder])).logits[0]
                ll = torch.log_softmax(logits, -1)[torch.arange(len(option)), option]
            else:
                logits = body(input_ids=torch.tensor([context + option])).logits[0]
                positions = torch.arange(len(context) - 1, len(context) + len(option) - 1)
                ll = torch.log_softmax(logits, -1)[positions, option]
            scores[b, n] = ll.sum()
    return scores


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
@pytest.mark.parametrize("schema", ["mmlu", "hellaswag"])
def test_engine_option_scores_equal_one_forward_pass_per_option(tmp_path: Path, family: str, schema: str) -> None:
    # Prepare: random LoRA B so the adapters matter; an unpadded reference per (example, option)
    source = write_mmlu(tmp_path / "mmlu.jsonl") if schema == "mmlu" else write_hellaswag(tmp_path / "hs.json")
    top_k = "model.top_k=1" if family == "switch_transformers" else "model.top_k=2"
    engine, prepared = _engine(tmp_path, f"model.family={family}", top_k, f"data.format={schema}",
                               f"data.source={source}", "data.option_score=sum")
    payload = engine.initial_payload + np.random.default_rng(0).normal(
        0, 0.05, engine.initial_payload.shape
    ).astype(np.float32)
    engine._load(payload)
    engine.model.eval()
    batch = ChoiceSplit.load(prepared.test_path).take(np.arange(4))
    # Execute
    with torch.no_grad():
        scores, summed, label = engine._option_scores(batch, None, True)
        reference = _brute_force_scores(engine, batch)
    # Assert
    torch.testing.assert_close(scores, reference, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(summed, reference, atol=2e-4, rtol=1e-4)
    assert label.tolist() == batch.label.tolist()


def test_hellaswag_scores_per_token_by_default_and_mmlu_sums(tmp_path: Path) -> None:
    hs = load_config(None, [*TINY, "data.format=hellaswag", f"data.source={tmp_path / 'x.json'}"])
    mmlu = load_config(None, [*TINY, "data.format=mmlu", f"data.source={tmp_path / 'x.json'}"])
    assert hs.data.scoring == "mean" and mmlu.data.scoring == "sum"
    assert hs.data.partition_by == "activity_label" and mmlu.data.partition_by == "subject"


@pytest.mark.parametrize("family", ["qwen2_moe", "switch_transformers"])
def test_a_multiple_choice_client_trains_every_payload_class_and_is_evaluated_on_every_test_row(
    tmp_path: Path, family: str
) -> None:
    # Prepare: clients split by subject (Dirichlet over the subject column)
    top_k = "model.top_k=1" if family == "switch_transformers" else "model.top_k=2"
    engine, prepared = _engine(tmp_path, f"model.family={family}", top_k, "data.format=mmlu",
                               f"data.source={write_mmlu(tmp_path / 'mmlu.jsonl')}", "train.routing_stats=after")
    rows = prepared.partitions[0]
    # Execute
    update = engine.train(rows, engine.initial_payload, ClientInstructions(client_id=0, round_idx=1, seed=3))
    chunks = engine.evaluate(engine.initial_payload, [(0, prepared.n_test)])
    # Assert
    assert update is not None and update.n_examples == len(rows) and np.isfinite(update.metric("train_loss"))
    for role in ("router", "expert", "shared"):
        moved = sum(np.abs(update.delta[e.offset : e.offset + e.size]).sum() for e in engine.layout.select(role=role))
        assert moved > 0, role
    assert len(update.routing) == len(engine.layout.router_layers())
    assert all(abs(s.p_bar.sum() - 1) < 1e-6 for s in update.routing)
    # each context counted once (not once per option), every option's tokens counted
    data = ChoiceSplit.load(prepared.train_path).take(rows)
    context, options = int(data.context_len.sum()), int(data.option_len.sum())
    counted = [s.n_tokens for s in update.routing]
    if family == "switch_transformers":  # encoder layers see the contexts, decoder layers the options
        assert counted == [context] * 2 + [options] * 2
    else:
        assert counted == [context + options] * 2
    assert chunks[0].count == prepared.n_test and 0 <= chunks[0].correct <= prepared.n_test
    assert np.isfinite(chunks[0].loss_sum)
