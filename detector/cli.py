"""`python -m detector`: the streaming-pull worker and the tools around the detection core.

    schemas   write (or --check) the schema files in schemas/
    rules     check a rules file against the variables the detector provides
    worker    decide transactions from a pull subscription (detector/worker/)
    replay    backtest: run the detector over a file of transactions (detector/offline/)
    train     train the risk model from a file of transactions (detector/offline/)
    redrive   republish dead letters to the topic they came from (detector/redrive.py)

`replay` and `train` exist where detector/offline/ is installed; the worker's image leaves
it out.

User mistakes end as one line `error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from detector import schemas
from detector.config import DetectorConfig, load_risk_model, load_rules, state_config
from detector.errors import DetectorError
from detector.redrive import add_redrive
from detector.worker.command import add_worker

__all__ = ["main"]


def _schemas(args: argparse.Namespace) -> int:
    if args.check:
        stale = schemas.stale()
        if stale:
            print(f"error: out of date, run python -m detector schemas: {', '.join(stale)}")
            return 1
        print("schemas are up to date")
        return 0
    for path in schemas.write():
        print(f"wrote {path}")
    return 0


def _add_schemas(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("schemas", help="write the schema files in schemas/")
    parser.add_argument("--check", action="store_true", help="only check they are up to date")
    parser.set_defaults(run=_schemas)


def _rules(args: argparse.Namespace) -> int:
    config = DetectorConfig(rules_file=Path(args.file), model_path=args.model)
    ruleset = load_rules(config, state_config(load_risk_model(config)))
    print(f"{args.file}: {len(ruleset.rules)} rules, version {ruleset.version}: ok")
    return 0


def _add_rules(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("rules", help="check a rules file before deploying it")
    parser.add_argument("file", help="the rules file (YAML)")
    parser.add_argument(
        "--model", help="model artifact whose windows rules may read (default: bundled)"
    )
    parser.set_defaults(run=_rules)


AddCommand = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

#: Functions that add one subcommand each; the subcommand sets `run` on its namespace.
COMMANDS: list[AddCommand] = [_add_schemas, _add_rules, add_redrive, add_worker]


def _offline_commands() -> list[AddCommand]:
    """`replay` and `train`, where detector/offline/ is installed."""
    try:
        from detector.offline.commands import add_replay, add_train
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("detector.offline"):
            raise
        return []
    return [add_replay, add_train]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    # `python -m detector` or the installed `fraud-detector` command, as it was called.
    called = Path(sys.argv[0]).name
    prog = "python -m detector" if called in ("__main__.py", "-c", "") else called
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (*COMMANDS, *_offline_commands()):
        add(commands)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (DetectorError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
