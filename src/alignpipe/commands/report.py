"""`alignpipe report runs/<name>`: write runs/<name>/report.md and its figures."""

from __future__ import annotations

import os
from pathlib import Path

from alignpipe.report.document import write_report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write runs/<name>/report.md with figures (lineage, curves, "
                                             "pass rates, reward model, win rates, samples)")
    p.add_argument("run_dir", help="a run folder, runs/<recipe name>")
    p.add_argument("--no-reward-scoring", action="store_true",
                   help="do not load the reward model to score samples that lack a reward (faster; no RM win rates)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # scoring samples with a reward model: see threads.set_threads
    path, figures = write_report(Path(args.run_dir), score_rewards=not args.no_reward_scoring)
    print(f"{path} ({len(figures)} figures)")
    return 0
