"""`alignpipe label runs/<recipe>/<label stage> [--host H --allow-remote] [--port P]`: serve the labelling page
over a label stage's queue (labelling/server.py). The stage (run by `alignpipe run`) waits for the labels and
completes once its `min_labels` are in; this command can be stopped and started again at any time."""

from __future__ import annotations

from pathlib import Path

from alignpipe.labelling.queue import queue_folder
from alignpipe.labelling.server import serve, target_of


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("label", help="serve the labelling page of a label stage's queue")
    p.add_argument("stage_dir", help="runs/<recipe>/<label stage>")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host; every request must then carry the printed access token")
    p.set_defaults(func=cmd_label)


def cmd_label(args) -> int:
    folder = queue_folder(Path(args.stage_dir))
    serve(folder, args.host, args.port, args.allow_remote, target_of(folder))
    return 0
