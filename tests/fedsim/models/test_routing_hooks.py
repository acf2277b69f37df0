"""Routing statistics and router probabilities recorded through router hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from torch import nn

from aggregation.routing_stats import RoutingStats
from fedsim.models import RoutingRecorder, family_of
from fedsim.models.routing_hooks import routing_probabilities

if TYPE_CHECKING:
    from tests.fedsim.models.conftest import TinyMoE

IDS = torch.tensor([[5, 17, 3, 40, 22, 9], [8, 61, 30, 0, 0, 0], [2, 2, 50, 33, 12, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])


def _reference_stats(
    tiny: TinyMoE, family: str, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> list[RoutingStats]:
    """Stats computed token by token from the model's own router logits and its MoE-block inputs.

    An encoder-decoder runs on ``tiny.decoder_inputs``: its encoder layers count the tokens under ``mask``,
    its decoder layers those under the decoder mask. K(x) is the top-k of p(x) (Switch: the argmax).
    """
    inputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
        for block in family_of(model).moe_blocks(model)
    ]
    with torch.no_grad():
        out = tiny.forward(model, ids, mask, output_router_logits=True)
    for h in handles:
        h.remove()
    masks = tiny.layer_masks(family, mask, tiny.decoder_inputs(ids.shape[0])[1])
    top_k = tiny.routed(family)
    sigmoid = family_of(model).router_scores == "sigmoid"  # DeepSeek-V3: normalised sigmoid scores
    result = []
    for logits, x, layer_mask in zip(tiny.router_logits(out), inputs, masks, strict=True):
        keep = layer_mask.reshape(-1).numpy().astype(bool)
        logits64 = logits.double().numpy()[keep]
        num_experts, hidden = logits.shape[1], x.shape[-1]
        xs = x.reshape(-1, hidden).double().numpy()[keep]
        s = RoutingStats.zeros(num_experts, hidden)
        p_sum, counts, margin_sum, x_sum = s.p_sum, s.counts, s.margin_sum, s.x_sum
        for z, xv in zip(logits64, xs, strict=True):
            p = 1 / (1 + np.exp(-z)) if sigmoid else np.exp(z - z.max())
            p = p / p.sum()
            top = set(np.argsort(-p)[:top_k].tolist())
            best_out = max(p[j] for j in range(num_experts) if j not in top)
            p_sum += p
            for e in top:
                counts[e] += 1
                margin_sum[e] += p[e] - best_out
                x_sum[e] += xv
        result.append(RoutingStats(int(keep.sum()), p_sum, counts, margin_sum, x_sum))
    return result


def _assert_stats_close(got: RoutingStats, want: RoutingStats) -> None:
    assert got.n_tokens == want.n_tokens
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_allclose(got.p_sum, want.p_sum, atol=1e-6)
    np.testing.assert_allclose(got.margin_sum, want.margin_sum, atol=1e-6)
    np.testing.assert_allclose(got.x_sum, want.x_sum, atol=1e-6)


def test_recorder_stats_match_direct_computation_on_padded_batch(tiny: TinyMoE, family_name: str) -> None:
    # Prepare: an encoder-decoder's decoder reads tiny.decoder_inputs, 9 real tokens of 12
    model = tiny.lora(family_name, seed=4)
    want = _reference_stats(tiny, family_name, model, IDS, MASK)
    decoder_mask = tiny.decoder_inputs(IDS.shape[0])[1] if tiny.encoder_decoder(family_name) else None

    # Execute
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.set_mask(MASK, decoder_mask)
        tiny.forward(model, IDS, MASK)
    got = recorder.stats()

    # Assert: 18 positions, 4 of them padding; decoder layers 12 positions, 3 of them padding
    tokens = [14] * tiny.layers + ([9] * tiny.layers if tiny.encoder_decoder(family_name) else [])
    assert [g.n_tokens for g in got] == tokens
    for g, w, n in zip(got, want, tokens, strict=True):
        assert g.counts.sum() == n * tiny.routed(family_name)
        _assert_stats_close(g, w)


def test_recorder_stats_of_two_batches_are_their_sum(tiny: TinyMoE) -> None:
    # Prepare
    model = tiny.model("qwen3_moe", seed=1)
    halves = [(IDS[:2], MASK[:2]), (IDS[2:], MASK[2:])]
    separate = []
    for ids, mask in halves:
        with RoutingRecorder(model) as recorder, torch.no_grad():
            recorder.set_mask(mask)
            model(input_ids=ids, attention_mask=mask)
        separate.append(recorder.stats())

    # Execute
    with RoutingRecorder(model) as recorder, torch.no_grad():
        for ids, mask in halves:
            recorder.set_mask(mask)
            model(input_ids=ids, attention_mask=mask)
    together = recorder.stats()

    # Assert
    for layer in range(tiny.layers):
        _assert_stats_close(together[layer], separate[0][layer] + separate[1][layer])


def test_recorder_stats_match_hand_computation_for_chosen_router_logits(tiny: TinyMoE) -> None:
    # Prepare: router weight picks x[:4] as the logits, so p = softmax(x[:4]) = (0.5, 0.3, 0.15, 0.05)
    model = tiny.model("mixtral")
    router = family_of(model).routers(model)[0]
    with torch.no_grad():
        router.weight.copy_(torch.eye(tiny.experts, tiny.hidden))
    x = torch.zeros(1, tiny.hidden)
    x[0, :4] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    # Execute
    with RoutingRecorder(model) as recorder, torch.no_grad():
        router(x)
    s = recorder.stats()[0]

    # Assert: K(x) = {0, 1}; best expert outside K is 2 (0.15)
    assert s.n_tokens == 1
    np.testing.assert_allclose(s.p_sum, [0.5, 0.3, 0.15, 0.05], atol=1e-6)
    np.testing.assert_array_equal(s.counts, [1, 1, 0, 0])
    np.testing.assert_allclose(s.margin_sum, [0.5 - 0.15, 0.3 - 0.15, 0, 0], atol=1e-6)
    np.testing.assert_allclose(s.x_sum, np.stack([x[0], x[0], 0 * x[0], 0 * x[0]]).astype(np.float64), atol=1e-6)
    assert recorder.stats()[1].n_tokens == 0  # layer 1's router never ran


def test_recorder_margin_is_the_probability_when_every_expert_is_routed(tiny: TinyMoE) -> None:
    # Prepare
    model = tiny.model("mixtral", top_k=tiny.experts)
    router = family_of(model).routers(model)[0]
    with torch.no_grad():
        router.weight.copy_(torch.eye(tiny.experts, tiny.hidden))
    x = torch.zeros(1, tiny.hidden)
    x[0, :4] = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))

    # Execute
    with RoutingRecorder(model) as recorder, torch.no_grad():
        router(x)

    # Assert
    np.testing.assert_allclose(recorder.stats()[0].margin_sum, [0.4, 0.3, 0.2, 0.1], atol=1e-6)


def test_recorder_without_mask_counts_every_token(tiny: TinyMoE) -> None:
    # Prepare
    model = tiny.model("mixtral")

    # Execute
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(input_ids=IDS)

    # Assert
    assert [s.n_tokens for s in recorder.stats()] == [18, 18]
    assert [s.counts.sum() for s in recorder.stats()] == [18 * tiny.top_k, 18 * tiny.top_k]


def test_recorder_keeps_probs_with_grad_of_latest_forward_only(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    model = tiny.lora(family_name)
    router = tiny.router_weight(family_of(model).routers(model)[1])
    decoder = tiny.encoder_decoder(family_name)
    decoder_mask = tiny.decoder_inputs(IDS.shape[0])[1] if decoder else None

    # Execute
    with RoutingRecorder(model, keep_probs=True, collect_stats=False) as recorder:
        recorder.set_mask(MASK, decoder_mask)
        tiny.forward(model, IDS, MASK)
        recorder.set_mask(MASK[:1], None if decoder_mask is None else decoder_mask[:1])
        out = tiny.forward(model, IDS[:1], MASK[:1], output_router_logits=True)
        probs, masks = recorder.probs, recorder.masks
        probs[1][:, 0].sum().backward()

    # Assert: Switch's layers 0, 1 are the encoder's (6 tokens), 2, 3 the decoder's (4 tokens)
    moe_layers = tiny.moe_layers(family_name)
    assert len(probs) == moe_layers and probs[0].shape == (6, tiny.experts)
    logits = tiny.router_logits(out)
    for layer in range(moe_layers):
        torch.testing.assert_close(probs[layer], routing_probabilities(logits[layer], family_of(model).router_scores))
    decoder_layers = tiny.layers if decoder else 0
    assert [p.shape[0] for p in probs] == [6] * (moe_layers - decoder_layers) + [4] * decoder_layers
    assert [None if m is None else m.tolist() for m in masks] == (
        [[True] * 6] * (moe_layers - decoder_layers) + [[True] * 4] * decoder_layers
    )
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert recorder.stats()[0].n_tokens == 0  # statistics were off


def test_recorder_on_switch_counts_encoder_tokens_in_encoder_layers_and_decoder_tokens_in_decoder_layers(
    tiny: TinyMoE,
) -> None:
    # Prepare
    model = tiny.model("switch_transformers")
    decoder_mask = tiny.decoder_inputs(IDS.shape[0])[1]

    # Execute
    with RoutingRecorder(model) as unmasked, torch.no_grad():
        tiny.forward(model, IDS, MASK)
    with RoutingRecorder(model) as masked, torch.no_grad():
        masked.set_mask(MASK, decoder_mask)
        tiny.forward(model, IDS, MASK)

    # Assert: 18 encoder positions (14 real), 12 decoder positions (9 real); one expert per token
    assert [s.n_tokens for s in unmasked.stats()] == [18, 18, 12, 12]
    assert [s.n_tokens for s in masked.stats()] == [14, 14, 9, 9]
    assert [s.counts.sum() for s in masked.stats()] == [14, 14, 9, 9]
    flat = [MASK.reshape(-1).bool().tolist()] * 2 + [decoder_mask.reshape(-1).bool().tolist()] * 2
    assert [None if m is None else m.tolist() for m in masked.masks] == flat


def test_recorder_on_switch_routes_a_token_dropped_for_capacity_to_no_expert(tiny: TinyMoE) -> None:
    # Prepare: each expert takes at most one token per sequence, so most of a 6-token sequence is dropped
    model = tiny.model("switch_transformers")
    for block in family_of(model).moe_blocks(model):
        block.router.expert_capacity = 1
    ids = IDS[:1]
    decoder_ids, decoder_mask = tiny.decoder_inputs(1)

    # Execute
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.set_mask(torch.ones_like(ids), torch.ones_like(decoder_mask))
        model(input_ids=ids, decoder_input_ids=decoder_ids)

    # Assert: every token counts toward p̄, only dispatched ones toward counts (at most one per expert)
    encoder = recorder.stats()[0]
    assert encoder.n_tokens == 6 and np.isclose(encoder.p_bar.sum(), 1.0)
    assert encoder.counts.max() <= 1 and 1 <= encoder.counts.sum() < 6


def test_recorder_on_switch_asks_for_the_decoder_mask(tiny: TinyMoE) -> None:
    with (
        RoutingRecorder(tiny.model("switch_transformers")) as recorder,
        pytest.raises(ValueError, match="decoder_mask"),
    ):
        recorder.set_mask(MASK)


def test_recorder_raises_when_mask_does_not_match_batch(tiny: TinyMoE) -> None:
    model = tiny.model("mixtral")
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.set_mask(MASK)
        with pytest.raises(ValueError, match=r"^MoE layer 0: the attention mask covers 18 tokens, the router saw 6"):
            model(input_ids=IDS[:1])


def test_recorder_records_nothing_after_exit(tiny: TinyMoE) -> None:
    # Prepare
    model = tiny.model("qwen3_moe")
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(input_ids=IDS[:1])

    # Execute
    with torch.no_grad():
        model(input_ids=torch.randint(0, tiny.vocab, (4, 6)))

    # Assert
    assert [s.n_tokens for s in recorder.stats()] == [6, 6]


def test_routing_probabilities_softmax_and_normalised_sigmoid() -> None:
    logits = torch.tensor([[0.0, 0.0, 2.0], [1.0, -1.0, 0.0]])
    soft = routing_probabilities(logits)
    sig = routing_probabilities(logits, "sigmoid")
    torch.testing.assert_close(soft[0], torch.tensor([1.0, 1.0, np.e**2]) / (2 + np.e**2), check_dtype=False)
    s0 = torch.tensor([0.5, 0.5, 1 / (1 + np.exp(-2.0))])
    torch.testing.assert_close(sig[0], (s0 / s0.sum()).float())
    torch.testing.assert_close(sig.sum(dim=-1), torch.ones(2))
