"""``fedsim plan``: exact byte figures against real models, the scale configs, the fit check and the CLI."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregation.compression import Codec, encode
from aggregation.errors import ConfigError
from aggregation.routing_stats import RoutingStats
from fedsim.cli import main
from fedsim.config import RunConfig, load_config
from fedsim.models import RoutingRecorder, apply_lora, build_layout, build_model
from fedsim.plan import Capacity, check_fits, plan, spill_note
from fedsim.plan_report import describe
from fedsim.prepare import _base_key

ROOT = Path(__file__).resolve().parents[2]
SCALE = ROOT / "configs" / "scale"
GIB = 2**30
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.full_depth=3", "model.num_heads=2",
        "model.num_kv_heads=1", "model.intermediate_size=32", "model.num_experts=4", "model.top_k=2",
        "model.pretrain.tokenizer_vocab=400", "lora.rank=2", "clients_per_round=5", "workers.num_workers=2"]
FAMILIES = {  # family: its own overrides
    "mixtral": [],
    "olmoe": [],
    "qwen2_moe": [],  # a shared expert
    "deepseek_v2": ["model.num_kv_heads=2"],  # multi-head latent attention, shared experts
    "switch_transformers": ["model.top_k=1"],  # encoder-decoder, one module per expert
}


def _tiny(family: str, *extra: str) -> RunConfig:
    return load_config(None, [*TINY, f"model.family={family}", *FAMILIES[family], *extra])


def _real(cfg: RunConfig, layers: int):  # type: ignore[no-untyped-def]
    """The adapted model a worker trains, built for real (float32 on the CPU) at ``layers``."""
    m = cfg.model
    base = build_model(m.family, vocab_size=m.pretrain.tokenizer_vocab, hidden_size=m.hidden_size, num_layers=layers,
                       num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
                       num_experts=m.num_experts, top_k=m.top_k, max_position=m.max_position, seed=0,
                       overrides=m.hf_overrides)
    return apply_lora(base, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0)


def _bytes_by_role(layout) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {role: 4 * sum(e.size for e in layout.select(role=role)) for role in ("shared", "router", "expert")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_payload_bytes_by_class_are_the_real_models_at_both_depths(family: str) -> None:
    # Prepare
    cfg = _tiny(family)
    configured, full = _real(cfg, 2), _real(cfg, 3)
    # Execute
    figures = plan(cfg, builds_base=True)
    # Assert: every class at the configured and the full depth, and the parameter counts
    short, deep = figures.depths
    assert (short.layers, deep.layers) == (2, 3)
    assert short.by_role == _bytes_by_role(build_layout(configured))
    assert deep.by_role == _bytes_by_role(build_layout(full))
    assert short.params == sum(p.numel() for p in configured.parameters())
    assert short.trainable == sum(p.numel() for p in configured.parameters() if p.requires_grad)
    assert short.update == short.payload and deep.payload > short.payload


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_routing_statistics_bytes_are_a_real_recorders(family: str) -> None:
    # Prepare: the statistics a client's forward pass records
    cfg = _tiny(family)
    model = _real(cfg, 2)
    ids = torch.randint(0, 400, (3, 7))
    with RoutingRecorder(model) as recorder:
        recorder.set_mask(torch.ones_like(ids))
        model(input_ids=ids)
        stats = recorder.stats()
    # Execute
    figures = plan(cfg, builds_base=True)
    # Assert
    assert figures.configured.routing == sum(s.nbytes for s in stats) > 0
    assert figures.configured.moe_layers == len(stats)


def test_routing_statistics_bytes_of_an_encoder_decoder_count_both_stacks() -> None:
    cfg = _tiny("switch_transformers")
    figures = plan(cfg, builds_base=True)
    one = RoutingStats.zeros(num_experts=4, hidden_size=32)  # 2 encoder + 2 decoder MoE layers
    assert figures.configured.routing == 4 * one.nbytes


def test_bytes_per_round_are_the_cohort_times_a_clients() -> None:
    figures = plan(_tiny("mixtral", "train.routing_stats=after"), builds_base=True)
    d = figures.configured
    assert figures.bytes_down == 5 * d.payload
    assert figures.bytes_up == 5 * (d.payload + d.routing)
    # the object store: the cohort's updates (delta and statistics) and the old and new global payloads
    assert figures.object_store_bytes == 5 * (d.payload + d.routing) + 2 * d.payload


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_compressed_update_bytes_are_what_the_codec_counts(codec: Codec) -> None:
    # Prepare: the real layout and a real encoding of a delta over it
    cfg = _tiny("qwen2_moe", f"compression.uplink={codec}", "compression.topk_fraction=0.3")
    layout = build_layout(_real(cfg, 2))
    delta = np.random.default_rng(0).standard_normal(layout.total).astype(np.float32)
    encoded, _ = encode(delta, layout.class_spans(), codec, fraction=0.3)
    # Execute
    figures = plan(cfg, builds_base=True)
    # Assert: the update as sent; the object store holds the decoded delta and the residual
    d = figures.configured
    assert d.update == sum(encoded.nbytes.values()) < d.payload
    assert figures.bytes_up == 5 * (d.update + d.routing)
    assert figures.object_store_bytes == 5 * (2 * d.payload + d.routing) + 5 * d.payload + 2 * d.payload


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "switch-base-16"])
def test_scale_config_plans_with_consistent_figures(name: str) -> None:
    # Execute
    figures = plan(load_config(SCALE / f"{name}.yaml", []), builds_base=True)
    # Assert: positive figures; a reduced depth has a smaller payload than the real one
    assert all(x.payload > 0 and x.routing > 0 and x.params > x.trainable > 0 for x in figures.depths)
    if name == "switch-base-16":  # at its real depth
        assert len(figures.depths) == 1
    else:
        short, full = figures.depths
        assert full.payload > short.payload and full.params > short.params and full.moe_layers > short.moe_layers
    for process in (figures.worker, figures.aggregator, figures.driver):
        assert process.total >= process.private > 0
        assert all(v >= 0 for _, v in process.parts)
    assert figures.bytes_down == 20 * figures.configured.payload


def test_olmoe_full_depth_payload_is_the_layout_formula() -> None:
    figures = plan(load_config(SCALE / "olmoe-1b-7b.yaml", []), builds_base=True)
    full = figures.depths[-1]
    # per layer, r = 8, h = 2048, E = 64, I = 1024: attention LoRA 4·r·(h + h); router E·h; each expert's
    # factors of gate_up [2I, h] and down [h, I]: r·(h + 2I) + r·(I + h)
    r, h, e, inner = 8, 2048, 64, 1024
    per_layer = 4 * r * (h + h) + e * h + e * r * (h + 2 * inner + inner + h)
    assert per_layer == 3_932_160
    assert full.payload == 16 * per_layer * 4 == 251_658_240  # 240 MiB
    assert full.by_role == {"shared": 16 * 4 * r * 2 * h * 4, "router": 16 * e * h * 4,
                            "expert": 16 * e * r * (2 * h + 3 * inner) * 4}
    assert full.routing == 16 * (8 + 8 * (3 * e + e * h))


MEASURED = ROOT / "benchmarks" / "measured" / "scale_runs.csv"


@pytest.mark.skipif(not MEASURED.is_file(), reason="no measured scale runs (benchmarks/scale_runs.py --record)")
def test_memory_figures_are_within_a_quarter_of_the_measured_runs() -> None:
    import pandas as pd

    for run in pd.read_csv(MEASURED).itertuples():
        cfg = load_config(SCALE / f"{run.config}.yaml", [f"strategy.name={run.strategy}"])
        figures = plan(cfg, builds_base=bool(run.driver_built_base))
        measured = {"worker": run.worker_gib, "aggregator": run.aggregator_gib, "driver": run.driver_gib}
        for process, gib in measured.items():
            estimate = getattr(figures, process).total / GIB
            assert estimate == pytest.approx(gib, rel=0.25), f"{run.config} / {run.strategy}: {process}"
        sent = (figures.configured.update + figures.configured.routing) / 2**20
        assert sent == pytest.approx(run.update_mib, abs=5e-4)  # the file keeps 3 decimals


def test_full_depth_under_num_layers_is_a_one_line_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"^model\.full_depth: 2 is less than model\.num_layers=4$"):
        load_config(None, ["model.num_layers=4", "model.full_depth=2"])


def test_full_depth_leaves_the_base_cache_key_alone() -> None:
    demo = ROOT / "configs" / "demo.yaml"
    assert _base_key(load_config(demo, [])) == "513b366d3c059f3c"
    assert _base_key(load_config(demo, ["model.full_depth=12"])) == "513b366d3c059f3c"


def _capacity(**changes: float) -> Capacity:
    fields = dict(where="this machine", memory=64 * GIB, largest_node=64 * GIB, nodes=1, cpus=16, gpus=0,
                  gpu_memory=None, object_store=16 * GIB, driver_memory=64 * GIB)
    return Capacity(**{**fields, **changes})  # type: ignore[arg-type]


def test_check_fits_names_what_does_not_fit() -> None:
    figures = plan(load_config(SCALE / "olmoe-1b-7b.yaml", []), builds_base=True)
    check_fits(figures, _capacity())  # 2 workers of ~5 GiB fit 64 GiB and 16 CPUs
    too_small = r"^workers\.num_workers: 2 workers .*: memory .* > 6\.00 GiB .*; CPUs 2 > 1$"
    with pytest.raises(ConfigError, match=too_small):
        check_fits(figures, _capacity(memory=6 * GIB, cpus=1))
    check_fits(figures, _capacity(object_store=0.5 * GIB))  # a round over the store spills: a note, not a failure
    note = spill_note(figures, _capacity(object_store=0.5 * GIB))
    assert note is not None and note.startswith("clients_per_round: a round holds 0.68 GiB in the object store")
    assert spill_note(figures, _capacity()) is None
    with pytest.raises(ConfigError, match=r"^model: the driver needs \d+\.\d\d GiB \(building the base\)"):
        check_fits(figures, _capacity(driver_memory=4 * GIB))


def _fedsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_plan_prints_the_sections_and_exits_0(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Execute: the command's entry point, in this process (the subprocess below goes through `python -m fedsim`)
    status = main(["plan", "--config", "configs/demo.yaml", f"cache_dir={tmp_path}"])
    # Assert
    out = capsys.readouterr().out
    assert status == 0
    for section in ("## Parameters", "## Bytes (MiB)", "object store, one round", "## Memory (GiB)", "worker (each):",
                    "aggregator:", "driver (builds the base: none cached):", "capacity: this machine"):
        assert section in out
    assert out.rstrip().endswith("fits")


def test_cli_plan_of_a_run_too_big_for_this_machine_exits_2_with_one_line() -> None:
    done = _fedsim("plan", "--config", "configs/scale/olmoe-1b-7b.yaml", "workers.num_workers=64")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert re.match(r"fedsim: error: workers\.num_workers: 64 workers \(64 processes\) do not fit this machine: "
                    r"(memory \d+\.\d\d GiB > |CPUs 64 > )", lines[0])


def test_cli_plan_json_and_a_bad_override(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["plan", "--config", "configs/demo.yaml", "--json", f"cache_dir={tmp_path}"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["fits"] and figures["depths"][0]["payload"] > 0
    assert main(["plan", "--config", "configs/demo.yaml", "model.hidden_sise=64"]) == 2
    assert capsys.readouterr().err.strip() == "fedsim: error: model.hidden_sise: unknown key"


def _documented_plans() -> list[tuple[Path, list[str], str]]:
    """Each ``fedsim plan`` command in a fenced block of the docs, with the output pasted in the next block."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"^```.*?\n(.*?)^```", doc.read_text(), re.MULTILINE | re.DOTALL)
        for i, block in enumerate(blocks):
            for line in block.splitlines():
                if not re.search(r"\bfedsim plan\b", line):
                    continue
                tokens = shlex.split(line, comments=True)
                if len(tokens) > 2 and tokens[0].endswith("fedsim") and tokens[1] == "plan":
                    found.append((doc, tokens[2:], blocks[i + 1] if i + 1 < len(blocks) else ""))
    return found


def test_documented_plan_commands_load_and_their_pasted_output_is_current() -> None:
    compared = 0
    for doc, args, output in _documented_plans():
        config = args[args.index("--config") + 1]
        cfg = load_config(ROOT / config, [a for a in args if "=" in a])  # the file exists, the overrides load
        if output.startswith("fedsim plan:"):  # the report pasted after it: what the code prints on a fresh checkout
            report = output.split("\ncapacity:")[0].rstrip()
            assert describe(plan(cfg, builds_base=True)) == report, f"{doc.name}: the pasted plan is stale"
            compared += 1
    assert compared >= 1
