"""`alignpipe world export DIR`: the embedded task world as ordinary files, in the formats a user brings,
so the same recipe can run on them through the user-data path (and be compared with the embedded one).

    corpus.jsonl, corpus_eval.jsonl            text                      (pretrain)
    conversations.jsonl, conversations_eval    messages                  (sft)
    pairs.jsonl, pairs_eval.jsonl              prompt/chosen/rejected    (reward, dpo)
    rl_prompts.jsonl                           prompt                    (ppo, grpo, rloo)
    prompts.jsonl                              prompt + answer + kind    (eval.prompts: the held-out prompts)

The world is the recipe's (`--recipe`: its seed and `world:` overrides), else the default one. With
`--recipe`, `DIR/recipe.yaml` is that recipe on these files: each `{embedded: part}` becomes the part's file,
the part's held-out sibling becomes the stage's explicit held-out file (`eval: {data: ...}`, so no prompt is
hashed out of training: `alignpipe.data.split`), every stage is evaluated on `prompts.jsonl` with the world's
judge named as an ordinary verifier. It trains on the same rows and evaluates on the same prompts as the
embedded recipe.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from alignpipe.data.world import WorldConfig
from alignpipe.data.world_tools import make_world
from alignpipe.eval.verifiers import EMBEDDED
from alignpipe.recipe.kinds import kind_of
from alignpipe.recipe.parse import apply_override, load_recipe, yaml_load

FILES = ("corpus", "corpus_eval", "conversations", "conversations_eval", "pairs", "pairs_eval", "rl_prompts",
         "prompts")
# embedded part -> (its file, the held-out file of a stage that splits it)
PART_FILES = {"corpus": ("corpus", "corpus_eval"), "sft": ("conversations", "conversations_eval"),
              "pairs": ("pairs", "pairs_eval"), "rl_prompts": ("rl_prompts", None)}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("world", help="the embedded task world: `world export DIR` writes it as files")
    sub = p.add_subparsers(dest="world_command", required=True)
    e = sub.add_parser("export", help="write the embedded world as ordinary data files (and the recipe on them)")
    e.add_argument("dir", help="folder to write (created)")
    e.add_argument("--recipe", default=None, help="take the world's seed and overrides from this recipe, and write "
                                                  "DIR/recipe.yaml: that recipe on the exported files")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides (with --recipe)")
    e.set_defaults(func=cmd_export)


def world_rows(world) -> dict[str, list[dict]]:
    return {
        "corpus": [{"text": d} for d in world.corpus()],
        "corpus_eval": [{"text": d} for d in world.corpus_eval()],
        "conversations": world.sft_rows(),
        "conversations_eval": world.sft_eval_rows(),
        "pairs": world.preference_rows("train"),
        "pairs_eval": world.preference_rows("eval"),
        "rl_prompts": world.rl_prompts(),
        "prompts": world.eval_prompts(),
    }


def files_recipe(data: dict, kinds: dict[str, str], world) -> dict:
    """A raw recipe (a YAML mapping; `kinds`: stage -> kind) with its embedded data replaced by the exported
    files beside it."""
    out = json.loads(json.dumps(data))  # a copy without shared parts (YAML anchors): each stage is edited alone
    out["name"] = f"{data['name']}-files"
    out.pop("world", None)  # no stage reads the embedded world any more
    for name, stage in out["stages"].items():
        part = (stage.get("data") or {}).get("embedded")
        if part is None:
            continue
        kind = kind_of(kinds[name])
        train, held = PART_FILES[part]
        stage["data"] = {"path": f"{train}.jsonl"}
        ev = stage.setdefault("eval", {})
        ev.setdefault("prompts", "prompts.jsonl")
        ev.setdefault("judges", {}).setdefault("judge", {"verifier": EMBEDDED})
        if held and kind.user_split:
            ev["data"] = {"path": f"{held}.jsonl"}
        if "eval_pairs" in {f.name for f in dataclasses.fields(kind.config)}:  # the world scores every held-out pair
            stage.setdefault("eval_pairs", world.config.n_eval_pairs)
        if (stage.get("ptx_data") or {}).get("embedded") == "corpus":
            stage["ptx_data"] = {"path": "corpus.jsonl"}
    return out


def cmd_export(args) -> int:
    data, kinds, overrides = None, {}, {}
    if args.recipe:
        recipe = load_recipe(args.recipe, args.set)
        overrides = {"seed": recipe.seed, **recipe.world}
        data = yaml_load(Path(args.recipe).read_text())
        for item in args.set:
            apply_override(data, item, args.recipe)
        kinds = {name: cfg.kind for name, cfg in recipe.stages.items()}
    world = make_world(WorldConfig(**overrides))  # a ToolWorld with `tool_share` (data/world_tools.py)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in world_rows(world).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}.jsonl: {len(rows)} rows")
    if data is not None:
        text = (f"# {args.recipe} on the files `alignpipe world export` wrote beside this file: the same rows, the same\n"
                f"# held-out prompts, the world's judge as a verifier (alignpipe run {out / 'recipe.yaml'})\n")
        (out / "recipe.yaml").write_text(text + yaml.safe_dump(files_recipe(data, kinds, world), sort_keys=False))
        print(f"{out / 'recipe.yaml'}: {args.recipe} on these files")
    return 0
