"""A data spec's parts, read without loading anything: the components it mixes, the stages it reads (`from:`),
the embedded world's part (`embedded:`) and its files. The recipe's parser, the split, the evaluation and the
label stage's readers (`alignpipe.labelling.sources`) all ask here."""

from __future__ import annotations


PAIRS_FILE = "pairs.jsonl"
# a label stage's `labeller:` names: the embedded world's judge, a person on the page, or a judge of its `eval.judges`
# (`judge:<name>`); anything else with a colon is a `module:function`
LABELLER_EMBEDDED = "embedded"
LABELLER_HUMAN = "human"
LABELLER_JUDGE_PREFIX = "judge:"


def components(spec: dict) -> list[dict]:
    """The sources a data spec mixes (itself when it is not a mixture)."""
    mixture = spec.get("mixture") if isinstance(spec, dict) else None
    return [c for c in mixture if isinstance(c, dict)] if isinstance(mixture, list) else [spec]


def stage_sources(spec: dict) -> list[str]:
    """The stages a data spec reads (`from:`), in order."""
    return [str(c["from"]) for c in components(spec or {}) if "from" in c]


def world_part(spec: dict) -> str | None:
    """The embedded world's part a spec reads, top-level or as a mixture component (None: none)."""
    for c in components(spec or {}):
        if "embedded" in c:
            return c["embedded"]
    return None


def reads_stages(spec: dict) -> bool:
    """Whether the spec needs this module: it reads a stage, or mixes the world with other sources."""
    return bool(stage_sources(spec)) or ("mixture" in (spec or {}) and world_part(spec) is not None)


def file_components(spec: dict) -> list[dict]:
    """The components that are files or hub datasets (what the recipe's split and validate read)."""
    return [c for c in components(spec or {}) if "from" not in c and "embedded" not in c]


def without_stage_sources(spec: dict) -> dict:
    """The spec with its `from:` / `embedded:` components left out ({} when nothing else is left)."""
    files = file_components(spec)
    if not reads_stages(spec):
        return spec
    if not files:
        return {}
    if "mixture" not in spec:
        return files[0]
    return {**spec, "mixture": files}
