"""A stage's chat template and tokenizer against its parents', before it trains: the run-folder side of the
template checks (`alignpipe.models.template_checks` checks the template itself).

Every upstream stage (`from`, `reward_model`) must have saved the same vocabulary and chat template as this
stage's, and its tokenizer files must be the ones its manifest recorded; a parent's saved template must be
the recipe's. The runner calls `check_stage_templates` before each stage; `validate` calls it without the
parents (they may not be built yet).
"""

from __future__ import annotations

# Heavy imports (transformers) stay inside the functions that use them: the CLI starts without them.
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.models import loading as modeling
from alignpipe.models.template_checks import TemplateError, check_template, stop_ids_list, tokenizer_signature
from alignpipe.recipe.kinds import references
from alignpipe.recipe.schema import Recipe
from alignpipe.recipe.templates import resolve_template
from alignpipe.runfolder import manifests as runs


def _check_upstream(ctx, upstream: str, signature: dict, key: str) -> None:
    up_dir = ctx.stage_dir(upstream)
    model_dir = modeling.checkpoint_dir(up_dir)
    manifest = runs.read_manifest(up_dir) or {}
    # its tokenizer files must be the ones it finished with (the manifest hashed them)
    for name, recorded in (manifest.get("outputs") or {}).items():
        path = model_dir / name
        if name != "model" and path.is_file() and runs.fingerprint_path(path) != recorded:
            raise RunError(f"{name} of stage {upstream!r} changed after that stage completed", where=str(path),
                           key=key, fix=f"restore it, or re-run {upstream!r} with --force")
    if not (model_dir / "tokenizer_config.json").is_file():
        return
    theirs = tokenizer_signature(modeling.load_tokenizer(model_dir, ctx.recipe.model))
    if theirs["vocab_sha256"] != signature["vocab_sha256"]:
        raise RunError(f"stage {upstream!r} was trained with a different tokenizer ({theirs['vocab_size']} tokens) "
                       f"than this stage's ({signature['vocab_size']} tokens)", where=str(model_dir), key=key,
                       fix=f"re-run {upstream!r} with --force so both use the recipe's model")
    if theirs["chat_template_sha256"] != signature["chat_template_sha256"]:
        raise RunError(f"stage {upstream!r} was trained with a different chat template than this stage's "
                       f"({ctx.recipe.chat_template!r})", where=str(model_dir), key=key,
                       fix=f"use the template {upstream!r} was trained with, or re-run it with --force")


def _generation_eos(ctx) -> list[int]:
    """Stop tokens from the generation config next to the weights this stage starts from (local only)."""
    from transformers import GenerationConfig  # heavy: imported when a stage is checked

    source = modeling.checkpoint_dir(ctx.parent_dir) if ctx.parent_dir else Path(ctx.recipe.model_source or "")
    if not (Path(source) / "generation_config.json").is_file():
        return []
    try:
        return stop_ids_list(GenerationConfig.from_pretrained(str(source)).eos_token_id)
    except (OSError, ValueError):
        return []


def check_stage_templates(ctx, tokenizer=None, against_parents: bool = True) -> dict:
    """All checks for one stage, before it trains. Returns the report the runner keeps in the manifest.
    `against_parents=False` (validate, while the parents are still to be built): the template and EOS only."""
    cfg, recipe = ctx.config, ctx.recipe
    if ctx.parent_dir is None and recipe.model.init is not None:
        return {"skipped": "this stage trains its tokenizer; its children check it"}
    if against_parents:
        check_parent_template(recipe, ctx.name)
    tokenizer = tokenizer if tokenizer is not None else ctx.load_tokenizer()
    signature = tokenizer_signature(tokenizer)
    if cfg.from_ and against_parents:
        _check_upstream(ctx, cfg.from_, signature, f"stages.{ctx.name}.from")
    for field_name, upstream in references(cfg).items():
        if against_parents:
            _check_upstream(ctx, upstream, signature, f"stages.{ctx.name}.{field_name}")
    if not ctx.kind.chat:  # plain text: the template is only carried along for later stages
        return {"tokenizer": signature, "template": "not used by pretraining"}
    assistant_mask = ctx.kind.assistant_loss and cfg.trainer.get("assistant_only_loss", True)
    try:
        report = check_template(tokenizer, assistant_mask=assistant_mask, generation_eos=_generation_eos(ctx))
    except TemplateError as err:  # name the recipe and the stage
        raise TemplateError(f"stage {ctx.name!r}, template {recipe.chat_template!r}: {err.what}",
                            where=str(recipe.path), key="chat_template", fix=err.fix) from None
    return {"tokenizer": signature, **report}


def check_parent_template(recipe: Recipe, stage: str) -> None:
    """A stage refuses a parent whose saved chat template differs from the recipe's."""
    cfg = recipe.stages[stage]
    if cfg.from_ is None:
        return
    template = resolve_template(recipe.chat_template, recipe.path)
    saved = recipe.stage_dir(cfg.from_) / "model" / "chat_template.jinja"
    if template is not None and saved.is_file() and saved.read_text().strip() != template.strip():
        raise RunError(f"parent {cfg.from_!r} was trained with a different chat template than this recipe's "
                       f"({recipe.chat_template!r})", where=str(saved), key=f"stages.{stage}.from",
                       fix=f"use the template the parent was trained with, or re-run {cfg.from_!r} with --force")
