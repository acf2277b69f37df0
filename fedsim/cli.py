"""The ``fedsim`` command line.

Its commands: ``run --config FILE [--out DIR] [key.sub=value ...]``, ``resume RUN_DIR``,
``plan --config FILE [--json] [key.sub=value ...]`` (what a run costs and whether it fits, before anything
runs), ``report RUN_DIR``, ``compare RUN_DIR... --out DIR``, and the Ray Jobs commands ``submit``, ``status``,
``logs``, ``stop`` (``--address http://HEAD:8265``).

Every error fedsim raises on purpose is printed as one line naming the field
or file, with exit status 2; nothing deep inside a library reaches the user
as a traceback for a bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aggregation.errors import ConfigError, FedsimError, RunFailed

if TYPE_CHECKING:
    from fedsim.config import RunConfig
    from fedsim.plan import Capacity


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description="Federated fine-tuning of MoE LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated job on an embedded local Ray (or workers.ray_address)")
    run.add_argument("--config", "-c", help="YAML config file")
    run.add_argument("--out", help="run directory (default: <out_dir>/<time>-<name>/)")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    resume = sub.add_parser("resume", help="continue a stopped or failed run from its last checkpoint")
    resume.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoint.pkl)")
    for command in (run, resume):
        command.add_argument("--debug", action="store_true",
                             help="show DEBUG lines, library warnings and Ray's worker output (or set FEDSIM_DEBUG=1)")
    plan = sub.add_parser("plan", help="what a run of a config costs (parameters, bytes, memory) and whether it "
                          "fits this machine or workers.ray_address, before anything runs")
    plan.add_argument("--config", "-c", help="YAML config file")
    plan.add_argument("--json", action="store_true", help="print the figures as JSON instead of the report")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    report = sub.add_parser("report", help="PNG plots and a self-contained report.html for a run directory")
    report.add_argument("run_dir")
    compare = sub.add_parser("compare", help="overlay several runs' accuracy curves (vs round and vs bytes)")
    compare.add_argument("run_dirs", nargs="+")
    compare.add_argument("--out", required=True, help="directory for compare_accuracy.png and compare.html")
    submit = sub.add_parser("submit", help="submit a run to a Ray cluster as a Ray Job")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--config", "-c", help="YAML config file")
    submit.add_argument("--out", help="out_dir on a filesystem every node sees (default: the config's, absolute)")
    submit.add_argument("--follow", action="store_true", help="print the job's log until it ends; exit 0 on success")
    submit.add_argument("--pip", action="store_true", help="have Ray install requirements.txt on the nodes")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value")
    for name, what in (("status", "a job's status and run directory"), ("logs", "a job's log"), ("stop", "stop a job")):
        job = sub.add_parser(name, help=what)
        job.add_argument("--address", required=True)
        job.add_argument("job_id")
    return parser


def _jobs(args: argparse.Namespace) -> int:
    """The Ray Jobs commands; errors are one line, exit 2."""
    from fedsim import jobs

    try:
        if args.command == "submit":
            cfg = jobs.job_config(args.config, list(args.overrides), args.out)
            job_id, run_dir = jobs.submit(args.address, cfg, pip=args.pip)
            print(f"submitted job {job_id}; run directory {run_dir}")
            if args.follow:
                final = jobs.follow(args.address, job_id)
                print(jobs.outcome(args.address, job_id))
                return 0 if final.value == "SUCCEEDED" else 1
        elif args.command == "status":
            print(jobs.status(args.address, args.job_id))
        elif args.command == "logs":
            print(jobs.logs(args.address, args.job_id), end="")
        else:
            print(f"job {args.job_id}: {'stop requested' if jobs.stop(args.address, args.job_id) else 'not running'}")
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the job SDK's own errors, e.g. an unknown job id
        print(f"fedsim: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def _cluster_capacity(cfg: RunConfig) -> Capacity:
    """The capacity of the cluster at ``workers.ray_address``, read once through a read-only connection."""
    import ray

    from fedsim import environment
    from fedsim.plan import cluster_capacity

    address = cfg.workers.ray_address
    assert address is not None  # the caller checked
    environment.apply()
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"workers.ray_address: cannot connect to {address}: {str(exc).splitlines()[0]}") from None
    try:
        nodes = ray.nodes()  # type: ignore[no-untyped-call]  # ray leaves it unannotated: a list of dicts
    finally:
        ray.shutdown()
    return cluster_capacity(cfg, nodes, address)


def _plan(args: argparse.Namespace) -> int:
    """``fedsim plan``: the report (or ``--json``) on stdout; exit 2 with one line when it does not fit."""
    from fedsim.config import load_config
    from fedsim.plan import check_fits, local_capacity, plan, spill_note, workers_for
    from fedsim.plan_report import describe, describe_capacity

    try:
        cfg = load_config(args.config, list(args.overrides))
        capacity = _cluster_capacity(cfg) if cfg.workers.ray_address else local_capacity(cfg)
        figures = plan(cfg, num_workers=workers_for(cfg, capacity))
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    error = None
    try:
        check_fits(figures, capacity)
    except FedsimError as exc:
        error = str(exc)
    note = spill_note(figures, capacity)
    if args.json:
        print(json.dumps({**figures.to_dict(), "capacity": vars(capacity), "fits": error is None, "error": error,
                          "note": note}, indent=2))
    else:
        print(describe(figures))
        print(f"capacity: {describe_capacity(capacity)}")
        if note:
            print(f"note: {note}")
        print("fits" if error is None else f"does not fit: {error}")
    if error is not None:
        print(f"fedsim: error: {error}", file=sys.stderr)
        return 2
    return 0


def _summary_table(rounds: object) -> str:
    import pandas as pd

    assert isinstance(rounds, pd.DataFrame)
    cols = [c for c in ("round", "train_loss", "test_loss", "test_accuracy", "wall_s") if c in rounds]
    table: str = rounds[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")
    return table


def _console_logging(debug: bool = False) -> None:
    """Console logging: the ``fedsim`` logger's lines on stderr, printed above rich's live progress bars.

    INFO lines, or DEBUG lines with ``debug`` or ``FEDSIM_DEBUG`` set, are shown.

    Outside debug mode, Python warnings raised by the libraries go to run.log only; with ``debug`` they print
    as usual, and ``FEDSIM_DEBUG`` is set for the rest of the run (the workers Ray starts inherit it).
    """
    from rich.console import Console
    from rich.logging import RichHandler

    from fedsim.console import DEBUG_ENV, debug_enabled, route_to_run_log

    if debug:
        os.environ[DEBUG_ENV] = "1"
    debug = debug_enabled()
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_level=debug, markup=False)
    handler.setLevel(logging.DEBUG if debug else logging.INFO)
    handler.addFilter(lambda record: not getattr(record, "file_only", False))
    logger = logging.getLogger("fedsim")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    if not debug:
        logging.captureWarnings(True)
        route_to_run_log(logging.getLogger("py.warnings"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedsim`` command in ``argv`` (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        The exit status: 0 on success, 1 when a round failed, 2 for a bad input, 130 when interrupted.
    """
    args = _parser().parse_args(argv)
    _console_logging(debug=getattr(args, "debug", False))
    # Imports after parsing: `fedsim --help` stays fast.
    from fedsim.config import load_config

    if args.command in ("submit", "status", "logs", "stop"):
        return _jobs(args)
    if args.command == "plan":
        return _plan(args)
    if args.command in ("report", "compare"):
        from fedsim.report import compare, report

        try:
            page = report(args.run_dir) if args.command == "report" else compare(args.run_dirs, args.out)
        except FedsimError as exc:
            print(f"fedsim: error: {exc}", file=sys.stderr)
            return 2
        print(f"report: {page}")
        return 0
    try:
        if args.command == "resume":
            from fedsim.driver import resume

            result = resume(args.run_dir)
        else:
            cfg = load_config(args.config, list(args.overrides))  # before the driver's imports: a bad key fails at once
            from fedsim.driver import run

            result = run(cfg, out=args.out)
    except RunFailed as exc:  # the input was fine; a round failed (status.json says so)
        print(f"fedsim: run failed: {exc}", file=sys.stderr)
        return 1
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130
    print(_summary_table(result.rounds))
    print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
