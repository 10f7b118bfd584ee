"""`alignpipe show <run dir>`: print the lineage and metrics of a run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alignpipe.errors import RunError
from alignpipe.pipeline.runner import summary_table
from alignpipe.runfolder import versions as stage_versions
from alignpipe.runfolder.manifests import read_manifest, read_named_file


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("show", help="print the lineage and metrics of a run")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    root = Path(args.run_dir)
    dirs = [root] if (root / "manifest.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    manifests = _in_recipe_order({d.name: m for d in dirs if (m := read_manifest(d))})
    if not manifests:
        raise RunError("no stage manifests found", where=str(root), fix="give runs/<recipe> or runs/<recipe>/<stage>")
    if args.json:
        print(json.dumps(manifests, indent=2))
        return 0
    for name, m in manifests.items():
        chain = " -> ".join([*m.get("lineage", []), name])
        print(f"{name}: {m.get('kind')} [{m.get('status')}] version {stage_versions.version_of(m)} lineage: "
              f"{chain}; parent: {(m.get('parent') or {}).get('stage', m.get('base_model'))}")
        stage_dir = next(d for d in dirs if d.name == name)
        for line in stage_versions.describe_versions(stage_dir):
            print(f"  {line}")
    print(summary_table(manifests))
    return 0


def _in_recipe_order(manifests: dict[str, dict]) -> dict[str, dict]:
    """Stages in the order their recipe lists them (then any it no longer lists, oldest first)."""
    order: list[str] = []
    for m in manifests.values():
        text = read_named_file(m.get("recipe") or "")  # bounded: a manifest may name /dev/zero
        try:
            order = [str(s) for s in (yaml.safe_load(text) or {}).get("stages") or []] if text else []
            if order:
                break
        except (yaml.YAMLError, AttributeError, TypeError, RecursionError):
            continue
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(manifests.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[1].get("started_at", ""))))
