"""Stage kinds: the contract every kind fills in, and the registry everything else reads.

Each kind is declared once, by its own module in `alignpipe.stages`, as a `StageKind` in the module's `DECLARES` tuple
(a module may declare several kinds, e.g. grpo and rloo): its typed `Config`, its `run(ctx) -> metrics`
(heavy imports inside), its TRL / transformers config class, its data family, the embedded part it
reads, what its model is (a policy that is sampled and judged, or a scorer), the other stages its config
names, and its own recipe checks. Nothing outside the kind's module tests the kind's name: it asks the
registry (`kind_of(name).policy`, `.family`, ...). A kind from elsewhere (a plug-in, a test) is added
with `register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageKind:
    """What a stage kind is. The flags are facts other modules act on; each has one meaning."""

    name: str
    config: type  # the stage's typed config, a `recipe.StageConfig` dataclass (light to import)
    # trains, saves `ctx.model_dir`, returns the manifest's metrics (`alignpipe.stages.context.StageContext`)
    run: Callable[["StageContext"], dict]
    trainer_config: Callable[[], type]  # the TRL / transformers config class its `trainer:` block is checked against
    family: str | None  # the data family a user file is read as (`alignpipe.data.formats.FAMILIES`)
    embedded: str | None  # the part of the embedded world it reads (`data: {embedded: ...}`; None: any part)
    policy: bool = True  # its model answers prompts: sampled, judged, and a start for later policy stages
    scorer: bool = False  # its model scores responses (a reward model), named by other stages' `reward_model`
    chat: bool = True  # trains on chat-templated conversations (False: plain text, from the recipe's model)
    assistant_loss: bool = False  # its loss is on assistant tokens only (the template needs generation markers)
    baseline: bool = False  # the policy that later policies are compared with (`rm_win_rate_vs_sft`)
    trained_on_reward: bool = False  # optimises a reward signal (the report asks whether it hacked it)
    references: tuple[str, ...] = ()  # its config fields that name other stages of the recipe, beside `from`
    # those of `references` that only score its evaluation, never its training (a DPO stage's `reward_model`): a
    # parallel run may start it beside them, and it waits for them before it evaluates (`Recipe.start_after`)
    evaluated_with: tuple[str, ...] = ()
    user_split: bool = False  # its user data is split by the recipe's held-out prompts (`alignpipe.data.split`)
    provides: str | None = None  # the data family its folder gives a stage that reads `data: {from: <it>}`
    max_length: int | None = None  # default tokens per sequence (what `validate --show-data` measures against)
    check: Callable[["Recipe", str, str], None] | None = None  # its own recipe checks (recipe, stage name, file)
    # loads its complete stage folder as a reward scorer (`reward_model: <it>`; alignpipe.reward.artifact's
    # load_reward_model): (stage_dir, ModelSpec | None) -> an object with score / normalise / mean / std.
    # None: a scorer kind's one-output classifier (the reward kind), or no reward at all
    reward_loader: Callable[..., Any] | None = None

    @property
    def aligned(self) -> bool:
        """A chat policy trained from another policy (not the baseline): compared with its start (KL, win rates)."""
        return self.policy and self.chat and not self.baseline


# the package whose modules declare the kinds that ship with alignpipe. It sits above this layer (the kinds' code
# trains models), so it is loaded by name on the registry's first read, as a plug-in is: never at import.
BUILTIN_PACKAGE = "alignpipe.stages"

KINDS: dict[str, StageKind] = {}


def all_kinds() -> dict[str, StageKind]:
    """{name: kind} of every registered kind, the built-in ones included."""
    importlib.import_module(BUILTIN_PACKAGE)
    return KINDS


def register(kind: StageKind) -> StageKind:
    """Add a stage kind (from its module, a plug-in or a test); a second kind of the same name is refused."""
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"stage kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def kind_of(name: str) -> StageKind:
    """The registered kind `name` (the recipe parser has already refused unknown kinds)."""
    try:
        return all_kinds()[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known: {', '.join(all_kinds())}") from None


def config_class(kind: str) -> type:
    return kind_of(kind).config


def kinds_where(**facts: Any) -> list[str]:
    """The names of the kinds whose facts have these values, e.g. `kinds_where(user_split=True)`."""
    return [k.name for k in all_kinds().values() if all(getattr(k, f) == v for f, v in facts.items())]


def references(cfg) -> dict[str, str]:
    """{config field: stage name} of the other stages a stage's config names, beside `from` (unset ones left out)."""
    return {f: getattr(cfg, f) for f in kind_of(cfg.kind).references if getattr(cfg, f, None)}


def evaluation_references(cfg) -> dict[str, str]:
    """{config field: stage name} of the stages a stage's config names only to score its evaluation."""
    return {f: s for f, s in references(cfg).items() if f in kind_of(cfg.kind).evaluated_with}


def gives_reward(kind: StageKind) -> bool:
    """Whether a stage of this kind can be named as `reward_model`: a scorer, or a kind with its own reward loader
    (the implicit reward of a DPO-family policy)."""
    return kind.scorer or kind.reward_loader is not None


def reward_loader_of(manifest: dict | None) -> Callable[..., Any] | None:
    """The reward loader of a stage folder's kind (None: the one-output classifier, or not a reward)."""
    kind = all_kinds().get((manifest or {}).get("kind"))
    return kind.reward_loader if kind is not None else None


def is_scorer_manifest(manifest: dict | None) -> bool:
    """Whether a stage folder's manifest is that of a scorer kind (a reward model)."""
    kind = all_kinds().get((manifest or {}).get("kind"))
    return kind is not None and kind.scorer

