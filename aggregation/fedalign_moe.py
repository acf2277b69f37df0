"""FedAlign-MoE (arXiv 2603.21276): routing and semantic alignment of MoE experts, server side.

Spec: ../shared/spec/fedalign_moe.md. Module 1 (``routing_alignment``) weighs
each client's router rows and routing distribution by its consistency with the
global routing distribution; Module 2 (``semantic_alignment``) merges each
expert only over clients whose signatures and update directions agree.
Everything else in the payload is FedAvg'd by n_i.

Client-side duty (runs in the engine, fed by ``configure``): from round 2 on
the client minimises L_task + λ·L_reg with λ = ``reg_lambda`` and
L_reg = mean over tokens x and MoE layers of
Σ_{e∈K(x)} α_i(e)·p_e(x)·log(p_e(x)/p_g^{t−1}(e)).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Literal, overload

import numpy as np
from pydantic import Field, model_validator

from aggregation import function_space as fs
from aggregation import routing_alignment as ra
from aggregation import semantic_alignment as sa
from aggregation.client_terms import RoutingRegulariserTerm
from aggregation.errors import LayoutMismatch
from aggregation.messages import ClientInstructions
from aggregation.options import Options
from aggregation.payload import PAYLOAD_DTYPE, PayloadLayout, Role
from aggregation.personal import PersonalExperts
from aggregation.routing_alignment import ScoreMode
from aggregation.routing_regulariser import RegForm
from aggregation.routing_stats import RoutingStats, total_variation
from aggregation.strategy import RoundResult, Strategy, UpdateReader
from aggregation.weighting import accumulate


class FedAlignOptions(Options):
    """Options of FedAlign-MoE; the defaults are the spec's full method.

    Attributes
    ----------
    reg_lambda : float
        λ of the client's routing regulariser, sent from the first round that has a p_g target.
    gating : {"consistency", "uniform", "off"}
        Module 1. "consistency": ω from the scores (eq. 3); "uniform": ω_i(e) = n_i/Σn
        (the ladder's "alignment with uniform weights"); "off": no regulariser, no p_g,
        routers FedAvg'd.
    score_mode : {"om", "o", "m", "uniform"}
        Score of eq. 2: o·m, or an ablation.
    adaptive_alpha : bool
        Send α from eq. 6; False sends α = 1.
    router_merge : {"omega", "fedavg"}
        Router rows by ω (eq. 5) or by n_i.
    semantic : bool
        Module 2; False merges experts by n_i like shared entries.
    beta : float
        β of the threshold τ = M − β·Σ (eq. 9).
    gate : {"hard", "soft"}
        γ's gate (eq. 10): indicator or sigmoid((σ − τ)/T).
    soft_temperature : float
        T of the soft gate.
    expert_agg : {"global", "personalized"}
        "personalized": besides the global merge, each client keeps its own view of
        every expert, Σ_j γ_ij(e)·θ_j(e) / Σ_j γ_ij(e), and trains from it when sampled
        again (needs ``semantic``, whose γ it uses).
    reg_form : {"token", "batch"}
        The regulariser's form: the spec's per-token top-k sum, or a batch-level KL
        (``aggregation.routing_regulariser``).
    sigma_tol : float
        Slack of the hard gate's σ ≥ τ comparison.
    direction_consensus : bool
        Eq. 10's max(D, 0) factor. Off by default: on the demo task D is near zero and
        negative for a third of the pairs, and every γ that kept it lost 5.5–6.6 points
        to FedAvg at α = 0.1 where the σ gate alone lost 0.9 (the held-out test of
        docs/paper.md chose it). True restores the spec's γ = 1[σ ≥ τ]·max(D, 0).
    consensus_space : {"factors", "function"}
        What D (eq. 8) compares for a LoRA expert: the deltas of its factors (ΔA, ΔB) as
        they stand, or the change of its effective weights ΔW = (B + ΔB)(A + ΔA) − BA
        (``aggregation.function_space``; invariant to the LoRA reparametrisation A → GA,
        B → BG⁻¹). The same for experts trained in full.
    """

    reg_lambda: float = Field(0.1, ge=0, description="λ of the client routing regulariser")
    gating: Literal["consistency", "uniform", "off"] = "consistency"
    score_mode: ScoreMode = "om"
    adaptive_alpha: bool = True
    router_merge: Literal["omega", "fedavg"] = "omega"
    semantic: bool = True
    beta: float = Field(1.0, description="τ = M − β·Σ")
    gate: Literal["hard", "soft"] = "hard"
    soft_temperature: float = Field(0.05, gt=0)
    expert_agg: Literal["global", "personalized"] = Field(
        "global", description="personalized: each client also keeps its γ-weighted view of every expert"
    )
    sigma_tol: float = Field(1e-9, ge=0, description="slack of the hard gate's σ ≥ τ")
    direction_consensus: bool = Field(
        False, description="eq. 10's max(D, 0) factor in γ (the spec's); false, the default: the σ gate alone"
    )
    consensus_space: Literal["factors", "function"] = Field(
        "factors", description="D on the LoRA factor deltas, or on the change of the expert's effective weights"
    )
    reg_form: RegForm = Field("token", description="the regulariser per token over K(x) (spec), or batch-level KL")

    @model_validator(mode="after")
    def _options_that_need_another(self) -> FedAlignOptions:
        if self.expert_agg == "personalized" and not self.semantic:
            raise ValueError("expert_agg='personalized' needs semantic=true (the views are weighted by γ)")
        if self.consensus_space == "function" and not self.direction_consensus:
            raise ValueError("consensus_space='function' measures D, which γ leaves out: set direction_consensus=true")
        return self


class _StackedByLayer(Sequence[RoutingStats]):
    """The cohort's routing statistics of layer ℓ stacked on a client axis, stacked when asked, one layer kept.

    Both modules walk the layers in order, so holding the last layer's stack
    bounds the copy at one layer's (μ alone is N·E·d float64: 105 MB at
    OLMoE-1B-7B's widths and 100 clients, 1.7 GB for all 16 layers).
    """

    def __init__(self, per_client: list[tuple[RoutingStats, ...]]) -> None:
        self._per_client = per_client
        self._last: tuple[int, RoutingStats] | None = None

    def __len__(self) -> int:
        return len(self._per_client[0]) if self._per_client else 0

    @overload
    def __getitem__(self, layer: int) -> RoutingStats: ...
    @overload
    def __getitem__(self, layer: slice) -> Sequence[RoutingStats]: ...
    def __getitem__(self, layer: int | slice) -> RoutingStats | Sequence[RoutingStats]:
        if isinstance(layer, slice):
            return [self[i] for i in range(len(self))[layer]]
        if self._last is None or self._last[0] != layer:
            self._last = (layer, RoutingStats.stack([stats[layer] for stats in self._per_client]))
        return self._last[1]


def _spans(layout: PayloadLayout, role: Role) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering the entries of ``role``, merged where adjacent."""
    spans: list[tuple[int, int]] = []
    for e in layout.select(role=role):
        if spans and spans[-1][1] == e.offset:
            spans[-1] = (spans[-1][0], e.offset + e.size)
        else:
            spans.append((e.offset, e.offset + e.size))
    return spans


class FedAlignMoE(Strategy):
    """FedAlign-MoE's server: Module 1 on routers, Module 2 on experts, FedAvg elsewhere.

    State across rounds: p_g [L, E] (uniform until a round sets it), α_i [L, E]
    per client id, and whether a p_g target exists yet (λ is sent only then).
    """

    name = "fedalign_moe"
    options_type = FedAlignOptions
    keeps_readers = True  # Module 2 compares every pair of clients, expert by expert, once the cohort is in
    options: FedAlignOptions

    def __init__(self, layout: PayloadLayout, options: FedAlignOptions | None = None) -> None:
        super().__init__(layout, options)
        layers = sorted(set(layout.router_layers()) | {k[0] for k in layout.expert_keys()})
        if not layers or layers != list(range(len(layers))):
            raise LayoutMismatch(f"FedAlign-MoE needs MoE layers numbered 0..L-1, layout has {layers}")
        # E: the rows of the routers [E, ...]; without routers, the highest expert index + 1.
        routers, keys = layout.select(role="router"), layout.expert_keys()
        sizes = {e.shape[0] if e.shape else 0 for e in routers} if routers else {max(k[1] for k in keys) + 1}
        if len(sizes) > 1 or min(sizes) < 1:
            raise LayoutMismatch(f"routers must be [E, ...] with one E > 0 for every MoE layer, layout has {sizes}")
        num_experts = sizes.pop()
        if any(k[1] >= num_experts for k in keys):
            raise LayoutMismatch(f"expert indices {keys} do not fit routers of {num_experts} rows")
        self.num_layers, self.num_experts = len(layers), num_experts
        self._shared = _spans(layout, "shared")
        self._p_g = ra.uniform_routing(self.num_layers, self.num_experts)
        self._alpha: dict[int, np.ndarray] = {}
        self._has_target = False
        self.personal = PersonalExperts(layout) if self.options.expert_agg == "personalized" else None
        # each expert's slice read as LoRA pairs, for D in function space
        self._factors = {
            key: fs.expert_factors(list(entries))
            for key, entries in itertools.groupby(layout.select(role="expert"), key=lambda e: (e.layer, e.expert))
        } if self.options.consensus_space == "function" else {}

    # -- instructions ---------------------------------------------------------------------------

    @classmethod
    def reads_routing_stats(cls, options: Options) -> bool:
        """Unless both modules are off: Module 1 scores and Module 2 signatures come from them."""
        assert isinstance(options, FedAlignOptions)
        return options.gating != "off" or options.semantic

    def configure(self, client_id: int, round_idx: int, *, seed: int) -> ClientInstructions:
        """The routing regulariser toward p_g^{t−1} with the client's α; its own experts under ``personalized``.

        α is 1 for a client never seen (and for all with ``adaptive_alpha`` off); the
        regulariser is sent once a p_g target exists and λ > 0, never with
        ``gating = "off"``; a client starts from its own experts once it has some.
        """
        start = self.personal.start_for(client_id) if self.personal is not None else None
        o = self.options
        if o.gating == "off" or not self._has_target or o.reg_lambda == 0:
            return ClientInstructions(client_id=client_id, round_idx=round_idx, seed=seed, start=start)
        alpha = self._alpha.get(client_id) if o.adaptive_alpha else None
        term = RoutingRegulariserTerm(
            o.reg_lambda, self._p_g.copy(), np.ones_like(self._p_g) if alpha is None else alpha.copy(), o.reg_form
        )
        return ClientInstructions(client_id=client_id, round_idx=round_idx, seed=seed, terms=(term,), start=start)

    # -- streaming aggregation ------------------------------------------------------------------

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start the round with no reader kept and zero float64 sums of the shared entries."""
        super().begin(global_payload, round_idx=round_idx)
        self._readers: list[UpdateReader] = []
        self._ids: list[int] = []
        self._n: list[float] = []
        self._shared_sum = [np.zeros(b - a, dtype=np.float64) for a, b in self._shared]

    def add(self, reader: UpdateReader) -> None:
        """Validate, keep the cheap stats and the reader, FedAvg the shared entries at once."""
        u = self._checked(reader)
        if u.client_id in self._ids:
            raise ValueError(f"client {u.client_id}: update added twice in one round")
        where = f"client {u.client_id} round {u.round_idx}"
        if len(u.routing) != self.num_layers:
            raise LayoutMismatch(f"{where}: routing has {len(u.routing)} layers, layout has {self.num_layers}")
        for layer, st in enumerate(u.routing):
            if st.num_experts != self.num_experts:
                raise LayoutMismatch(
                    f"{where}: routing layer {layer} has {st.num_experts} experts, layout has {self.num_experts}"
                )
            first = self._readers[0].update.routing[layer] if self._readers else st
            if st.x_sum.shape != first.x_sum.shape:
                raise LayoutMismatch(
                    f"{where}: routing layer {layer} x_sum has shape {st.x_sum.shape}, cohort has {first.x_sum.shape}"
                )
        for (a, b), acc in zip(self._shared, self._shared_sum, strict=True):
            accumulate(acc, reader.read(a, b), u.n_examples)
        self._readers.append(reader)
        self._ids.append(u.client_id)
        self._n.append(float(u.n_examples))

    def finish(self) -> RoundResult:
        """Module 1 on routers, Module 2 one expert slice at a time, FedAvg on shared entries.

        ``client_weights`` is each client's π_i(e) averaged over the experts that
        were merged (its n-share when none was); ``report`` holds n_aggregated,
        the mean entropy of ω and the total-variation shift of p_g (Module 1), and
        the fraction of counted pairs excluded by the σ gate, of experts that
        kept their value, and D's mean and share below 0 over every pair i < j of
        every expert (Module 2). The round's readers are released: a second
        ``finish`` needs a new ``begin``.
        """
        if self._global is None:
            raise RuntimeError("finish() called before begin(); call begin(global_payload, round_idx=...) first")
        base, new = self._global, self._global.copy()
        n = np.asarray(self._n)
        report: dict[str, float] = {"n_aggregated": float(len(n))}
        weights = np.zeros(0)
        if len(n):
            for (a, b), acc in zip(self._shared, self._shared_sum, strict=True):
                new[a:b] = (base[a:b].astype(np.float64) + acc / n.sum()).astype(PAYLOAD_DTYPE)
            # every client's statistics of a layer on a leading client axis, one layer stacked at a time
            cohort = _StackedByLayer([r.update.routing for r in self._readers])
            report.update(self._routing_pass(new, n, cohort))
            pi_sum, merged, expert_report = self._expert_pass(new, n, cohort)
            report.update(expert_report)
            weights = pi_sum / merged if merged else n / n.sum()
        client_weights = {cid: float(w) for cid, w in zip(self._ids, weights, strict=True)}
        self._global, self._readers, self._shared_sum = None, [], []  # release the object-store views
        return RoundResult(new, report, client_weights)

    def _routing_pass(self, new: np.ndarray, n: np.ndarray, cohort: Sequence[RoutingStats]) -> dict[str, float]:
        """Module 1, eqs. 1–6: ω, p_g, router rows and α, layer by layer; writes routers into ``new``."""
        opts = self.options
        p_g_new = self._p_g.copy()
        alpha = np.ones((len(n), self.num_layers, self.num_experts))
        entropies: list[float] = []
        for layer in range(self.num_layers):
            p_bar = cohort[layer].p_bar
            o = ra.overlap(p_bar, self._p_g[layer])
            s = ra.consistency_scores(o, cohort[layer].margin, opts.score_mode)
            if opts.gating == "consistency":
                omega = ra.consistency_weights(s, n)
            else:
                omega = ra.example_weights(n, self.num_experts)
            if opts.gating != "off":
                p_g_new[layer] = ra.global_routing(omega, p_bar, previous=self._p_g[layer])
                entropies.append(ra.weight_entropy(omega))
                if opts.adaptive_alpha:
                    alpha[:, layer] = ra.adaptive_alpha(s)
            if layer in self.layout.router_layers():
                rows = omega if opts.router_merge == "omega" else ra.example_weights(n, self.num_experts)
                self._merge_router(new, layer, rows)
        if opts.gating == "off":
            return {}
        report = {
            "omega_entropy": float(np.mean(entropies)) if entropies else 0.0,
            "p_g_shift_tv": float(np.mean([total_variation(p, q) for p, q in zip(p_g_new, self._p_g, strict=True)])),
        }
        self._p_g = p_g_new
        self._has_target = True
        if opts.adaptive_alpha:
            for i, cid in enumerate(self._ids):
                self._alpha[cid] = alpha[i]
        return report

    def _merge_router(self, new: np.ndarray, layer: int, weights: np.ndarray) -> None:
        """Eq. 5 on every router entry of ``layer``: row e of an [E, ...] entry is expert e's."""
        for entry in self.layout.select(role="router", layer=layer):  # every one is [E, ...] (checked at init)
            lo, hi = entry.offset, entry.offset + entry.size
            rows = np.concatenate([r.read(lo, hi) for r in self._readers]).reshape(
                len(self._readers), self.num_experts, -1
            )
            merged = ra.merge_router_rows(new[lo:hi].reshape(self.num_experts, -1), rows, weights)
            new[lo:hi] = merged.reshape(-1).astype(PAYLOAD_DTYPE)

    def _expert_pass(
        self, new: np.ndarray, n: np.ndarray, cohort: Sequence[RoutingStats]
    ) -> tuple[np.ndarray, int, dict[str, float]]:
        """Module 2, eqs. 7–12, one (layer, expert) slice × cohort in memory at a time.

        The terms that read no update (σ, τ, the σ gate, the excluded-pair count)
        come first for a batch of one layer's experts (``_sigma_gates``); then each
        expert's slice × cohort is copied into one contiguous float32 block, whose
        Gram matrix (D), γ and π decide its merge.
        """
        opts = self.options
        pi_sum = np.zeros(len(n))
        merged = kept = excluded = counted_pairs = 0
        consensus_sum, consensus_negative, consensus_pairs = 0.0, 0, 0
        upper = np.triu_indices(len(n), k=1)
        if self.personal is not None:
            block = self.personal.start
            # called from finish, after its check that begin() set _global
            starts = [self.personal.start_of(cid, self._global) for cid in self._ids]  # type: ignore[arg-type]
            views = np.empty((len(n), self.personal.size), dtype=PAYLOAD_DTYPE)
        width = max((b - a for a, b in (self.layout.expert_span(*k) for k in self.layout.expert_keys())), default=0)
        cohort_slice = np.empty(len(n) * width, dtype=PAYLOAD_DTYPE)  # the one slice × cohort held at a time
        signatures: dict[int, np.ndarray] = {}  # layer → μ [N, E, d], one layer at a time
        for layer, experts in self._expert_batches(len(n), cohort):
            if opts.semantic:
                if layer not in signatures:
                    signatures = {layer: cohort[layer].mu}
                gates, out, pairs = self._sigma_gates(signatures[layer], cohort[layer].counts, experts)
                excluded, counted_pairs = excluded + out, counted_pairs + pairs
            for k, expert in enumerate(experts):
                a, b = self.layout.expert_span(layer, expert)
                # one slice × cohort, copied in one call into a contiguous [N, |θ(e)|] block
                deltas = np.concatenate([r.read(a, b) for r in self._readers], out=cohort_slice[: len(n) * (b - a)])
                deltas = deltas.reshape(len(n), b - a)
                if opts.semantic:
                    if self.personal is not None:
                        expert_starts = np.stack([s[a - block : b - block] for s in starts])
                    if not opts.direction_consensus:  # ablation: γ from the σ gate alone
                        consensus = np.ones((len(n), len(n)))
                    elif opts.consensus_space == "function":  # D on ΔW, from the factors and where they started
                        start = new[a:b] if self.personal is None else expert_starts  # new[a:b]: θ_g^{t−1}(e) still
                        gram = fs.function_gram(deltas, start, self._factors[layer, expert])
                        consensus = sa.direction_consensus(gram)
                    else:
                        consensus = sa.direction_consensus(sa.slice_gram(deltas))
                    if opts.direction_consensus:
                        pairs_d = consensus[upper]
                        consensus_sum += float(pairs_d.sum())
                        consensus_negative += int((pairs_d < 0).sum())
                        consensus_pairs += pairs_d.size
                    gamma = sa.gated_consensus(gates[k], consensus)
                    pi = sa.client_weights(gamma, n)
                    if self.personal is not None:
                        # (12, personalized) θ_j(e) = start_j(e) + Δ_j(e); client i keeps Σ_j γ_ij θ_j / Σ_j γ_ij
                        thetas = expert_starts + deltas
                        views[:, a - block : b - block] = sa.personalized_view(gamma, thetas)
                else:
                    pi = n / n.sum()
                new[a:b] = sa.merge_expert(new[a:b], deltas, pi).astype(PAYLOAD_DTYPE)
                if pi.sum() > 0:
                    pi_sum, merged = pi_sum + pi, merged + 1
                else:
                    kept += 1
        if self.personal is not None:
            for cid, view in zip(self._ids, views, strict=True):
                self.personal.put(cid, view)
        report: dict[str, float] = {}
        if opts.semantic and self.layout.expert_keys():
            report["excluded_pair_frac"] = excluded / counted_pairs if counted_pairs else 0.0
            report["experts_kept_frac"] = kept / len(self.layout.expert_keys())
        if consensus_pairs:
            report["consensus_mean"] = consensus_sum / consensus_pairs
            report["consensus_negative_frac"] = consensus_negative / consensus_pairs
        return pi_sum, merged, report

    def _expert_batches(self, num_clients: int, cohort: Sequence[RoutingStats]) -> Iterator[tuple[int, list[int]]]:
        """(layer, experts) in buffer order: each layer's experts in batches of ``semantic_alignment.sigma_batch``."""
        for layer, keys in itertools.groupby(self.layout.expert_keys(), key=lambda key: key[0]):
            experts = [e for _, e in keys]
            size = sa.sigma_batch(num_clients, cohort[layer].x_sum.shape[-1])
            for i in range(0, len(experts), size):
                yield layer, experts[i : i + size]

    def _sigma_gates(self, mu: np.ndarray, counts: np.ndarray, experts: list[int]) -> tuple[np.ndarray, int, int]:
        """Eqs. 7, 9 and the σ factor of eq. 10 for a batch of one layer's experts.

        ``mu`` [N, E, d] and ``counts`` [N, E] are the layer's signatures and
        token counts. Returns the σ gate [k, N, N]
        (``semantic_alignment.sigma_gate``), the counted pairs it excludes and
        the counted pairs, summed over the batch.
        """
        opts = self.options
        idx = np.asarray(experts)
        # [k, N, d] and [k, N]: expert-major, as the batch is indexed
        sigma, counted = sa.signature_similarity(mu[:, idx].swapaxes(0, 1), counts[:, idx].T)
        tau = sa.thresholds(sigma, counted, beta=opts.beta)
        gates = sa.sigma_gate(sigma, counted, tau, gate=opts.gate, temperature=opts.soft_temperature,
                              tol=opts.sigma_tol)
        out, pairs = sa.excluded_pairs(sigma, counted, tau, tol=opts.sigma_tol)
        return gates, out, pairs

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """p_g, α per client id and whether a p_g target exists; each client's experts under ``personalized``.

        p_g and α are plain lists; the experts are arrays (``PersonalExperts.state_dict``).
        """
        state: dict[str, Any] = {
            "p_g": self._p_g.tolist(),
            "alpha": {int(cid): a.tolist() for cid, a in sorted(self._alpha.items())},
            "has_target": self._has_target,
        }
        if self.personal is not None:
            state["personal"] = self.personal.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; client ids may come back as strings (JSON)."""
        extra = set(state) - {"p_g", "alpha", "has_target", "personal"}
        if extra:
            raise ValueError(f"FedAlignMoE state has unknown keys {sorted(extra)}")
        shape = self._p_g.shape
        p_g = np.array(state["p_g"], dtype=np.float64)
        if p_g.shape != shape:
            raise ValueError(f"FedAlignMoE state p_g has shape {p_g.shape}, layout needs {shape}")
        alpha = {int(cid): np.array(a, dtype=np.float64) for cid, a in state["alpha"].items()}
        for cid, a in alpha.items():
            if a.shape != shape:
                raise ValueError(f"FedAlignMoE state alpha of client {cid} has shape {a.shape}, layout needs {shape}")
        if ("personal" in state) != (self.personal is not None):
            raise ValueError("FedAlignMoE state and options disagree on expert_agg='personalized'")
        if self.personal is not None:
            self.personal.load_state_dict(state["personal"])
        self._p_g, self._alpha, self._has_target = p_g, alpha, bool(state["has_target"])

