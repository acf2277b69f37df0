"""Language-model pretraining of a tiny base model, so that LoRA fine-tunes a model that knows the text.

No weights can be downloaded here, and LoRA on a random frozen model is not
what users do: the demo pretrains its base once (full parameters) and caches
it with ``save_pretrained``, to be loaded back through ``from_pretrained``. A
causal LM learns next tokens over whole blocks; an encoder-decoder learns to
continue the first half of a block, encoded, with its second half (a
prefix-LM objective, the shape of its text-to-text fine-tuning).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import PreTrainedModel

log = logging.getLogger("fedsim")


def pretrain_lm(
    model: PreTrainedModel,
    blocks: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    show_progress: bool = True,
) -> list[float]:
    """Train ``model`` on random batches of token ``blocks`` [n, block]; return the loss per step.

    AdamW with linear warm-up and cosine decay; batches drawn with a seeded generator.
    """
    if len(blocks) == 0:
        raise ValueError("pretraining corpus produced no token blocks")
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = torch.from_numpy(blocks.astype(np.int64))
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    half = blocks.shape[1] // 2
    losses: list[float] = []
    columns = (
        TextColumn("pretrain base"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress, transient=False) as bar:
        task = bar.add_task("pretrain", total=steps, loss=float("nan"))
        for step in range(steps):
            batch = data[gen.integers(0, len(data), size=batch_size)]
            if seq2seq:
                loss = model(input_ids=batch[:, :half], labels=batch[:, half:].contiguous(), use_cache=False).loss
            else:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, loss=float(np.mean(losses[-20:])))
            if (step + 1) % max(steps // 10, 1) == 0:
                log.info("pretrain step %d/%d loss %.3f", step + 1, steps, float(np.mean(losses[-50:])))
    model.eval()  # type: ignore[no-untyped-call]  # transformers leaves PreTrainedModel.eval unannotated
    return losses
