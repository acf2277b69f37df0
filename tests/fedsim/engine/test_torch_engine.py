"""The torch engine on a tiny random-init Mixtral and the synthetic corpus (no Ray)."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from aggregation.client_terms import (
    BoundTerm,
    ClientTerm,
    PayloadStart,
    ProximalTerm,
    RoutingRegulariserTerm,
    TermInputs,
)
from aggregation.errors import ClientFailure, ConfigError
from aggregation.messages import ClientInstructions
from aggregation.routing_regulariser import RegForm
from fedsim.config import CompressionConfig, load_config
from fedsim.data.encoded import EncodedSplit
from fedsim.engine.torch_engine import TorchEngine, TorchEngineSpec
from fedsim.prepare import PreparedRun, prepare

TINY = [
    "progress=false", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=32", "model.num_experts=4", "model.top_k=2", "model.pretrain.steps=0",
    "model.pretrain.tokenizer_vocab=400", "lora.rank=2", "data.source=synthetic", "data.synthetic_docs_per_label=8",
    "data.num_clients=4", "data.partition=iid", "data.min_examples=2", "data.max_length=32", "train.batch_size=4",
    "train.lr=0.01", "clients_per_round=4",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchEngine, PreparedRun]:
    cfg = load_config(None, [*TINY, f"cache_dir={tmp_path_factory.mktemp('cache')}", "faults.fail_clients=[3]"])
    prepared = prepare(cfg)
    spec = TorchEngineSpec(
        base_path=prepared.base_path, train_path=prepared.train_path, test_path=prepared.test_path,
        label_token_ids=prepared.label_token_ids, lora=cfg.lora, train=cfg.train, faults=cfg.faults,
    )
    return spec(), prepared


def _instr(cid: int, seed: int, mu: float = 0.0) -> ClientInstructions:
    """Plain training instructions; FedProx's proximal term when ``mu`` > 0 (as FedProx.configure sends it)."""
    terms = (ProximalTerm(mu),) if mu > 0 else ()
    return ClientInstructions(client_id=cid, round_idx=1, seed=seed, terms=terms)


def test_train_same_seed_gives_identical_delta(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    engine, prepared = setup
    rows, payload = prepared.partitions[0], engine.initial_payload
    # Execute
    a = engine.train(rows, payload, _instr(0, seed=5))
    b = engine.train(rows, payload, _instr(0, seed=5))
    c = engine.train(rows, payload, _instr(0, seed=6))
    # Assert
    np.testing.assert_array_equal(a.delta, b.delta)
    assert not np.array_equal(a.delta, c.delta)
    assert a.n_examples == len(rows) and a.metrics["train_loss"][1] == len(rows)


def test_train_updates_router_experts_and_attention(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    u = engine.train(prepared.partitions[1], engine.initial_payload, _instr(1, seed=1))
    layout = engine.layout
    for role in ("router", "expert", "shared"):
        entries = layout.select(role=role)
        assert entries, role
        moved = sum(np.abs(u.delta[e.offset : e.offset + e.size]).sum() for e in entries)
        assert moved > 0, role


def test_train_prox_term_pulls_toward_global(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    rows = prepared.partitions[0]
    free = engine.train(rows, engine.initial_payload, _instr(0, seed=3, mu=0.0))
    held = engine.train(rows, engine.initial_payload, _instr(0, seed=3, mu=1000.0))
    assert np.linalg.norm(held.delta) < 0.5 * np.linalg.norm(free.delta)


def test_train_routing_stats_count_only_real_tokens(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    rows = prepared.partitions[2]
    u = engine.train(rows, engine.initial_payload, _instr(2, seed=2))
    real_tokens = int(EncodedSplit.load(prepared.train_path).take(rows).attention_mask.sum())
    assert len(u.routing) == 2
    for stats in u.routing:
        assert stats.n_tokens == real_tokens
        np.testing.assert_allclose(stats.p_bar.sum(), 1.0, rtol=1e-6)
        assert stats.counts.sum() == 2 * real_tokens  # top-2
    assert u.bytes_up["routing_stats"] == sum(s.nbytes for s in u.routing)


def test_train_injected_fault_names_client_and_round(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    with pytest.raises(ClientFailure, match="client 3 round 1: injected fault"):
        engine.train(prepared.partitions[3], engine.initial_payload, _instr(3, seed=0))


def test_evaluate_counts_every_test_row(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    n = prepared.n_test
    chunks = engine.evaluate(engine.initial_payload, [(0, n // 2), (n // 2, n)])
    assert [c.count for c in chunks] == [n // 2, n - n // 2]
    assert all(0 <= c.correct <= c.count and c.loss_sum > 0 for c in chunks)


def test_prepare_reuses_cached_base(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    cache = Path(prepared.base_path).parent
    cfg = load_config(None, [*TINY, f"cache_dir={cache}", "faults.fail_clients=[3]"])
    before = (Path(prepared.base_path) / "config.json").stat().st_mtime_ns
    again = prepare(cfg)
    assert again.base_path == prepared.base_path and again.train_path == prepared.train_path
    assert (Path(again.base_path) / "config.json").stat().st_mtime_ns == before


def test_routing_stats_during_training_need_no_extra_pass(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    rows = prepared.partitions[2]
    spec = engine.spec
    engine.spec = TorchEngineSpec(**{**spec.__dict__,
                                     "train": spec.train.model_copy(update={"routing_stats": "during"})})
    try:
        u = engine.train(rows, engine.initial_payload, _instr(2, seed=2))
    finally:
        engine.spec = spec
    real_tokens = int(EncodedSplit.load(prepared.train_path).take(rows).attention_mask.sum())
    assert [s.n_tokens for s in u.routing] == [real_tokens, real_tokens]  # one epoch: each token once


def test_routing_regulariser_changes_the_update_only_when_lambda_is_set(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    rows = prepared.partitions[0]
    p_g = np.tile(np.array([0.7, 0.1, 0.1, 0.1]), (2, 1))

    def regularised(weight: float, form: RegForm = "token") -> ClientInstructions:
        term = RoutingRegulariserTerm(weight, p_g.copy(), np.ones((2, 4)), form)
        return ClientInstructions(client_id=0, round_idx=1, seed=4, terms=(term,))

    plain = engine.train(rows, engine.initial_payload, _instr(0, seed=4))
    off = engine.train(rows, engine.initial_payload, regularised(0.0))
    on = engine.train(rows, engine.initial_payload, regularised(5.0))
    batch = engine.train(rows, engine.initial_payload, regularised(5.0, "batch"))
    np.testing.assert_array_equal(plain.delta, off.delta)
    router = engine.layout.select(role="router")[0]
    span = slice(router.offset, router.offset + router.size)
    assert not np.allclose(on.delta[span], plain.delta[span])
    assert not np.allclose(batch.delta[span], plain.delta[span])
    assert not np.allclose(batch.delta[span], on.delta[span])  # the term's form reaches the loss


def test_prepare_keys_cache_by_every_corpus_setting(setup) -> None:  # type: ignore[no-untyped-def]
    # A bigger synthetic corpus must not reuse the smaller one's encoded data (stale rows, wrong indices).
    _, prepared = setup
    cache = Path(prepared.base_path).parent
    bigger = prepare(load_config(None, [*TINY, f"cache_dir={cache}", "data.synthetic_docs_per_label=12"]))
    assert bigger.train_path != prepared.train_path
    assert bigger.n_train > prepared.n_train
    assert max(int(p.max()) for p in bigger.partitions) < bigger.n_train
    # Partition-only settings reuse the same base and encoded data.
    regrouped = prepare(load_config(None, [*TINY, f"cache_dir={cache}", "data.partition=dirichlet", "data.alpha=5.0"]))
    assert regrouped.train_path == prepared.train_path and regrouped.base_path == prepared.base_path
    # Loading and encoding settings reuse the base; an encoding setting re-encodes.
    loaded = prepare(load_config(None, [*TINY, f"cache_dir={cache}", "model.quantization=4bit",
                                        "workers.gpus_per_worker=1", "data.max_length=40"]))
    assert loaded.base_path == prepared.base_path and loaded.train_path != prepared.train_path


def test_personal_experts_are_the_start_and_do_not_count_as_downloaded(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a personal expert block that differs from the global one
    engine, prepared = setup
    rows, payload = prepared.partitions[0], engine.initial_payload
    a, b = engine.layout.expert_block
    own = payload[a:b] + np.float32(0.05)
    start = payload.copy()
    start[a:b] = own
    # Execute
    personal = engine.train(rows, payload,
                            ClientInstructions(client_id=0, round_idx=1, seed=5, start=PayloadStart(a, own)))
    explicit = engine.train(rows, start, _instr(0, seed=5))
    # Assert: the same as training from the patched payload, and expert bytes were not sent down
    np.testing.assert_array_equal(personal.delta, explicit.delta)
    def expert_bytes(by_class: dict[str, int]) -> int:
        return sum(v for k, v in by_class.items() if k.startswith("expert/"))

    assert expert_bytes(personal.bytes_down) == 0 and expert_bytes(explicit.bytes_down) == (b - a) * 4
    assert expert_bytes(personal.bytes_up) == (b - a) * 4
    assert personal.bytes_down["shared"] == explicit.bytes_down["shared"] > 0


def test_a_start_covering_part_of_a_class_counts_only_the_classes_it_covers_wholly(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a start over expert (0, 0) and the first value of the next expert's span
    engine, prepared = setup
    rows, payload = prepared.partitions[0], engine.initial_payload
    spans = engine.layout.class_spans()
    a, b = spans["expert/L0/E0"]
    assert spans["expert/L0/E1"][0] == b
    own = payload[a : b + 1] + np.float32(0.05)
    patched = payload.copy()
    patched[a : b + 1] = own
    # Execute
    started = engine.train(rows, payload, ClientInstructions(client_id=0, round_idx=1, seed=5,
                                                             start=PayloadStart(a, own)))
    explicit = engine.train(rows, patched, _instr(0, seed=5))
    # Assert: trained from the patched payload; only the wholly covered class is not counted as sent down
    np.testing.assert_array_equal(started.delta, explicit.delta)
    zero = {k for k, v in started.bytes_down.items() if v == 0}
    assert zero == {"expert/L0/E0"}
    assert started.bytes_down["expert/L0/E1"] == explicit.bytes_down["expert/L0/E1"] > 0


def test_a_start_past_the_payload_names_the_client(setup) -> None:  # type: ignore[no-untyped-def]
    engine, prepared = setup
    total = engine.layout.total
    bad = ClientInstructions(client_id=2, round_idx=4, seed=0,
                             start=PayloadStart(total - 1, np.zeros(3, dtype=np.float32)))
    with pytest.raises(ClientFailure, match=rf"client 2.*round 4.*start reaches payload index {total + 2}, "
                                            rf"the layout has {total}"):
        engine.train(prepared.partitions[2], engine.initial_payload, bad)


@dataclass(frozen=True)
class _RecordingTerm(ClientTerm):
    """A user's own term: a pull of every trainable value toward zero that records the inputs of each step."""

    weight: float
    calls: list[TermInputs] = field(default_factory=list, compare=False)

    def bind(self, device: torch.device) -> BoundTerm:
        def term(inputs: TermInputs) -> torch.Tensor:
            self.calls.append(inputs)
            return self.weight * torch.stack([(p**2).sum() for p in inputs.params]).sum()

        return term


@dataclass(frozen=True)
class _RecordingStartAndRoutingTerm(_RecordingTerm):
    """The same term, asking for the start values and the router probabilities."""

    reads_routing: ClassVar[bool] = True
    reads_start: ClassVar[bool] = True


@pytest.mark.parametrize("term_type", [_RecordingTerm, _RecordingStartAndRoutingTerm])
def test_any_client_term_is_added_to_the_loss_with_the_inputs_it_asks_for(setup, term_type) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    engine, prepared = setup
    rows, payload = prepared.partitions[0], engine.initial_payload
    term = term_type(10.0)
    asks = term_type is _RecordingStartAndRoutingTerm
    # Execute
    plain = engine.train(rows, payload, _instr(0, seed=7))
    steps: list[float] = []
    pulled = engine.train(rows, payload, ClientInstructions(client_id=0, round_idx=1, seed=7, terms=(term,)),
                          step_losses=steps)
    # Assert: called once per step with the trainable tensors; start and probabilities only when asked for
    assert len(term.calls) == len(steps) > 0
    for inputs in term.calls:
        assert len(inputs.params) == len(engine.trainable) and inputs.top_k == 2
        assert list(inputs.param_weights) == [1.0] * len(engine.trainable)
        assert len(inputs.start) == (len(engine.trainable) if asks else 0)
        assert len(inputs.probs) == len(inputs.masks) == (2 if asks else 0)  # one per MoE layer
    if asks:  # the start is the trainable values before the first step
        first = term.calls[0]
        assert all(not a.requires_grad for a in first.start)
        assert any(not torch.equal(a, p.detach()) for a, p in zip(first.start, engine.trainable, strict=True))
    assert not np.allclose(pulled.delta, plain.delta)


def test_compressed_uplink_sends_decoded_values_counts_encoded_bytes_and_returns_the_residual(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the same engine recipe with an int8 uplink
    engine, prepared = setup
    spec = dataclasses.replace(engine.spec, compression=CompressionConfig(uplink="int8"))
    compressed_engine = spec()
    rows, payload = prepared.partitions[0], engine.initial_payload
    # Execute
    plain = engine.train(rows, payload, _instr(0, seed=5))
    sent = compressed_engine.train(rows, payload, _instr(0, seed=5))
    # Assert: what arrives is the int8 decoding of the plain delta, and the residual is the difference
    assert sent.residual is not None
    np.testing.assert_allclose(sent.delta + sent.residual, plain.delta, atol=1e-6)
    (key, (a, b)), *_ = [(k, s) for k, s in engine.layout.class_spans().items() if k.startswith("expert/")]
    assert sent.bytes_up[key] == (b - a) + 4 and plain.bytes_up[key] == (b - a) * 4
    assert 0 < sent.metric("compression_error") < 0.05


def test_gradient_checkpointing_trains_the_same_client_to_the_same_delta(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the same engine recipe with activations recomputed in the backward pass
    engine, prepared = setup
    spec = dataclasses.replace(engine.spec, train=engine.spec.train.model_copy(update={"gradient_checkpointing": True}))
    checkpointed = spec()
    rows = prepared.partitions[1]
    # Execute
    plain = engine.train(rows, engine.initial_payload, _instr(1, seed=9))
    recomputed = checkpointed.train(rows, checkpointed.initial_payload, _instr(1, seed=9))
    # Assert: same steps, same update (recomputation is exact up to float rounding), statistics counted once
    assert checkpointed._body.is_gradient_checkpointing
    np.testing.assert_allclose(recomputed.delta, plain.delta, atol=1e-6, rtol=0)
    assert [s.n_tokens for s in recomputed.routing] == [s.n_tokens for s in plain.routing]


def test_bf16_keeps_the_base_in_bf16_the_trainable_slots_in_fp32_and_tracks_the_fp32_update(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the same recipe in bf16 (autocast runs on the CPU too)
    engine, prepared = setup
    half = dataclasses.replace(engine.spec, precision="bf16")()
    rows = prepared.partitions[1]
    # Execute
    full = engine.train(rows, engine.initial_payload, _instr(1, seed=9))
    reduced = half.train(rows, half.initial_payload, _instr(1, seed=9))
    # Assert: frozen weights are bf16, every trainable slot is fp32; the update follows fp32's closely, not exactly
    frozen = {p.dtype for p in half.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in half.trainable} == {torch.float32}
    np.testing.assert_allclose(half.initial_payload, engine.initial_payload, rtol=2**-8, atol=0)  # loaded in bf16
    cosine = full.delta @ reduced.delta / (np.linalg.norm(full.delta) * np.linalg.norm(reduced.delta))
    assert 0.9 < cosine < 1.0 - 1e-9
    assert abs(reduced.metric("train_loss") - full.metric("train_loss")) < 0.05 * full.metric("train_loss")


@pytest.mark.parametrize(("quantization", "linear"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_base_trains_the_same_slots_and_tracks_the_fp32_update(setup, quantization, linear) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the same base loaded quantized by bitsandbytes (its CPU kernels here)
    engine, prepared = setup
    quantized = dataclasses.replace(engine.spec, quantization=quantization)()
    rows = prepared.partitions[1]
    # Execute
    full = engine.train(rows, engine.initial_payload, _instr(1, seed=9))
    reduced = quantized.train(rows, quantized.initial_payload, _instr(1, seed=9))
    # Assert: attention projections are bitsandbytes modules, routers are not; same layout; trainable slots fp32;
    # the update points the way fp32's does, but quantization noise moves it
    kinds = {type(m).__name__ for name, m in quantized.model.named_modules() if name.endswith("q_proj.base_layer")}
    routers = {type(m).__name__ for name, m in quantized.model.named_modules() if name.endswith(".gate")}
    assert kinds == {linear} and linear not in routers
    assert quantized.layout == engine.layout and {p.dtype for p in quantized.trainable} == {torch.float32}
    assert np.isfinite(reduced.delta).all() and np.isfinite(reduced.metric("train_loss"))
    cosine = full.delta @ reduced.delta / (np.linalg.norm(full.delta) * np.linalg.norm(reduced.delta))
    assert 0.5 < cosine < 1.0 - 1e-6


def test_quantized_base_without_bitsandbytes_is_a_one_line_config_error(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine, _ = setup
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^model\.quantization: '4bit' needs bitsandbytes: "
                                          r"pip install -e '\.\[quantization\]'$"):
        dataclasses.replace(engine.spec, quantization="4bit")()
