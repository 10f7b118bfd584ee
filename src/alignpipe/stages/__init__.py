"""Stage kinds. Each kind is a module here with a `Config` dataclass (light to import) and a
`run(ctx) -> metrics` function (heavy imports inside). `trainer_config_class()` names the TRL /
transformers config class that the stage's `trainer:` block is handed to."""

from __future__ import annotations

import importlib
from types import ModuleType

# kind -> module in this package. Several kinds may share a module (e.g. grpo and rloo).
KINDS: dict[str, str] = {
    "pretrain": "pretrain",
    "sft": "sft",
    "reward": "reward",
    "dpo": "dpo",
    "ppo": "ppo",
    "grpo": "grpo",
    "rloo": "grpo",
    "kto": "kto",
    "orpo": "orpo",
    "cpo": "orpo",
    "label": "label",
}


def stage_module(kind: str) -> ModuleType:
    return importlib.import_module(f"alignpipe.stages.{KINDS[kind]}")


def config_class(kind: str) -> type:
    module = stage_module(kind)
    return getattr(module, "Config")
