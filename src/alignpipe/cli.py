"""The `alignpipe` command. Heavy imports happen inside each command, so `--help` is instant.

Every user-facing problem is an AlignpipeError: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from alignpipe import commands
from alignpipe.errors import AlignpipeError
from alignpipe.runtime.progress import VERBOSE_ENV


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every logged training row and library warning (else: in <stage>/stage.log)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
