"""`alignpipe label runs/<recipe>/<label stage> [--host H --allow-remote] [--port P]`: serve the labelling page
over a label stage's queue (labelling/server.py). The stage (run by `alignpipe run`) waits for the labels and
completes once its `min_labels` are in; this command can be stopped and started again at any time."""

from __future__ import annotations

from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.labelling.queue import QUEUE_FILE
from alignpipe.labelling.server import serve
from alignpipe.runfolder.manifests import read_manifest
from alignpipe.runfolder.versions import next_dir


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("label", help="serve the labelling page of a label stage's queue")
    p.add_argument("stage_dir", help="runs/<recipe>/<label stage>")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host; every request must then carry the printed access token")
    p.set_defaults(func=cmd_label)


def queue_folder(stage_dir: Path) -> Path:
    """The folder whose queue is labelled: the stage folder, or its new attempt (`.next/<stage>`) while a re-run
    of a complete stage waits for labels."""
    side = next_dir(stage_dir)
    if (side / QUEUE_FILE).is_file() and (read_manifest(side) or {}).get("status") != "complete":
        return side
    if (stage_dir / QUEUE_FILE).is_file():
        return stage_dir
    raise RunError("no labelling queue here", where=str(stage_dir),
                   fix="give a label stage's folder, after `alignpipe run` has started that stage")


def cmd_label(args) -> int:
    folder = queue_folder(Path(args.stage_dir))
    manifest = read_manifest(folder) or {}
    wanted = (manifest.get("resolved_config") or {}).get("min_labels") or 0
    target = wanted if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > 0 else 0
    serve(folder, args.host, args.port, args.allow_remote, target)
    return 0
