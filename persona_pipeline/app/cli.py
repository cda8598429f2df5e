"""`persona-pipeline`: generate a demo fleet, run the chain, print a summary."""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from persona_pipeline import settings
from persona_pipeline.app.home import (
    INSTANCE_FILES,
    CommandError,
    init_home,
    say_on_stderr,
    write_failure_log,
)


def _parse_batch_id(text: str) -> str:
    from persona_pipeline.resources.landing_zone import check_batch_id

    try:
        return check_batch_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_day(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-03-01") from None


def cmd_init(args: argparse.Namespace) -> int:
    home = init_home(args.instance)
    print(f"PERSONA_HOME={home}\nDAGSTER_HOME={settings.dagster_home()}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from persona_pipeline.demo.generator import generate_fleet, write_ground_truth, write_landing

    init_home()
    landing = Path(args.out).resolve() if args.out else settings.landing_dir()
    truth = Path(args.truth).resolve() if args.truth else settings.ground_truth_dir()
    if args.if_empty and (landing / "index_updates").is_dir() and any((landing / "index_updates").iterdir()):
        print(f"landing zone {landing} already has index updates: not generating")
        return 0
    start = args.start or (date.today() - timedelta(days=args.days)).isoformat()
    fleet = generate_fleet(args.devices, args.days, args.seed, start)
    files = write_landing(fleet, landing)
    write_ground_truth(fleet, truth)
    rows = sum(len(frame) for frame in fleet.updates.values())
    days = list(fleet.updates)
    print(
        f"demo fleet: {args.devices} devices, {rows} updates over {days[0]} … {days[-1]} "
        f"({len(files)} files in {landing / 'index_updates'}); ground truth in {truth}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from persona_pipeline.run_health import end_on_sigterm

    end_on_sigterm(say_on_stderr)
    init_home()
    from persona_pipeline.app.runner import run_chain, summary

    result = run_chain(args.start, args.end, verbose=args.verbose)
    print(summary(result))
    return _report_failed_checks(result.failed_checks)


def _report_failed_checks(failed_checks: list[str]) -> int:
    """Exit status 1, with one line each, when an asset check of ERROR severity failed."""
    for line in failed_checks:
        say_on_stderr(line)
    return 1 if failed_checks else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from persona_pipeline.run_health import end_on_sigterm

    end_on_sigterm(say_on_stderr)
    init_home()
    from persona_pipeline.app.demo_loop import compare_weights, comparison_report, run_demo
    from persona_pipeline.app.runner import summary

    result = run_demo(args.rounds, args.seed, say=lambda line: print(line, flush=True))
    print()
    print(summary(result))
    print()
    print("comparing the initial and the learned weights on the same day …", flush=True)
    print(comparison_report(compare_weights()))
    return _report_failed_checks(result.failed_checks)


def cmd_simulate_feedback(args: argparse.Namespace) -> int:
    init_home()
    from persona_pipeline.app.runner import simulate_feedback

    print(simulate_feedback(args.seed, args.batch))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.what == "decisions":
        return cmd_evaluate_decisions(args)
    from persona_pipeline.anomalies.scoring import AnomalySettings
    from persona_pipeline.app.evaluate import evaluate_demo_fleet, public_table, report

    demo = None
    if not args.no_demo:
        home = Path(args.home).resolve() if args.home else None
        demo = evaluate_demo_fleet(args.devices, args.days, args.seed, home)
    public = None if args.no_public else public_table(args.seeds)
    text, passed = report(demo, public, AnomalySettings().detector)
    print(text)
    if demo is not None and args.home:
        print(f"\nthe evaluated fleet stays in {demo.home}")
    return 0 if passed else 1


def cmd_evaluate_decisions(args: argparse.Namespace) -> int:
    from persona_pipeline.app.evaluate_decisions import evaluate_decisions, report, select_scenarios

    try:
        scenarios = select_scenarios(args.scenarios, args.quick)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    home = Path(args.home).resolve() if args.home else None
    runs = evaluate_decisions(scenarios, home, say=lambda line: print(line, file=sys.stderr, flush=True))
    text, passed = report([run.row for run in runs], scenarios)
    print(text)
    if home is not None:
        print(f"\nthe evaluated fleets stay in {home}")
    return 0 if passed else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from persona_pipeline.resources.persona_store import connect, history_beside, move_stored_updates
    from persona_pipeline.secrets import mask_url
    from persona_pipeline.store.schema import upgrade_to_head

    url = settings.persona_db_url()
    engine = connect(url)
    try:
        before, after = upgrade_to_head(engine)
        history = history_beside(url, settings.history_location(), settings.history_shards())
        moved = move_stored_updates(engine, history)
    finally:
        engine.dispose()
    where = mask_url(url)
    change = "already at" if before == after else f"upgraded from {before or 'an empty database'} to"
    print(f"persona store {where}: {change} schema revision {after}")
    if moved:
        print(f"update history {history.shown}: {len(moved)} days of the index_updates table moved there")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create $PERSONA_HOME and the Dagster home")
    init.add_argument(
        "--instance",
        choices=sorted(INSTANCE_FILES),
        default="sqlite",
        help="Dagster's instance storage: SQLite files in the Dagster home (default), or PostgreSQL "
        "at DAGSTER_PG_URL (an existing dagster.yaml is kept)",
    )
    init.set_defaults(handler=cmd_init)

    generate = commands.add_parser("generate", help="write a demo fleet into the landing zone")
    generate.add_argument("--devices", type=int, default=3000, help="number of devices (default 3000)")
    generate.add_argument("--days", type=int, default=7, help="days of updates (default 7)")
    generate.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    generate.add_argument("--start", type=_parse_day, help="first day (default: --days days before today)")
    generate.add_argument("--out", help="landing folder (default $PERSONA_HOME/landing)")
    generate.add_argument("--truth", help="ground-truth folder (default $PERSONA_HOME/ground_truth)")
    generate.add_argument(
        "--if-empty", action="store_true", help="do nothing if the landing zone has updates"
    )
    generate.set_defaults(handler=cmd_generate)

    run = commands.add_parser("run", help="run the chain for a range of days through the Dagster instance")
    run.add_argument("--start", type=_parse_day, help="first day (default: first landed day)")
    run.add_argument("--end", type=_parse_day, help="last day, inclusive (default: last landed day)")
    run.add_argument("--verbose", action="store_true", help="show Dagster's step logs")
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser(
        "demo",
        help="the whole loop on the landed demo fleet: offers, simulated feedback, new weights, "
        "new offers; then the last day's offers with the initial and with the learned weights",
    )
    demo.add_argument("--rounds", type=int, default=2, help="feedback rounds, one per last day (default 2)")
    demo.add_argument("--seed", type=int, default=11, help="random seed of the responses (default 11)")
    demo.set_defaults(handler=cmd_demo)

    simulate = commands.add_parser(
        "simulate-feedback",
        help="write a feedback batch answering the offers not answered yet, as the demo's people would",
    )
    simulate.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    simulate.add_argument(
        "--batch", type=_parse_batch_id, help="batch id (default: sim-<offer day>-<number>)"
    )
    simulate.set_defaults(handler=cmd_simulate_feedback)

    evaluate = commands.add_parser(
        "evaluate",
        help="anomalies: measure the anomaly scores (ROC-AUC and precision at the planted count); "
        "decisions: run the chain and feedback rounds on the scenario fleets and measure flags, "
        "tickets, offers and learning (exit 1 when a target is missed)",
    )
    evaluate.add_argument("what", choices=["anomalies", "decisions"], help="what to evaluate")
    evaluate.add_argument("--devices", type=int, default=3000, help="demo fleet size (default 3000)")
    evaluate.add_argument("--days", type=int, default=7, help="demo fleet days (default 7)")
    evaluate.add_argument("--seed", type=int, default=7, help="demo fleet seed (default 7, as `generate`)")
    evaluate.add_argument("--seeds", type=int, default=5, help="draws per public dataset (default 5)")
    evaluate.add_argument(
        "--home", help="folder for the evaluated demo fleet (kept); default: a temporary folder"
    )
    evaluate.add_argument("--no-demo", action="store_true", help="skip (a), the demo fleet")
    evaluate.add_argument("--no-public", action="store_true", help="skip (b), the public datasets")
    evaluate.add_argument(
        "--scenarios",
        help="decisions: scenarios to run, comma-separated, or 'all' (default: every scenario but 'large')",
    )
    evaluate.add_argument(
        "--quick", action="store_true", help="decisions: each scenario on at most 400 devices and 5 days"
    )
    evaluate.set_defaults(handler=cmd_evaluate)

    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade the persona store's schema (PERSONA_DB_URL) to this version; "
        "every run also does this before its first write",
    )
    migrate.set_defaults(handler=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=Warning, module=r"dagster\..*")
    try:
        return args.handler(args)
    except CommandError as exc:
        from persona_pipeline.secrets import mask_url

        print(f"persona-pipeline: {mask_url(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for the person at the terminal; the traceback goes to a log file
        from persona_pipeline.config_files import ConfigError
        from persona_pipeline.secrets import mask_url

        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, ConfigError):
            message = "invalid configuration: " + " / ".join(str(exc).splitlines())
        where = _write_traceback(exc)
        details = f" (details in {where})" if where else ""
        print(f"persona-pipeline: {mask_url(message)}{details}", file=sys.stderr)
        return 1


def _write_traceback(exc: BaseException) -> Path | None:
    import traceback

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return write_failure_log(f"persona-pipeline-{stamp}", "".join(traceback.format_exception(exc)))


if __name__ == "__main__":
    sys.exit(main())
