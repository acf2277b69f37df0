"""Expert LoRA on the routed rows: the numbers, layout and files of peft's path, at a cost that follows the tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import ParamWrapper
from safetensors.torch import load_file
from torch import nn

from aggregation.messages import ClientInstructions
from fedsim.config import load_config
from fedsim.engine.torch_engine import TorchEngine, TorchEngineSpec
from fedsim.models import apply_lora, build_layout, family_of
from fedsim.models.expert_lora import RoutedExpertLora, route_expert_lora
from fedsim.prepare import prepare

if TYPE_CHECKING:
    from tests.fedsim.models.conftest import TinyMoE

IDS = torch.tensor([[4, 8, 15, 16, 23, 42, 7], [3, 1, 4, 1, 5, 9, 2]])
LR = 1e-2


def _adapted(tiny: TinyMoE, family: str, *, routed: bool, experts: int | None = None) -> PeftModel:
    """The tiny model of ``family`` with LoRA whose B factors are random (so each expert's LoRA changes its output)."""
    sizes = tiny if experts is None else dataclasses.replace(tiny, experts=experts)
    model = apply_lora(sizes.model(family), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, routed_experts=routed)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def _step(model: nn.Module, ids: torch.Tensor = IDS) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One AdamW step on the causal-LM loss: the loss, every trainable tensor's gradient and its value after.

    AdamW's first step moves each value by lr·g / (|g| + eps), which turns a gradient's float32 rounding
    into lr·Δg·eps / (|g| + eps)²: a gradient that is a sum of cancelling terms (~1e-6 from terms of ~1e-2,
    rounded at ~1e-9) or rounding noise itself (a router row no token moved, ~1e-11) moves by up to lr·1e-2
    with the default eps (1e-8). eps = 1e-6 bounds that by ~lr·1e-3.
    """
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=LR, eps=1e-6)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}
    optimizer.step()
    return loss.item(), grads, {n: p.detach().clone() for n, p in trainable.items()}


@contextmanager
def _saved_by_experts(model: nn.Module) -> Iterator[dict[int, int]]:
    """Bytes autograd saves for backward inside the experts modules' forwards, per storage, parameters excluded.

    For a forward that is not run backward: the saved tensors are held aside (not by the graph, where a node
    saving its own output would be a cycle) and measured when the context ends.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    held: list[torch.Tensor] = []
    inside = [False]

    def pack(t: torch.Tensor) -> None:
        if inside[0]:
            held.append(t)

    handles = []
    for module in family_of(model).experts_modules(model):
        handles.append(module.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)))
        handles.append(module.register_forward_hook(lambda *_: inside.__setitem__(0, False)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            yield seen
        seen.update((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in held)
        for ptr in params & seen.keys():
            del seen[ptr]
    finally:
        held.clear()
        for handle in handles:
            handle.remove()


# -- same numbers ---------------------------------------------------------------------------------------
def test_apply_lora_routes_every_fused_experts_module(tiny: TinyMoE, fused_family_name: str) -> None:
    # Execute
    routed = _adapted(tiny, fused_family_name, routed=True)
    reference = _adapted(tiny, fused_family_name, routed=False)
    # Assert
    assert [type(m) for m in family_of(routed).experts_modules(routed)] == [RoutedExpertLora] * tiny.layers
    assert not any(isinstance(m, RoutedExpertLora) for m in reference.modules())


def test_routed_step_gives_peft_loss_gradients_and_update(tiny: TinyMoE, fused_family_name: str) -> None:
    """Equality with peft's path (W + s·B·A folded per expert) to float32 rounding: loss, gradients, AdamW update.

    Every gradient is compared; the routed path never forms the folded tensor.
    """
    # Prepare
    reference = _adapted(tiny, fused_family_name, routed=False)
    routed = _adapted(tiny, fused_family_name, routed=True)
    # Execute
    loss_ref, grads_ref, after_ref = _step(reference)
    loss, grads, after = _step(routed)
    # Assert: the same tensors got gradients (experts' factors among them), with the same values
    assert abs(loss - loss_ref) <= 1e-6 * abs(loss_ref)
    assert grads.keys() == grads_ref.keys() and any("experts" in n and "lora_A" in n for n in grads)
    for name in grads_ref:
        # float32 rounding of a sum scales with its terms, not its result: an entry that cancels to ~0 carries
        # rounding at the scale of the tensor's largest entries (up to 6e-6 of them here, and CPUs differ);
        # a missing or misrouted term moves entries by that whole scale
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-4 * scale, msg=name)
        torch.testing.assert_close(after[name], after_ref[name], rtol=0, atol=1e-3 * LR, msg=name)


def test_routed_path_keeps_peft_names_layout_and_payload(tiny: TinyMoE, fused_family_name: str) -> None:
    # Prepare
    reference = _adapted(tiny, fused_family_name, routed=False)
    routed = _adapted(tiny, fused_family_name, routed=True)
    # Execute
    layout, layout_ref = build_layout(routed), build_layout(reference)
    # Assert: same parameter names and shapes, same payload layout (per-expert slices of peft's factors)
    names = [(n, p.shape) for n, p in routed.named_parameters()]
    assert names == [(n, p.shape) for n, p in reference.named_parameters()]
    assert layout == layout_ref and layout.select(role="expert")


def test_routed_path_saves_and_loads_peft_adapter_files(tiny: TinyMoE, tmp_path: Path) -> None:
    # Prepare
    routed = _adapted(tiny, "mixtral", routed=True)
    reference = _adapted(tiny, "mixtral", routed=False)
    # Execute: save both; load the routed one's files onto a fresh base, once on each path
    routed.save_pretrained(tmp_path / "routed")
    reference.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny.model("mixtral"), tmp_path / "routed")
    loaded_ref = PeftModel.from_pretrained(tiny.model("mixtral"), tmp_path / "routed")
    route_expert_lora(family_of(loaded).experts_modules(loaded))
    # Assert: the files peft's path writes, and the loaded adapters compute what was saved on either path
    saved = load_file(tmp_path / "routed/adapter_model.safetensors")
    saved_ref = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert saved.keys() == saved_ref.keys() and any("experts.base_layer.lora_A" in k for k in saved)
    for key in saved_ref:
        torch.testing.assert_close(saved[key], saved_ref[key], rtol=0, atol=0)
    with torch.no_grad():
        expected = routed.eval()(input_ids=IDS).logits
        torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, expected)
        torch.testing.assert_close(loaded_ref.eval()(input_ids=IDS).logits, expected)


@pytest.fixture(scope="module")
def prepared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _engine(family: str, cache: Path, *, routed: bool) -> tuple[TorchEngine, np.ndarray]:
    """The torch engine on the tests' tiny synthetic task for ``family``, and one client's rows."""
    cfg = load_config(None, [f"lora.routed_experts={str(routed).lower()}",
        "progress=false", f"model.family={family}", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=1", "model.intermediate_size=32", "model.num_experts=4", "model.top_k=2",
        "model.pretrain.steps=0", "model.pretrain.tokenizer_vocab=400", "lora.rank=2", "data.source=synthetic",
        "data.synthetic_docs_per_label=8", "data.num_clients=2", "data.partition=iid", "data.min_examples=2",
        "data.max_length=32", "train.batch_size=4", "train.lr=0.01", "train.local_epochs=2", "clients_per_round=2",
        f"cache_dir={cache}",
    ])
    run = prepare(cfg)
    spec = TorchEngineSpec(base_path=run.base_path, train_path=run.train_path, test_path=run.test_path,
                           label_token_ids=run.label_token_ids, lora=cfg.lora, train=cfg.train)
    return spec(), run.partitions[0]


def test_engine_trains_a_client_to_the_peft_path_update(fused_family_name: str, prepared_cache: Path) -> None:
    """A full client (several batches, two epochs, AdamW, routing statistics) through the torch engine."""
    # Prepare: one engine as runs build it (the routed path), a second one on peft's path
    engine, rows = _engine(fused_family_name, prepared_cache, routed=True)
    reference, _ = _engine(fused_family_name, prepared_cache, routed=False)
    assert not isinstance(family_of(reference.model).experts_modules(reference.model)[0], RoutedExpertLora)
    instructions = ClientInstructions(client_id=0, round_idx=1, seed=3)
    # Execute
    losses: list[float] = []
    losses_ref: list[float] = []
    update = engine.train(rows, engine.initial_payload, instructions, step_losses=losses)
    update_ref = reference.train(rows, reference.initial_payload, instructions, step_losses=losses_ref)
    # Assert: same per-step losses, update and routing statistics
    assert isinstance(family_of(engine.model).experts_modules(engine.model)[0], RoutedExpertLora)
    assert len(losses) >= 4
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
    np.testing.assert_allclose(update.delta, update_ref.delta, rtol=0, atol=1e-4)  # 1 % of one step (lr 0.01)
    assert np.abs(update.delta).max() > 1e-3
    for stats, stats_ref in zip(update.routing, update_ref.routing, strict=True):
        np.testing.assert_array_equal(stats.counts, stats_ref.counts)


# -- what falls back to peft's path -------------------------------------------------------------------------
def test_disabled_adapters_give_the_base_model_outputs(tiny: TinyMoE) -> None:
    # Prepare
    base = tiny.model("mixtral")
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
    routed = _adapted(tiny, "mixtral", routed=True)
    # Execute
    with torch.no_grad(), routed.disable_adapter():
        disabled = routed(input_ids=IDS).logits
    with torch.no_grad():
        adapted = routed(input_ids=IDS).logits
    # Assert
    torch.testing.assert_close(disabled, expected)
    assert (adapted - expected).abs().max() > 1e-3


def test_route_expert_lora_leaves_an_unexpected_experts_layout_on_peft_path(tiny: TinyMoE) -> None:
    # Prepare: experts that say their weights are stored [E, in, out]
    model = apply_lora(tiny.model("olmoe"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, routed_experts=False)
    experts = family_of(model).experts_modules(model)
    experts[0].get_base_layer().is_transposed = True
    # Execute
    with pytest.warns(UserWarning, match=r"OlmoeExperts stays on peft's path .*is_transposed=True"):
        switched = route_expert_lora(experts)
    # Assert
    assert switched == tiny.layers - 1
    assert type(experts[0]) is ParamWrapper and type(experts[1]) is RoutedExpertLora


def test_bf16_autocast_step_tracks_peft_path(tiny: TinyMoE) -> None:
    """bf16 (the GPU path): base in bf16, factors fp32, under autocast; the two paths round at different points."""
    # Prepare
    models = []
    for routed in (False, True):
        model = _adapted(tiny, "deepseek_v3", routed=routed)
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.bfloat16()
        models.append(model)
    # Execute
    results = []
    for model in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                           if "experts" in n and p.grad is not None])
        results.append((loss.item(), grads))
    (loss_ref, grads_ref), (loss, grads) = results
    # Assert
    assert grads.dtype == torch.float32 and abs(loss - loss_ref) < 0.02 * loss_ref
    assert torch.nn.functional.cosine_similarity(grads, grads_ref, dim=0) > 0.99


# -- memory -------------------------------------------------------------------------------------------------
def _experts_saved_bytes(tiny: TinyMoE, *, routed: bool, experts: int) -> int:
    model = _adapted(tiny, "mixtral", routed=routed, experts=experts)
    model.train()
    with _saved_by_experts(model) as seen:
        loss = model(input_ids=IDS, labels=IDS).loss
    del loss
    return sum(seen.values())


def test_routed_experts_save_the_same_bytes_whatever_the_number_of_experts(tiny: TinyMoE) -> None:
    """What the experts keep for backward follows the routed rows (tokens × k), not the number of experts.

    With 4 or 32 experts and the same tokens it is the same, where peft's path keeps W + s·B·A for every expert.
    """
    # Execute
    routed = [_experts_saved_bytes(tiny, routed=True, experts=e) for e in (4, 32)]
    folded = [_experts_saved_bytes(tiny, routed=False, experts=e) for e in (4, 32)]
    # Assert
    weights = tiny.layers * (32 - 4) * 3 * tiny.hidden * tiny.inter * 4  # fp32 bytes of 28 more experts' W
    assert routed[0] == routed[1] > 0
    assert folded[1] - folded[0] >= weights
