"""`alignpipe restore runs/<name>/<stage> VERSION`: bring an earlier version of a stage back from its history.
`alignpipe discard runs/<name>/<stage>`: delete the stage's unfinished new attempt (`.next/<stage>`).

Both hold the run folder's lock, so they never change a folder while a run is writing it.
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.runfolder import versions as stage_versions
from alignpipe.runfolder.lock import RunLock


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("restore", help="make an earlier version of a stage (alignpipe show lists them) "
                                              "the current one again")
    p.add_argument("stage_dir", help="a stage folder, runs/<recipe name>/<stage>")
    p.add_argument("version", type=int, help="the version number, as `alignpipe show` lists it")
    p.set_defaults(func=cmd_restore)

    p = subparsers.add_parser("discard", help="delete a stage's unfinished new attempt (the current version stays)")
    p.add_argument("stage_dir", help="a stage folder, runs/<recipe name>/<stage>")
    p.set_defaults(func=cmd_discard)


def cmd_restore(args) -> int:
    stage_dir = Path(args.stage_dir)
    with RunLock(stage_versions.run_root_of(stage_dir)):
        replaced = stage_versions.restore(stage_dir, args.version)
    kept = f"; version {replaced} is kept in its history" if replaced else ""
    print(f"{stage_dir}: version {args.version} is the current one again{kept}. Stages built on it re-run on the "
          "next `alignpipe run`; a recipe whose config differs from this version's re-trains it (change the "
          "recipe back to keep it)")
    return 0


def cmd_discard(args) -> int:
    stage_dir = Path(args.stage_dir)
    with RunLock(stage_versions.run_root_of(stage_dir)):
        gone = stage_versions.discard(stage_dir)
    if gone is None:
        raise RunError("this stage has no new attempt to discard", where=str(stage_versions.next_dir(stage_dir)),
                       fix="nothing to do; `alignpipe show` lists a stage's versions")
    print(f"{stage_versions.next_dir(stage_dir)}: deleted (version {stage_versions.version_of(gone)}, status "
          f"{gone.get('status')!r}); the current version is unchanged")
    return 0
