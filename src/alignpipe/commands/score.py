"""`alignpipe score RUN_DIR/reward --prompt P --response R [--response R2 ...]` or `--jsonl FILE`:
print a reward model's scores. Raw and normalised ((score - mean) / std, as PPO sees them).

RUN_DIR may be the reward stage's folder, its `model/` folder, or a run folder with one reward stage.
Batch mode reads one `{"prompt": ..., "response": ...}` object per line (`-` for stdin) and writes the
same objects back with `reward` and `reward_normalised` added.
"""

from __future__ import annotations

# Heavy imports (torch) stay inside the functions that use them: the CLI starts without them.
import json
import os
import sys
from pathlib import Path

from alignpipe.errors import AlignpipeError, RunError, terminal_safe
from alignpipe.recipe.kinds import is_scorer_manifest
from alignpipe.reward.artifact import STATS_FILE, load_reward_model, score
from alignpipe.runfolder.manifests import read_manifest


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score responses with a reward stage's model")
    p.add_argument("run_dir", help="runs/<recipe>/<reward stage> (or runs/<recipe> when it has one reward stage)")
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--response", action="append", default=[], help="an assistant reply (repeat to compare several)")
    p.add_argument("--jsonl", metavar="FILE", help="batch mode: JSON lines with prompt and response ('-': stdin)")
    p.add_argument("--batch-size", type=int, default=64)
    from alignpipe.commands.chat import code_flags

    code_flags(p)
    p.set_defaults(func=cmd_score)


def find_reward_stage(path: Path) -> Path:
    """A reward stage folder (or model folder) from what the user typed."""
    if (path / STATS_FILE).is_file() or (path / "model" / STATS_FILE).is_file() or read_manifest(path):
        return path
    if not path.is_dir():
        raise RunError("no such folder", where=str(path), fix="give runs/<recipe>/<reward stage>")

    found = sorted(d for d in path.iterdir() if is_scorer_manifest(read_manifest(d)))
    if len(found) == 1:
        return found[0]
    if not found:
        raise RunError("no reward stage here", where=str(path),
                       fix="build one (make reward) and give runs/<recipe>/<reward stage>")
    raise RunError(f"several reward stages: {', '.join(d.name for d in found)}", where=str(path),
                   fix="name one: runs/<recipe>/<stage>")


def read_jsonl(name: str) -> list[dict]:
    fh = sys.stdin if name == "-" else open(name)
    rows = []
    with fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise AlignpipeError(f"not JSON: {err.msg}", where=f"{name}:{number}", fix="one JSON object per line")
            response = row.get("response", row.get("completion")) if isinstance(row, dict) else None
            if not isinstance(row.get("prompt") if isinstance(row, dict) else None, (str, list)) or \
                    not isinstance(response, (str, list)):
                raise AlignpipeError("needs a `prompt` and a `response` (text or messages)", where=f"{name}:{number}",
                                     fix='write {"prompt": "...", "response": "..."}')
            rows.append(row)
    return rows


def cmd_score(args) -> int:
    if bool(args.jsonl) == bool(args.prompt or args.response):
        raise AlignpipeError("give either --prompt with --response, or --jsonl FILE",
                             fix='alignpipe score runs/default/reward --prompt "what is 2 plus 3?" --response "..."')
    if args.prompt is not None and not args.response:
        raise AlignpipeError("--prompt without --response", fix="add --response TEXT (repeat it to compare several)")
    if args.response and args.prompt is None:
        raise AlignpipeError("--response without --prompt", fix="add --prompt TEXT")
    rows = read_jsonl(args.jsonl) if args.jsonl else [{"prompt": args.prompt, "response": r} for r in args.response]
    stage = find_reward_stage(Path(args.run_dir))

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from alignpipe.recipe.schema import ModelSpec

    artifact = load_reward_model(stage, ModelSpec(trust_remote_code=args.trust_remote_code,
                                                  allow_pickle=args.allow_pickle))
    responses = [r.get("response", r.get("completion")) for r in rows]
    scores = score(artifact, [r["prompt"] for r in rows], responses, args.batch_size)
    normalised = artifact.normalise(scores)
    if args.jsonl:
        for row, s, n in zip(rows, scores, normalised):
            print(json.dumps({**row, "reward": s, "reward_normalised": n}))
    else:
        print(f"{'reward':>9} {'normalised':>10}  response")
        for r, s, n in zip(args.response, scores, normalised):
            print(f"{s:9.4f} {n:10.4f}  {terminal_safe(r)}")
    return 0
