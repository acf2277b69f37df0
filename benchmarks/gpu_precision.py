"""The torch engine's precisions on one device: a client's step time, peak memory and update, fp32 vs bf16 vs 4/8-bit.

Builds a Mixtral-family base from config (random init, saved and loaded back
through ``from_pretrained`` as a checkpoint would be), then trains the same
client with the torch engine at each setting and prints one row per setting:

- ``s_per_step``: the client's wall time (payload in, every step, update out) per local step;
- ``peak_mib``: peak accelerator memory of the client (``gpu_peak_mib``; CPU: none);
- ``train_loss`` and ``cosine_to_fp32``: the client's mean loss, and how close
  its update is to fp32's (bf16 and quantized bases train through rounded
  weights, so the updates differ a little, never in direction);
- ``status``: ``ok``, or why a setting could not run here (4/8-bit needs
  bitsandbytes: ``pip install -e '.[quantization]'``; it has CPU kernels too).

    python benchmarks/gpu_precision.py                 # ~0.5B-parameter base on the GPU
    python benchmarks/gpu_precision.py --shape tiny    # seconds, on CPU too (the tests run this)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

from fedsim import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from aggregation.errors import ConfigError  # noqa: E402
from aggregation.messages import ClientInstructions  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.driver import engine_spec  # noqa: E402
from fedsim.prepare import prepare  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

SHAPES = {
    # ~0.5B parameters: 8 layers × 16 experts of H 1024 × I 1408, top-2
    "gpu": ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=16", "model.num_kv_heads=4",
            "model.intermediate_size=1408", "model.num_experts=16", "model.top_k=2", "model.max_position=512",
            "model.pretrain.tokenizer_vocab=8000", "data.synthetic_docs_per_label=200", "data.max_length=256",
            "train.batch_size=16", "workers.gpus_per_worker=1"],
    "tiny": ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
             "model.intermediate_size=32", "model.num_experts=4", "model.top_k=2", "model.pretrain.tokenizer_vocab=400",
             "data.synthetic_docs_per_label=12", "data.max_length=32", "train.batch_size=4"],
}
SETTINGS = (("fp32", "none"), ("bf16", "none"), ("bf16", "8bit"), ("bf16", "4bit"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="gpu")
    parser.add_argument("--steps", type=int, default=6, help="local steps of the client")
    parser.add_argument("--csv", help="also write the table to this file")
    args = parser.parse_args()
    quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="fedsim-precision-") as cache:
        cfg = load_config(None, [*SHAPES[args.shape], "progress=false", "data.source=synthetic", "data.num_clients=2",
                                 "clients_per_round=2", "data.partition=iid", "data.min_examples=2",
                                 "model.pretrain.steps=0", f"train.local_steps={args.steps}", "train.routing_stats=off",
                                 f"cache_dir={cache}"])
        prepared = prepare(cfg)
        rows, reference = [], None
        for precision, quantization in SETTINGS:
            row = {"precision": precision, "quantization": quantization, "device": device}
            base = dataclasses.replace(engine_spec(cfg, prepared), device=device, precision=precision,
                                       quantization=quantization, train=cfg.train)
            try:
                engine = base()
            except ConfigError as exc:
                rows.append({**row, "status": str(exc)})
                continue
            losses: list[float] = []
            update = engine.train(prepared.partitions[0], engine.initial_payload,
                                  ClientInstructions(client_id=0, round_idx=1, seed=0), step_losses=losses)
            assert update is not None
            delta = update.delta.astype(np.float64)
            if reference is None:
                reference = delta
            cosine = float(delta @ reference / (np.linalg.norm(delta) * np.linalg.norm(reference)))
            peak = update.metrics.get("gpu_peak_mib", (float("nan"), 1.0))
            rows.append({**row, "s_per_step": update.compute_seconds / len(losses),
                         "peak_mib": peak[0] / peak[1], "train_loss": update.metric("train_loss"),
                         "cosine_to_fp32": cosine, "status": "ok"})
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    print(f"torch engine, one client of {args.steps} local steps, shape {args.shape}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
