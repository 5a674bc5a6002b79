"""The ``sweep`` and ``leaderboard`` commands: their arguments and the ``sweep`` handler, importing no Optuna.

:mod:`vision_peft.cli` builds its parser from :func:`add_sweep_parser` and :func:`add_leaderboard_parser`, so
``python -m vision_peft --help`` (and every other command) never imports optuna, sqlalchemy or matplotlib; those
load when a ``sweep`` or ``leaderboard`` command runs (:mod:`vision_peft.sweep`, :mod:`vision_peft.leaderboard`).
``python -m vision_peft.sweep …`` (the extra workers of a sweep) reads the same arguments (:func:`vision_peft.sweep.main`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

SWEEP_HELP = "search methods and hyperparameters with Optuna; one run dir per trial"
LEADERBOARD_HELP = "table, leaderboard.csv and a Pareto plot of a sweep"


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``sweep`` for ``python -m vision_peft``; the handler is :func:`cli_main` (set as ``func``)."""
    p = subparsers.add_parser("sweep", help=SWEEP_HELP)
    sweep_arguments(p)
    p.set_defaults(func=cli_main)
    return p


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sweep`` command's arguments (``--heartbeat`` defaults to None: ``sweep_study.HEARTBEAT_S``)."""
    p.add_argument("recipe", nargs="?", help="YAML recipe path or name in tasks/")
    p.add_argument("--space", help="space file (YAML): keys, choices/ranges, per-method sub-spaces, constraints")
    p.add_argument("--trials", type=int, help="trials in the study in total (an existing study continues)")
    p.add_argument("--storage", help="SQLAlchemy URL (default: sqlite in the sweep folder)")
    p.add_argument("--study", help="study name (default <recipe>-<space>)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the storage")
    p.add_argument("--timeout", type=float, help="minutes after which no new trial starts")
    p.add_argument("--seed", type=int, default=0, help="TPE seed and every trial's train.seed")
    p.add_argument("--out", help="sweep folder (default runs/sweeps/<study>)")
    p.add_argument("--device", help="train.device of the trials (default: the recipe's)")
    p.add_argument("--join", metavar="URL", help="be an extra worker of the study --study in this storage")
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # epoch seconds (workers started by a sweep)
    p.add_argument("--heartbeat", type=int, help="seconds between a worker's heartbeats (default: HEARTBEAT_S "
                   "of vision_peft.sweep_study)")  # fmt: skip
    p.add_argument("--no-posthoc", action="store_true", help="evaluate test for the selected best only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_leaderboard_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``leaderboard`` for ``python -m vision_peft``; the handler is :func:`leaderboard_main` (set as ``func``)."""
    p = subparsers.add_parser("leaderboard", help=LEADERBOARD_HELP)
    leaderboard_arguments(p)
    p.set_defaults(func=leaderboard_main)
    return p


def leaderboard_arguments(p: argparse.ArgumentParser) -> None:
    """The ``leaderboard`` command's arguments."""
    p.add_argument("sweep_dir", nargs="?", help="sweep folder (holding study.db)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study")
    p.add_argument("--study", help="study name")
    p.add_argument("--out", help="where leaderboard.csv / .png go (default: the sweep folder)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")


def leaderboard_main(args: argparse.Namespace) -> int:
    """Run the ``leaderboard`` command (:func:`vision_peft.leaderboard.cli_main`; optuna loads here)."""
    from vision_peft.leaderboard import cli_main as leaderboard_cli_main

    return leaderboard_cli_main(args)


def cli_main(args: argparse.Namespace) -> int:
    """Run the ``sweep`` command (prints the selection as JSON). SIGTERM and Ctrl-C stop the running trial's process
    group, fail it and queue one retry, then exit 130; user errors propagate (the caller prints them)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _command(args)
    except KeyboardInterrupt as e:
        print(f"sweep interrupted ({e or 'Ctrl-C'}): a running trial is failed and queued again", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command(args: argparse.Namespace) -> int:
    from vision_peft.sweep import (
        HEARTBEAT_S,
        SweepError,
        _bar,
        budget_done,
        make_context,
        redact,
        run_sweep,
        run_worker,
    )

    if args.join:
        if not args.study:
            raise SweepError("--join URL needs --study NAME (the study to work on)")
        heartbeat = HEARTBEAT_S if args.heartbeat is None else args.heartbeat
        ctx = make_context(args.join, args.study, args.out, args.device, args.deadline, heartbeat)
        n = run_worker(ctx, None if args.no_progress else _bar(budget_done(ctx.study)[1]))
        print(json.dumps({"study": args.study, "trials_run": n}))
        return 0
    if not (args.recipe and args.space and args.trials):
        raise SweepError("sweep needs <recipe> --space FILE --trials N (or --join URL --study NAME)")
    res = run_sweep(args.recipe, args.space, args.trials, args.storage, args.study, args.workers, args.timeout,
                    args.seed, args.out, args.device, not args.no_posthoc, not args.no_progress)  # fmt: skip
    sel = (res["best"] or {}).get("selected")
    shown = {k: res[k] for k in ("sweep_dir", "study", "leaderboard")} | {"storage": redact(res["storage"])}
    print(json.dumps(shown | {"selected": sel}, indent=2))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
