"""`alignpipe world export DIR`: the embedded task world as ordinary files, in the formats a user brings,
so the same recipe can run on them through the user-data path (and be compared with the embedded one).

    corpus.jsonl, corpus_eval.jsonl   text                      (pretrain)
    conversations.jsonl               messages                  (sft)
    pairs.jsonl, pairs_eval.jsonl     prompt/chosen/rejected    (reward, dpo)
    rl_prompts.jsonl                  prompt                    (ppo, grpo, rloo)
    prompts.jsonl                     prompt + answer + kind    (eval.prompts: the held-out prompts)

The world is the recipe's (`--recipe`: its seed and `world:` overrides), else the default one.
"""

from __future__ import annotations

import json
from pathlib import Path

FILES = ("corpus", "corpus_eval", "conversations", "pairs", "pairs_eval", "rl_prompts", "prompts")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("world", help="the embedded task world: `world export DIR` writes it as files")
    sub = p.add_subparsers(dest="world_command", required=True)
    e = sub.add_parser("export", help="write the embedded world as ordinary data files")
    e.add_argument("dir", help="folder to write (created)")
    e.add_argument("--recipe", default=None, help="take the world's seed and overrides from this recipe")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides (with --recipe)")
    e.set_defaults(func=cmd_export)


def world_rows(world) -> dict[str, list[dict]]:
    return {
        "corpus": [{"text": d} for d in world.corpus()],
        "corpus_eval": [{"text": d} for d in world.corpus_eval()],
        "conversations": world.sft_rows(),
        "pairs": world.preference_rows("train"),
        "pairs_eval": world.preference_rows("eval"),
        "rl_prompts": world.rl_prompts(),
        "prompts": world.eval_prompts(),
    }


def cmd_export(args) -> int:
    from alignpipe.data.world import World, WorldConfig

    overrides: dict = {}
    if args.recipe:
        from alignpipe.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.set)
        overrides = {"seed": recipe.seed, **recipe.world}
    world = World(WorldConfig(**overrides))
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in world_rows(world).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}.jsonl: {len(rows)} rows")
    return 0
