"""The ``torch`` engine: trains one virtual client at a time on a resident HF MoE model + peft LoRA.

A worker builds this engine once; per client it only overwrites the trainable
slots in place from the round's global payload, trains, and reads the slots
back as a flat delta. No model is rebuilt per client and no per-client copy is
kept. Every random choice is drawn from the client's own seed, so a client's
update does not depend on which worker ran it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F

from aggregation.client_terms import PayloadStart, TermInputs
from aggregation.compression import encode
from aggregation.errors import ClientFailure
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.payload import PayloadLayout
from aggregation.routing_stats import RoutingStats
from fedsim.config import CompressionConfig, FaultsConfig, LoraConfig, TrainConfig
from fedsim.data.choice import ChoiceBatch, ChoiceSplit
from fedsim.data.encoded import EncodedBatch, EncodedSplit
from fedsim.engine.option_scoring import (
    OptionScore,
    label_word_scores,
    option_loss,
    option_scores,
    token_log_likelihoods,
)
from fedsim.models import (
    RoutingRecorder,
    apply_lora,
    build_layout,
    family_of,
    load_pretrained,
    read_payload,
    write_payload,
)
from fedsim.models.registry import Quantization
from fedsim.quiet import quiet_libraries


@dataclass(frozen=True)
class TorchEngineSpec:
    """Picklable recipe for a worker's engine: paths, not tensors, so it is cheap to ship."""

    base_path: str
    train_path: str
    test_path: str
    label_token_ids: tuple[int, ...]
    lora: LoraConfig
    train: TrainConfig
    threads: int = 1
    lora_seed: int = 0
    device: str = "cpu"
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    quantization: Quantization = "none"
    task: Literal["label_word", "choice"] = "label_word"
    option_score: OptionScore = "sum"

    def __call__(self) -> TorchEngine:
        """The engine this recipe describes, built in the calling process (a worker)."""
        return TorchEngine(self)


@dataclass(frozen=True, slots=True)
class EvalChunk:
    """Summed evaluation of one fixed chunk of the test set (chunks are summed in order)."""

    loss_sum: float
    correct: int
    count: int


class TorchEngine:
    """One resident model; ``train`` runs one client, ``evaluate`` scores test chunks.

    In bf16 the frozen base is held in bf16 while the trainable slots (LoRA
    factors, routers) stay fp32, so optimiser steps and the payload keep full
    precision; forward passes run under autocast.
    """

    own_precision = False  # True: a subclass whose framework casts the model itself

    def __init__(self, spec: TorchEngineSpec) -> None:
        # One thread per CPU the worker holds: oversubscribed threads ran 17x slower here.
        torch.set_num_threads(max(1, spec.threads))
        quiet_libraries()
        self.spec = spec
        self.device = torch.device(spec.device)
        # A quantized base computes in bf16 around its int8/NF4 weights: it runs under autocast like a bf16 one.
        self._bf16 = (spec.precision == "bf16" or spec.quantization != "none") and not self.own_precision
        half = self._bf16 or spec.quantization != "none"
        base = load_pretrained(spec.base_path, dtype=torch.bfloat16 if half else None, quantization=spec.quantization,
                               device=spec.device)
        self.model = apply_lora(
            base,
            rank=spec.lora.rank,
            alpha=spec.lora.alpha,
            dropout=spec.lora.dropout,
            lora_attention=spec.lora.attention,
            lora_experts=spec.lora.experts,
            routed_experts=spec.lora.routed_experts,
            seed=spec.lora_seed,  # identical LoRA init on every worker
        )
        if half:
            for param in self.model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        self.layout: PayloadLayout = build_layout(self.model)
        self.initial_payload = read_payload(self.model, self.layout)
        self._place()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._param_weights = [1.0] * len(self.trainable)  # see TermInputs.param_weights
        split = ChoiceSplit if spec.task == "choice" else EncodedSplit
        self.train_split: EncodedSplit | ChoiceSplit = split.load(spec.train_path)
        self.test_split: EncodedSplit | ChoiceSplit = split.load(spec.test_path)
        self.label_token_ids = torch.tensor(spec.label_token_ids, dtype=torch.long, device=self.device)
        # the HF model under peft's wrapper; its submodules (model, lm_head, encoder) depend on the family
        self._body = cast(Any, self.model.get_base_model())
        self._seq2seq = bool(getattr(self._body.config, "is_encoder_decoder", False))
        pad = self._body.config.pad_token_id
        self._pad_id = 0 if pad is None else int(pad)  # fills masked positions only: any valid id does
        self.top_k = family_of(self.model).top_k(self.model.config)
        if spec.train.gradient_checkpointing:  # non-reentrant: gradients reach the LoRA factors without input grads
            self._body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- forward ---------------------------------------------------------------------------------
    def _examples(
        self, batch: EncodedBatch | ChoiceBatch, recorder: RoutingRecorder | None = None, counted: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss of a batch of examples, each example's candidate scores [B, C] (label words or options), labels [B]."""
        if isinstance(batch, ChoiceBatch):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
                scores, summed, label = self._option_scores(batch, recorder, counted)
            lengths = torch.from_numpy(batch.option_len).to(self.device)
            return option_loss(scores, summed, lengths, label, self.spec.train.loss, reduction), scores, label
        ids, mask, pos, tok, label = self._tensors(batch)
        logits = self._label_logits(ids, mask, pos, recorder, counted)
        return self._loss(logits, tok, label, reduction), label_word_scores(logits, self.label_token_ids), label

    def _option_scores(
        self, batch: ChoiceBatch, recorder: RoutingRecorder | None, counted: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each option's score and summed log-likelihood [B, N], and the labels [B].

        A causal LM reads every (context, option) row once and applies the
        output layer only where an option token is predicted. An
        encoder-decoder encodes each context once, shares it among the
        example's N options, and decodes every option with teacher forcing.
        """
        config, n, to = self._body.config, batch.num_options, self.device
        if self._seq2seq:
            packed = batch.pack_encoder_decoder(config.decoder_start_token_id, self._pad_id)
            enc_ids, enc_mask, dec_ids, targets = (torch.from_numpy(a).to(to) for a in packed)
            real = targets != -100
            if recorder is not None:
                recorder.set_mask(enc_mask * counted, real * counted)
            encoded = self._body.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask)
            encoded.last_hidden_state = encoded.last_hidden_state.repeat_interleave(n, dim=0)  # one per option
            out = self._body(encoder_outputs=encoded, attention_mask=enc_mask.repeat_interleave(n, dim=0),
                             decoder_input_ids=dec_ids, use_cache=False)
            rows, cols = real.nonzero(as_tuple=True)
            logits, tokens = out.logits[rows, cols], targets[rows, cols]
        else:
            ids, mask, target = (torch.from_numpy(a).to(to) for a in batch.pack_decoder_only(self._pad_id))
            if recorder is not None:
                # a context's positions see only the context, so its N rows route it alike: count it in the first
                first = (torch.arange(ids.shape[0], device=to) % n == 0)[:, None]
                recorder.set_mask(mask * (first | target.bool()) * counted)
            hidden = self._body.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            rows, cols = target.nonzero(as_tuple=True)
            logits, tokens = self._body.lm_head(hidden[rows, cols - 1]), ids[rows, cols]  # token t follows position t-1
        ll = token_log_likelihoods(logits, tokens)
        scores, summed = option_scores(ll, rows, len(batch) * n, n, self.spec.option_score)
        return scores, summed, torch.from_numpy(batch.label).to(to)

    def _label_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_pos: torch.Tensor,
        recorder: RoutingRecorder | None = None, counted: bool = True,
    ) -> torch.Tensor:
        """Vocabulary logits for each example's label word [B, V], with the recorder's masks set for the pass.

        A causal LM reads them at the label position (lm_head on B rows only).
        An encoder-decoder (text-to-text) encodes the prompt alone and reads
        them at the decoder's first step, from its start token. ``counted``
        False: the pass's tokens add nothing to the routing statistics.
        """
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            return self._forward_label(input_ids, attention_mask, label_pos, recorder, counted).float()

    def _forward_label(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_pos: torch.Tensor,
        recorder: RoutingRecorder | None, counted: bool,
    ) -> torch.Tensor:
        if self._seq2seq:
            config = self._body.config
            prompt = attention_mask * (torch.arange(input_ids.shape[1], device=input_ids.device) <= label_pos[:, None])
            start = torch.full(
                (input_ids.shape[0], 1), config.decoder_start_token_id, dtype=input_ids.dtype, device=input_ids.device
            )
            if recorder is not None:
                recorder.set_mask(prompt if counted else torch.zeros_like(prompt), torch.full_like(start, int(counted)))
            out = self._body(input_ids=input_ids.masked_fill(prompt == 0, self._pad_id), attention_mask=prompt,
                             decoder_input_ids=start, use_cache=False)
            return cast(torch.Tensor, out.logits[:, 0])
        if recorder is not None:
            recorder.set_mask(attention_mask if counted else torch.zeros_like(attention_mask))
        hidden = self._body.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return cast(torch.Tensor, self._body.lm_head(hidden[rows, label_pos]))

    def _loss(
        self, logits: torch.Tensor, tok: torch.Tensor, label: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Cross-entropy of the label word: over the label words only, or over the whole vocabulary."""
        if self.spec.train.loss == "label_words":
            return F.cross_entropy(label_word_scores(logits, self.label_token_ids), label, reduction=reduction)
        return F.cross_entropy(logits, tok, reduction=reduction)

    def _tensors(self, batch: EncodedBatch) -> tuple[torch.Tensor, ...]:
        batch = batch.trimmed()
        to = self.device
        return tuple(
            torch.from_numpy(a).to(to)
            for a in (batch.input_ids, batch.attention_mask, batch.label_pos, batch.label_token, batch.label)
        )

    # -- client training -------------------------------------------------------------------------
    def train(
        self, indices: np.ndarray, payload: np.ndarray, instructions: ClientInstructions, *,
        step_losses: list[float] | None = None,
    ) -> ClientUpdate | None:
        """Train client ``instructions.client_id`` on its rows ``indices`` starting from ``payload``.

        ``step_losses``, when given, receives the mean task loss of each step (for equivalence checks of engines
        and model paths, which compare losses step by step).
        """
        cid, rnd = instructions.client_id, instructions.round_idx
        start = time.perf_counter()
        faults = self.spec.faults
        faulty_round = not faults.fail_rounds or rnd in faults.fail_rounds
        if cid in faults.fail_clients and faulty_round:
            raise ClientFailure(cid, rnd, "injected fault (faults.fail_clients)")
        if len(indices) == 0:
            raise ClientFailure(cid, rnd, "client has no training examples")

        if instructions.start is not None:  # e.g. a personalised client's own experts
            payload = self._started(payload, instructions.start, cid, rnd)
        self._load(payload)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        cfg = self.spec.train
        gen = torch.Generator().manual_seed(instructions.seed)
        torch.manual_seed(instructions.seed)  # dropout
        step = self._optimizer()
        terms = [t.bind(self.device) for t in instructions.terms]
        reads_routing = any(t.reads_routing for t in instructions.terms)
        start_values = [p.detach().clone() for p in self.trainable] if any(t.reads_start for t in instructions.terms) \
            else []

        self.model.train()
        loss_sum, seen, steps = 0.0, 0, 0
        n = len(indices)
        data = self.train_split.take(indices)  # this client's rows only, read once
        during = cfg.routing_stats == "during"
        hooks = (
            RoutingRecorder(self.model, keep_probs=reads_routing, collect_stats=during)
            if during or reads_routing else None
        )
        with hooks if hooks is not None else contextlib.nullcontext() as recorder, self._profiled() as profile:
            for _ in range(cfg.local_epochs):
                order = torch.randperm(n, generator=gen).numpy()
                for lo in range(0, n, cfg.batch_size):
                    if cfg.local_steps is not None and steps >= cfg.local_steps:
                        break
                    rows, share = self._my_rows(order[lo : lo + cfg.batch_size])
                    batch = data.rows(rows)
                    loss, _, _ = self._examples(batch, recorder)
                    total = loss * share
                    if terms:  # the strategy's client side (aggregation.client_terms)
                        inputs = TermInputs(
                            params=self.trainable, start=start_values, param_weights=self._param_weights,
                            probs=recorder.probs if recorder is not None and reads_routing else [],
                            masks=recorder.masks if recorder is not None and reads_routing else [],
                            top_k=self.top_k,
                        )
                        for term in terms:
                            total = total + term(inputs)
                    step(total)
                    batch_loss, batch_seen = self._sum(
                        [loss.item() * len(batch) * (share > 0), len(batch) * (share > 0)]
                    )
                    if not np.isfinite(batch_loss):
                        raise ClientFailure(cid, rnd, f"training loss became {batch_loss / batch_seen} at step {steps}")
                    loss_sum += batch_loss
                    if step_losses is not None:
                        step_losses.append(batch_loss / batch_seen)
                    seen += int(batch_seen)
                    steps += 1
            # during: hooks record the statistics, so the recorder is not None
            routing = self._sum_stats(cast(RoutingRecorder, recorder).stats()) if during else ()
        stats_seconds = 0.0
        if cfg.routing_stats == "after":
            t_stats = time.perf_counter()
            routing = self._routing_stats(data)
            stats_seconds = time.perf_counter() - t_stats

        delta = self._read()
        if delta is None:  # a group member: the group's first rank returns the update
            return None
        np.subtract(delta, payload, out=delta)
        if cid in faults.nan_clients and faulty_round:
            delta[:1] = np.nan  # injected fault (faults.nan_clients): one NaN poisons a plain average
        up = self.layout.class_bytes()
        down = dict(up)
        metrics = {"train_loss": (loss_sum, float(seen)), "stats_seconds": (stats_seconds, 1.0),
                   **self._profile_metrics(profile)}
        if on_gpu:  # the client's peak, then the allocator's cache goes back so the next client starts clean
            metrics["gpu_peak_mib"] = (torch.cuda.max_memory_allocated(self.device) / 2**20, 1.0)
            torch.cuda.empty_cache()
        delta, residual = self._uplink(delta, instructions, n, up, metrics)
        if instructions.start is not None:  # what it started from was its own, not sent down
            spans = self.layout.class_spans()
            down = {k: 0 if instructions.start.covers(spans[k]) else v for k, v in down.items()}
        up["routing_stats"] = sum(s.nbytes for s in routing)
        return ClientUpdate(
            client_id=cid,
            round_idx=rnd,
            n_examples=n,
            delta=delta,
            routing=routing,
            metrics=metrics,
            compute_seconds=time.perf_counter() - start,
            bytes_down=down,
            bytes_up=up,
            residual=residual,
        )

    def _started(self, payload: np.ndarray, start: PayloadStart, cid: int, rnd: int) -> np.ndarray:
        """A copy of ``payload`` with client ``cid``'s start written over its range."""
        if start.stop > self.layout.total:
            raise ClientFailure(cid, rnd, f"the start reaches payload index {start.stop}, the layout has "
                                          f"{self.layout.total}")
        payload = payload.copy()
        payload[start.offset : start.stop] = start.values
        return payload

    def _uplink(
        self, delta: np.ndarray, instructions: ClientInstructions, n: int, up: dict[str, int],
        metrics: dict[str, tuple[float, float]],
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The delta as the server receives it, and the new error-feedback residual (None: none kept).

        With ``compression.uplink`` set, the delta is encoded and decoded (what the server would decode), the
        encoded bytes replace ``up``'s and the relative error, weighted by the client's ``n`` examples, joins
        ``metrics``.
        """
        comp = self.spec.compression
        if comp.uplink == "none":
            return delta, None
        carried = None
        if comp.error_feedback:
            carried = instructions.residual if instructions.residual is not None else np.zeros_like(delta)
        encoded, residual = encode(delta, self.layout.class_spans(), comp.uplink, fraction=comp.topk_fraction,
                                   residual=carried)
        up.update(encoded.nbytes)
        metrics["compression_error"] = (encoded.relative_error * n, float(n))
        return encoded.values, residual

    @torch.no_grad()
    def _routing_stats(self, data: EncodedBatch | ChoiceBatch) -> tuple[RoutingStats, ...]:
        """Spec: one no-grad pass over the client's training data after local training."""
        self.model.eval()
        bs = self.spec.train.batch_size * 2
        with RoutingRecorder(self.model) as recorder:
            for lo in range(0, len(data), bs):
                rows, share = self._my_rows(np.arange(lo, min(lo + bs, len(data))))
                self._examples(data.rows(rows), recorder, counted=share > 0)  # a stand-in row counts nothing
            return self._sum_stats(recorder.stats())

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, payload: np.ndarray, chunks: list[tuple[int, int]]) -> list[EvalChunk]:
        """Loss and accuracy on test rows [lo, hi) of each chunk; accuracy by argmax over the label words or options."""
        self._load(payload)
        self.model.eval()
        out = []
        for lo, hi in chunks:
            rows, share = self._my_rows(np.arange(lo, hi))
            summed, scores, label = self._examples(self.test_split.take(rows), reduction="sum")
            loss, pred = summed.item(), scores.argmax(dim=-1)
            loss, correct = self._sum([loss * (share > 0), float((pred == label).sum().item()) * (share > 0)])
            out.append(EvalChunk(loss, int(correct), hi - lo))
        return out

    # -- what a worker group (fedsim.engine.deepspeed_engine) does differently -----------------------
    def _place(self) -> None:
        """Move the adapted model to its device (the layout and initial payload are read before).

        A quantized base was placed as it loaded.
        """
        if self.spec.quantization == "none":
            self.model.to(self.device)

    def _load(self, payload: np.ndarray) -> None:
        """Write the payload into the model's trainable slots."""
        write_payload(self.model, self.layout, payload)

    def _read(self) -> np.ndarray | None:
        """The trainable slots as a payload buffer (None on a group member that does not report)."""
        return read_payload(self.model, self.layout)

    def _optimizer(self) -> Callable[[torch.Tensor], None]:
        """A fresh optimiser for one client; the returned step takes the loss and updates the slots."""
        cfg = self.spec.train
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

        def step(total: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            total.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
            optimizer.step()

        return step

    def _profiled(self) -> contextlib.AbstractContextManager[Any]:
        """A context around the training steps whose result ``_profile_metrics`` reads (nothing here)."""
        return contextlib.nullcontext()

    def _profile_metrics(self, profile: Any) -> dict[str, tuple[float, float]]:
        return {}

    def _my_rows(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """The rows of a batch this process computes, and the factor that makes its mean loss a share of the batch's."""
        return rows, 1.0

    def _sum(self, values: list[float]) -> list[float]:
        """Sums over the processes that share a client (one here)."""
        return values

    def _sum_stats(self, stats: tuple[RoutingStats, ...]) -> tuple[RoutingStats, ...]:
        return stats
