"""Pretraining the demo's base: the loss must fall, and the saved base must load back as the trained model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from fedsim.models.pretrain import pretrain_lm

if TYPE_CHECKING:
    from tests.fedsim.models.conftest import TinyMoE

LOADERS = {"mixtral": AutoModelForCausalLM, "switch_transformers": AutoModelForSeq2SeqLM}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A model this small trains fastest on one thread; more spin against each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blocks(vocab: int, *, n: int = 64, length: int = 16) -> np.ndarray:
    """Token blocks [n, length] of a learnable language: each block counts up by one from a seeded start."""
    starts = np.random.default_rng(0).integers(0, vocab, size=(n, 1))
    return (starts + np.arange(length)) % vocab


def _loss(model: PreTrainedModel, blocks: np.ndarray) -> float:
    """The pretraining objective on every block at once (causal LM, or Switch's prefix-LM), without gradients."""
    data = torch.from_numpy(blocks.astype(np.int64))
    half = blocks.shape[1] // 2
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return float(model(input_ids=data[:, :half], labels=data[:, half:].contiguous(), use_cache=False).loss)
        return float(model(input_ids=data, labels=data, use_cache=False).loss)


@pytest.mark.parametrize("family", sorted(LOADERS))
def test_pretraining_lowers_the_loss_and_saves_a_base_that_from_pretrained_loads(
    tiny: TinyMoE, tmp_path: Path, family: str
) -> None:
    """The demo's base is pretrained once and loaded by every worker through ``from_pretrained``.

    A step that does not learn, or a save that loses a weight, would leave LoRA fine-tuning a different model.
    """
    # Prepare
    model = tiny.model(family)
    blocks = _blocks(tiny.vocab)
    before = _loss(model, blocks)

    # Execute
    losses = pretrain_lm(model, blocks, steps=40, batch_size=8, lr=1e-2, warmup_steps=4, seed=0, show_progress=False)
    model.save_pretrained(tmp_path / "base")
    loaded = LOADERS[family].from_pretrained(tmp_path / "base")

    # Assert: the loss fell, the model is left in eval mode, and the loaded base computes the same logits
    after = _loss(model, blocks)
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert after < 0.7 * before, (before, after)
    assert not model.training and not loaded.training
    ids = torch.from_numpy(blocks[:4].astype(np.int64))
    decoder = {"decoder_input_ids": ids[:, :4]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, **decoder).logits, loaded(input_ids=ids, **decoder).logits)


def test_pretraining_the_same_seed_twice_gives_the_same_losses(tiny: TinyMoE) -> None:
    """The base is cached by a hash of its settings: rebuilding it must give the same model, not another draw."""
    # Prepare
    blocks = _blocks(tiny.vocab)

    # Execute
    first, second = (pretrain_lm(tiny.model("mixtral"), blocks, steps=10, batch_size=8, lr=1e-2, warmup_steps=2, seed=3,
                                 show_progress=False) for _ in range(2))

    # Assert
    assert first == second


def test_pretraining_an_empty_corpus_is_refused(tiny: TinyMoE) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="no token blocks"):
        pretrain_lm(tiny.model("mixtral"), np.zeros((0, 16), dtype=np.int64), steps=1, batch_size=1, lr=1e-3,
                    warmup_steps=0, seed=0, show_progress=False)
