"""A complete policy stage loaded for inference: its manifest checked, its model and tokenizer (with the chat
template it trained with), the token ids that end an assistant turn. `alignpipe chat`, `generate`, `export` and
`serve` load a stage this way; trust_remote_code and allow_pickle come from the command line only."""

from __future__ import annotations

from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.models import loading as modeling
from alignpipe.models.loading import spec_from_manifest
from alignpipe.recipe.kinds import is_scorer_manifest
from alignpipe.recipe.templates import END_OF_TURN
from alignpipe.runfolder.manifests import require_complete


def model_spec(manifest: dict, stage_dir: Path | None = None, args=None):
    """The recipe's ModelSpec (dtype, quantisation) as the stage recorded it; trust_remote_code and
    allow_pickle from the command line only (modeling.spec_from_manifest)."""
    where = str(Path(stage_dir) / "manifest.json") if stage_dir is not None else "manifest.json"
    return spec_from_manifest(manifest, where, trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
                              allow_pickle=bool(getattr(args, "allow_pickle", False)))


def stage_manifest(stage_dir: Path) -> dict:
    stage_dir = Path(stage_dir)
    if not (stage_dir / "manifest.json").is_file():
        raise RunError("not a stage folder (no manifest.json)", where=str(stage_dir),
                       fix="give runs/<recipe name>/<stage>, e.g. runs/default/sft")
    manifest = require_complete(stage_dir, needed_by=stage_dir.name)
    if not (stage_dir / "model").is_dir():
        raise RunError("the stage saved no model", where=str(stage_dir / "model"), fix="give a policy stage")

    if is_scorer_manifest(manifest):
        raise RunError("a reward stage scores responses, it does not write them", where=str(stage_dir),
                       fix="give a policy stage (sft, dpo, ppo, ...); score with `alignpipe score`")
    return manifest


def load_stage(stage_dir: Path, args=None):
    """(model in eval mode, tokenizer with its chat template, manifest) of a complete policy stage."""
    stage_dir = Path(stage_dir)
    manifest = stage_manifest(stage_dir)
    spec = model_spec(manifest, stage_dir, args)
    tokenizer = modeling.load_tokenizer(stage_dir / "model", spec)
    if not tokenizer.chat_template:
        raise RunError("the checkpoint's tokenizer has no chat template", where=str(stage_dir / "model"),
                       fix="re-run the stage with a recipe `chat_template`")
    model = modeling.load_stage_model(stage_dir, spec).to(modeling.device()).eval()
    return model, tokenizer, manifest


def stop_ids(tokenizer, manifest: dict) -> list[int]:
    """Token ids that end an assistant turn: EOS, and the template's end-of-turn token if it differs."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    token = END_OF_TURN.get((manifest.get("recipe_settings") or {}).get("chat_template", ""))
    if token is not None:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def cut(ids: list[int], stops: list[int]) -> tuple[list[int], bool]:
    """Response ids up to (not including) the first end-of-turn token; and whether there was one."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i], True
    return ids, False
