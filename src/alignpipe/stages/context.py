"""What a stage's `run(ctx)` receives: its config, its folder, its parent, and the recipe-wide settings."""

from __future__ import annotations

# Heavy imports (torch) stay inside the functions that use them: the CLI starts without them.
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.data.world import WorldConfig
from alignpipe.data.world_tools import make_world
from alignpipe.models.loading import checkpoint_dir, load_pretrained, load_stage_model, load_tokenizer
from alignpipe.models.template_checks import add_stop_token, use_end_of_turn_as_eos
from alignpipe.recipe.kinds import kind_of
from alignpipe.recipe.schema import Recipe, StageConfig
from alignpipe.recipe.templates import resolve_template
from alignpipe.runfolder.manifests import manifest_hash
from alignpipe.runtime.tracking import report_to


@dataclass
class StageContext:
    recipe: Recipe
    name: str  # the stage's name in the recipe (e.g. "dpo_ipo")
    config: StageConfig
    dir: Path  # runs/<recipe>/<stage>/
    parent_dir: Path | None  # the `from` stage's folder, None when starting from the recipe's model
    resume: bool = True  # resume from the newest checkpoint in dir/checkpoints (False: --restart)
    # set by the runner when a stage of `Recipe.evaluated_with(name)` is being built beside this one: blocks until
    # that stage is complete (the evaluation calls it before it scores with that stage); None: nothing to wait for
    await_stage: Callable[[str], None] | None = None

    @property
    def kind(self):
        """The stage's kind, as its module declared it (`alignpipe.recipe.kinds.StageKind`)."""
        return kind_of(self.config.kind)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    @functools.cached_property
    def chat_template(self) -> str | None:
        return resolve_template(self.recipe.chat_template, self.recipe.path)

    @functools.cached_property
    def world(self):
        """The embedded task world of this recipe (its seed is the recipe's unless `world.seed` is set)."""
        overrides = {"seed": self.recipe.seed, **self.recipe.world}
        return _shared_world(WorldConfig(**overrides))

    def stage_dir(self, stage: str) -> Path:
        return self.recipe.stage_dir(stage)

    def base_model_ref(self) -> dict[str, Any]:
        """Where this stage's starting weights come from, recorded in its manifest for LoRA reloads: a
        stage of the same run folder (by name and manifest hash, so the run folder can move and the
        version is found in the stage's history after a re-run), or the recipe's model as written."""
        if self.parent_dir is not None:
            return {"stage": self.config.from_, "manifest_sha256": manifest_hash(self.parent_dir)}
        return {"path": self.recipe.model_source}

    def load_tokenizer(self):
        """The tokenizer this stage starts from, with the recipe's chat template applied."""
        source = checkpoint_dir(self.parent_dir) if self.parent_dir else self.recipe.model_source
        tok = load_tokenizer(source, self.recipe.model)
        if self.chat_template is not None:
            tok.chat_template = self.chat_template
        if self.kind.chat:  # chat stages stop where the template ends a turn

            use_end_of_turn_as_eos(tok)
        return tok

    @functools.cached_property
    def _stop_token_id(self) -> int | None:
        return self.load_tokenizer().eos_token_id

    def load_model(self, model_class=None):
        """The model this stage starts from: the parent's checkpoint or the recipe's model. Its
        generation config stops at the tokenizer's EOS (the template's end-of-turn token)."""
        if self.parent_dir is not None:
            model = load_stage_model(self.parent_dir, self.recipe.model, model_class)
        else:
            model = load_pretrained(self.recipe.model_source, self.recipe.model, model_class)
        if self.kind.chat:
            add_stop_token(model, self._stop_token_id)
        return model

    def trainer_args(self, config_class, **defaults: Any):
        """The stage's TRL/transformers config: alignpipe's defaults, overridden by the recipe's `trainer:`."""
        import torch

        cpu = not torch.cuda.is_available()
        # transformers 5 takes the TensorBoard folder from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.logs_dir)
        args: dict[str, Any] = dict(
            output_dir=str(self.checkpoints_dir),
            report_to=report_to(self.recipe),  # the recipe's `tracking:` (tensorboard by default)
            run_name=self.name,  # the trackers' run of this stage (tracking.py) ...
            project=self.recipe.name,  # ... in the recipe's project (trackio; W&B and MLflow are told so directly)
            seed=self.seed,
            data_seed=self.seed,
            use_cpu=cpu,
            bf16=not cpu and torch.cuda.is_bf16_supported(),
            logging_steps=10,
            save_strategy="steps",
            save_steps=self.config.checkpoint_every or 500,
            save_total_limit=2,
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=True,
            ddp_find_unused_parameters=False,  # several processes: every trainable parameter gets a gradient
        )
        fields = set(getattr(config_class, "__dataclass_fields__", {}))
        if "activation_checkpointing" in fields:  # TRL turns it on by default; it only costs time on small models
            args["activation_checkpointing"] = False
        elif "gradient_checkpointing" in fields:
            args["gradient_checkpointing"] = False
        args.update(defaults)
        args.update(self.config.trainer)
        return config_class(**args)


def make_context(recipe: Recipe, name: str, resume: bool = True) -> StageContext:
    """The context of stage `name` of `recipe`, in its own folder, its parent the `from` stage's."""
    cfg = recipe.stages[name]
    parent = recipe.stage_dir(cfg.from_) if cfg.from_ else None
    return StageContext(recipe=recipe, name=name, config=cfg, dir=recipe.stage_dir(name), parent_dir=parent,
                        resume=resume)


@functools.lru_cache(maxsize=4)
def _shared_world(config):
    """One World per config in a process: every stage context (upstream ones too, for fingerprints) asks for
    it, and building it plus hashing its rows took ~0.5-1 s each time (make bench, benchmarks/README.md)."""
    return make_world(config)  # a ToolWorld with `world: {tool_share: ...}` (data/world_tools.py)
