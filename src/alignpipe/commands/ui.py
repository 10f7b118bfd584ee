"""`alignpipe ui [RUNS_DIR] [--host H --allow-remote] [--port P]`: a local web page over the runs under
RUNS_DIR (default runs/): each run's lineage, live progress and ETA, a stage's curves, verdicts and gates, its
samples beside its parent's, and compare (ui/server.py). It reads the run folders and writes nothing to them."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ui", help="a local web page over run folders: lineage, progress, curves, samples")
    p.add_argument("runs_dir", nargs="?", default="runs", help="the folder of runs (default runs/), or one run")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8770, help="port (default 8770; 0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host; every request must then carry the printed access token")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    from alignpipe.ui.server import serve  # the page's modules load only when it is asked for

    serve(Path(args.runs_dir), args.host, args.port, args.allow_remote)
    return 0
