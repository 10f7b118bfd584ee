"""`alignpipe validate <recipe>`: check a recipe and its data without training (and the recipe check that
`run` makes first)."""

from __future__ import annotations

from alignpipe.errors import RecipeError
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import Recipe
from alignpipe.runtime.threads import check_env


def recipe_args(p) -> None:
    p.add_argument("recipe", help="path to a recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set stages.sft.trainer.max_steps=10")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a recipe and its data without training")
    recipe_args(p)
    p.set_defaults(func=cmd_validate)


def load_valid(args, show_data: bool = False) -> Recipe:
    """The recipe `args` name, with its overrides, validated; `--stages` (when given) must name its stages."""
    check_env()
    recipe = load_recipe(args.recipe, args.set)
    validate(recipe, show_data)
    if getattr(args, "stages", None):
        unknown = [s for s in args.stages if s not in recipe.stages]
        if unknown:
            raise RecipeError(f"no stage named {unknown[0]!r}", where=str(recipe.path), key="--stages",
                              fix=f"choose from {', '.join(recipe.stages)}")
    return recipe


def cmd_validate(args) -> int:
    recipe = load_valid(args, show_data=True)
    print(f"{recipe.path}: ok ({len(recipe.stages)} stages: {', '.join(recipe.order())})")
    return 0
