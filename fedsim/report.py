"""``fedsim report RUN_DIR`` and ``fedsim compare RUN_DIR...``: PNG plots and a self-contained HTML page.

Everything is read back from the run directory's tables (rounds, clients,
comm, routing), so a report can be made for a finished, failed or running run
and for runs made elsewhere. matplotlib draws; pandas reads; the HTML embeds
the images as base64 so the page is one file that can be mailed or attached.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from aggregation.errors import FedsimError  # noqa: E402

CLASS_COLOURS = {"expert": "tab:blue", "router": "tab:orange", "shared": "tab:green", "routing_stats": "tab:red"}
SUMMARY_COLUMNS = ["round", "test_accuracy", "test_loss", "train_loss", "clients_completed", "clients_failed",
                   "clients_rejected", "bytes_down", "bytes_up", "routing_tv", "wall_s"]


def _read(run_dir: Path, name: str) -> pd.DataFrame:
    path = run_dir / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _rounds(run_dir: Path) -> pd.DataFrame:
    rounds = _read(run_dir, "rounds")
    if rounds.empty:
        raise FedsimError(f"{run_dir}: no rounds.parquet with any round (not a run directory, or no round finished)")
    return rounds


def _save(fig: Figure, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":  # rounds are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _accuracy(rounds: pd.DataFrame, out: Path) -> Path:
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    acc.plot(rounds["round"], rounds["test_accuracy"], marker="o")
    acc.set(xlabel="round", ylabel="global test accuracy", title="Test accuracy vs round")
    loss.plot(rounds["round"], rounds["test_loss"], marker="o", label="test")
    loss.plot(rounds["round"], rounds["train_loss"], marker=".", label="train (clients' mean)")
    loss.set(xlabel="round", ylabel="loss", title="Loss vs round")
    loss.legend()
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy.png")


def _accuracy_vs_bytes(rounds: pd.DataFrame, out: Path) -> Path:
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    mib = (rounds["bytes_down"] + rounds["bytes_up"]).cumsum() / 2**20
    seen = rounds["test_accuracy"].notna()
    acc.plot(mib[seen], rounds["test_accuracy"][seen], marker="o")
    acc.set(xlabel="cumulative MiB (down + up, all clients)", ylabel="global test accuracy",
            title="Test accuracy vs communicated bytes")
    loss.plot(mib[seen], rounds["test_loss"][seen], marker="o", label="test")
    loss.plot(mib, rounds["train_loss"], marker=".", label="train (clients' mean)")
    loss.set(xlabel="cumulative MiB (down + up, all clients)", ylabel="loss", title="Loss vs communicated bytes")
    loss.legend()
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_bytes.png")


def _accuracy_vs_time(rounds: pd.DataFrame, out: Path) -> Path | None:
    if "sim_time_s" not in rounds:
        return None
    evaluated = rounds.dropna(subset=["test_accuracy"])
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    acc.plot(evaluated["sim_time_s"], evaluated["test_accuracy"], marker="o")
    acc.set(xlabel="simulated time (s)", ylabel="global test accuracy", title="Test accuracy vs simulated time")
    loss.plot(evaluated["sim_time_s"], evaluated["test_loss"], marker="o", label="test")
    loss.plot(rounds["sim_time_s"], rounds["train_loss"], marker=".", label="train (clients' mean)")
    loss.set(xlabel="simulated time (s)", ylabel="loss", title="Loss vs simulated time")
    loss.legend()
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_time.png")


def _bytes_by_class(comm: pd.DataFrame, out: Path) -> Path | None:
    if comm.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, direction in zip(axes, ("down", "up"), strict=True):
        table = (comm[comm["direction"] == direction].groupby(["round", "payload_class"])["bytes"].sum()
                 .unstack(fill_value=0) / 2**20)
        if not table.empty:  # one colour per class in both panels
            table = table.reindex(columns=[c for c in CLASS_COLOURS if c in table.columns])
            table.plot.bar(stacked=True, ax=ax, width=0.8, color=[CLASS_COLOURS[c] for c in table.columns])
        ax.set(xlabel="round", ylabel="MiB (all clients)", title=f"Bytes {direction} per round by payload class")
        ax.legend(fontsize=7)
    return _save(fig, out / "bytes_by_class.png")


def _expert_utilisation(routing: pd.DataFrame, out: Path) -> Path | None:
    if routing.empty:
        return None
    layers = sorted(routing["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1.5, 4.0), squeeze=False, sharey=True)
    vmin, vmax = routing["p_bar_mean"].min(), routing["p_bar_mean"].max()  # one colour scale for every layer
    for ax, layer in zip(axes[0], layers, strict=True):
        grid = routing[routing["layer"] == layer].pivot(index="expert", columns="round", values="p_bar_mean")
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                          extent=(grid.columns.min() - 0.5, grid.columns.max() + 0.5, grid.index.max() + 0.5, -0.5))
        ax.set_yticks(list(grid.index))
        ax.set(xlabel="round", title=f"layer {layer}")
    axes[0][0].set_ylabel("expert")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Expert utilisation: clients' mean routing probability p̄")
    fig.tight_layout()
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="p̄")
    fig.savefig(out / "expert_utilisation.png", dpi=110)
    plt.close(fig)
    return out / "expert_utilisation.png"


def _client_weights(clients: pd.DataFrame, out: Path) -> Path | None:
    if clients.empty or "weight" not in clients:
        return None
    grid = clients.pivot_table(index="client", columns="round", values="weight", aggfunc="first")
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(grid) + 2))
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="magma",
                      extent=(grid.columns.min() - 0.5, grid.columns.max() + 0.5, len(grid) - 0.5, -0.5))
    ax.set_yticks(range(len(grid)), [str(c) for c in grid.index], fontsize=7)
    ax.set(xlabel="round", ylabel="client", title="Each client's aggregation weight per round (blank: not sampled)")
    fig.colorbar(image, ax=ax)
    return _save(fig, out / "client_weights.png")


# FedAlign-MoE's per-round diagnostics (its strategy report's columns), by module
ROUTING_DIAGNOSTICS = {"omega_entropy": "ω entropy (nats)", "p_g_shift_tv": "p_g shift (total variation)"}
EXPERT_DIAGNOSTICS = {"excluded_pair_frac": "pairs excluded by the σ gate", "experts_kept_frac": "experts kept",
                      "consensus_mean": "D mean", "consensus_negative_frac": "share of pairs with D < 0"}


def strategy_figure(rounds: pd.DataFrame) -> Figure | None:
    """FedAlign-MoE's diagnostics on one figure: Module 1 (routing weights) left, Module 2 (expert gating) right.

    None when the run has none of them (another strategy).
    """
    routing = [c for c in ROUTING_DIAGNOSTICS if c in rounds]
    experts = [c for c in EXPERT_DIAGNOSTICS if c in rounds]
    if not routing and not experts:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for c in routing:
        left.plot(rounds["round"], rounds[c], marker=".", label=ROUTING_DIAGNOSTICS[c])
    if "omega_entropy" in routing and "n_aggregated" in rounds:  # ω's entropy when every client weighs the same
        left.plot(rounds["round"], np.log(rounds["n_aggregated"].clip(lower=1)), color="grey", linestyle=":",
                  label="log N (uniform ω)")
    left.set(xlabel="round", title="Module 1: routing-consistency weights")
    for c in experts:
        right.plot(rounds["round"], rounds[c], marker=".", label=EXPERT_DIAGNOSTICS[c])
    right.axhline(0.0, color="grey", linewidth=0.8)
    with_d = " and direction consensus D" if "consensus_mean" in experts else ""
    right.set(xlabel="round", title=f"Module 2: expert gating{with_d}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def _strategy(rounds: pd.DataFrame, out: Path) -> Path | None:
    fig = strategy_figure(rounds)
    return None if fig is None else _save(fig, out / "fedalign.png")


def _failures(rounds: pd.DataFrame, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    kinds = [c for c in ("clients_failed", "clients_rejected", "stragglers") if c in rounds]
    width = 0.8 / max(len(kinds), 1)
    for i, c in enumerate(kinds):
        ax.bar(rounds["round"] + (i - (len(kinds) - 1) / 2) * width, rounds[c], width=width, label=c)
    ax.set(xlabel="round", ylabel="clients", title="Failed, rejected and straggling clients per round")
    ax.set_ylim(bottom=0, top=max(1, float(rounds[kinds].to_numpy().max())) * 1.1 if kinds else 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return _save(fig, out / "failures.png")


def _html(title: str, images: list[Path], sections: list[tuple[str, str]]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}img{max-width:100%;margin:1em 0}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "pre{background:#f6f6f6;padding:1em;font-size:12px;overflow:auto}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(image.stem)}</h3><img alt='{image.name}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(run_dir: str | Path) -> Path:
    """PNG plots under ``RUN_DIR/report/`` and a self-contained ``RUN_DIR/report.html``; returns the page."""
    run_dir = Path(run_dir)
    rounds = _rounds(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    images = [_accuracy(rounds, out), _accuracy_vs_time(rounds, out), _accuracy_vs_bytes(rounds, out),
              _bytes_by_class(_read(run_dir, "comm"), out), _expert_utilisation(_read(run_dir, "routing"), out),
              _client_weights(_read(run_dir, "clients"), out), _strategy(rounds, out), _failures(rounds, out)]
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    summary = rounds[[c for c in SUMMARY_COLUMNS if c in rounds]].to_html(
        index=False, float_format=lambda v: f"{v:.4f}"
    )
    page = _html(f"fedsim run {run_dir.name}", [i for i in images if i is not None], [
        ("Status", f"<p>{html.escape(status.get('status', 'unknown'))}: {len(rounds)} rounds</p>"),
        ("Rounds", summary),
        ("Configuration", f"<pre>{html.escape(config)}</pre>"),
    ])
    path = run_dir / "report.html"
    path.write_text(page)
    return path


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Overlay several runs' accuracy vs round and vs bytes; writes PNGs and ``compare.html`` in ``out_dir``."""
    if len(run_dirs) < 2:
        raise FedsimError("compare: give at least two run directories")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {Path(d).name: _rounds(Path(d)) for d in run_dirs}
    fig, (by_round, by_time, by_bytes) = plt.subplots(1, 3, figsize=(15, 4))
    for name, rounds in runs.items():
        mib = (rounds["bytes_down"] + rounds["bytes_up"]).cumsum() / 2**20
        seen = rounds["test_accuracy"].notna()
        by_round.plot(rounds["round"][seen], rounds["test_accuracy"][seen], marker=".", label=name)
        if "sim_time_s" in rounds:
            by_time.plot(rounds["sim_time_s"][seen], rounds["test_accuracy"][seen], marker=".", label=name)
        by_bytes.plot(mib[seen], rounds["test_accuracy"][seen], marker=".", label=name)
    by_round.set(xlabel="round", ylabel="global test accuracy", title="Test accuracy vs round")
    by_time.set(xlabel="simulated time (s)", ylabel="global test accuracy", title="Test accuracy vs simulated time")
    by_bytes.set(xlabel="cumulative MiB (down + up)", ylabel="global test accuracy", title="Test accuracy vs bytes")
    for ax in (by_round, by_time, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    image = _save(fig, out / "compare_accuracy.png")
    table = pd.DataFrame([
        {"run": name, "rounds": len(r), "final_accuracy": float(np.mean(r["test_accuracy"].tail(5))),
         "best_accuracy": float(r["test_accuracy"].max()),
         "MiB": float((r["bytes_down"] + r["bytes_up"]).sum() / 2**20)}
        for name, r in runs.items()
    ])
    page = _html("fedsim compare", [image], [
        ("Runs (final accuracy: mean of the last 5 rounds)",
         table.to_html(index=False, float_format=lambda v: f"{v:.4f}")),
    ])
    path = out / "compare.html"
    path.write_text(page)
    return path
