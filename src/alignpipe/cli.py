"""The `alignpipe` command. Heavy imports happen inside each command, so `--help` is instant.

Every user-facing problem is an AlignpipeError: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before torch loads libgomp: a worker thread that finds no work spins this many times, then sleeps, instead of
# libgomp's default 300,000. Measured on the 2-core development machine (AMD EPYC, 2026-12-07, the default model's
# pretraining step on 2 threads): idle 73 ms at the default, 84 with 1000 (1-thread step: 119 ms); with other
# processes keeping both cores busy (load ~4-8) 1.9-4.5 s at the default, 0.17-0.46 s with 1000 (1 thread:
# 0.25-0.41 s). It changes how threads wait, never what they compute (the gradients were bit-identical).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from alignpipe import commands  # noqa: E402 (after the line above, which must come before torch loads)
from alignpipe.errors import AlignpipeError  # noqa: E402
from alignpipe.runtime.progress import VERBOSE_ENV  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every logged training row and library warning (else: in <stage>/stage.log)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    return parser


def quiet_other_processes() -> str | None:
    """Under `accelerate launch` / `torchrun` with several processes, the console is rank 0's: the others write
    their stdout and stderr to a file of their own (returned), so each line, the one-line refusals too, shows once."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if not (rank.isdigit() and world.isdigit()) or int(world) <= 1:
        return None
    import tempfile

    run_id = "".join(c for c in os.environ.get("TORCHELASTIC_RUN_ID", "run") if c.isalnum() or c in "-_")[:40]
    path = os.path.join(tempfile.gettempdir(), f"alignpipe-{run_id}-rank{{}}.log")
    if int(rank) == 0:
        print(f"[alignpipe] {world} processes: this console is process 0's; the others write theirs to "
              f"{path.format('N')}", file=sys.stderr, flush=True)
        return None
    path = path.format(rank)
    sys.stdout.flush(), sys.stderr.flush()
    with open(path, "a", encoding="utf-8") as log:  # fds 1 and 2 now point at the file; the Python streams too
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    import time

    # runs append to one file per rank (torchrun's run id is often "none"): each starts with its own line
    print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: alignpipe {' '.join(sys.argv[1:])}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    quiet_other_processes()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose or getattr(args, "verbose_run", False):
        os.environ[VERBOSE_ENV] = "1"  # processes started from here (accelerate launch) inherit it
    try:
        return args.func(args)
    except AlignpipeError as err:
        print(f"alignpipe: error: {err.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
