"""LLaMA-Factory's dataset registry: a folder whose `dataset_info.json` names its datasets.

A data spec `{dataset: NAME, dataset_dir: DIR}` (or `dataset_dir:` set once at the top of the recipe) reads
entry NAME of DIR/dataset_info.json as LLaMA-Factory documents it (its data/README.md):

    file_name            a file or folder in DIR        hf_hub_url, subset, split   a hub dataset
    formatting           alpaca (default) or sharegpt   ranking: true               preference pairs
    columns              prompt, query, response, history, system, tools (alpaca); messages, system, tools
                         (sharegpt); chosen, rejected, kto_tag (either)
    tags                 role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag

`expand` turns each such component into the source spec alignpipe reads anyway (`path:`/`hub:`, `format:`,
`columns:`), so the rest of the data path (formats, drops, the split, fingerprints) is the same for both.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from alignpipe.data.formats import DataError
from alignpipe.recipe.dataspec import components

INFO_FILE = "dataset_info.json"
REGISTRY_KEYS = {"dataset", "dataset_dir", "max_dropped"}  # a spec's keys besides the entry's
# LLaMA-Factory's column names -> alignpipe's, per formatting (LLaMA-Factory's defaults are alignpipe's own names)
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected",
                  "kto_tag": "label"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                    "rejected": "rejected", "kto_tag": "label"}
TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
NOT_READ = {"ms_hub_url": "a ModelScope dataset", "om_hub_url": "a Modelers dataset", "script_url": "a loading script",
            "cloud_file_name": "a cloud file", "images": "images", "videos": "videos", "audios": "audio"}
NO_EFFECT = {"file_sha1", "num_samples", "folder"}  # read but not applied: said on the screen


def is_registry(folder: Path) -> bool:
    """A LLaMA-Factory data folder: dataset_info.json that is a registry, not `save_to_disk`'s metadata
    (which sits beside state.json / dataset_dict.json and holds `features`)."""
    info = folder / INFO_FILE
    if not info.is_file() or (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        return False
    try:
        data = json.loads(info.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "features" not in data


def read_registry(folder: Path, written: str) -> dict[str, dict]:
    """NAME -> entry of `folder`/dataset_info.json. Raises DataError naming the file."""
    info = folder / INFO_FILE
    name = f"{written.rstrip('/')}/{INFO_FILE}"
    if not info.is_file():
        raise DataError(name, "file", "no such file", f"dataset_dir must be a folder holding {INFO_FILE}")
    try:
        data = json.loads(info.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(name, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}", "fix the file") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(name, "top level", "not a mapping of dataset name -> entry",
                        'write it as LLaMA-Factory does: {"my_data": {"file_name": "my_data.json"}}')
    return data


def _registry_dir(spec: dict, base_dir: Path, key: str) -> tuple[Path, str]:
    written = spec.get("dataset_dir")
    if not written:
        raise DataError("recipe", f"{key}.dataset_dir", f"dataset {spec['dataset']!r} names no dataset_dir",
                        "set dataset_dir: once at the top of the recipe (or in this data spec): the folder "
                        f"holding {INFO_FILE}")
    path = Path(str(written)).expanduser()
    return (path if path.is_absolute() else Path(base_dir) / path), str(written)


def entry_of(spec: dict, base_dir: Path, key: str) -> tuple[dict, Path, str]:
    """The registry entry a `{dataset: NAME, dataset_dir: DIR}` spec names, its folder and the folder as written."""
    unknown = sorted(set(spec) - REGISTRY_KEYS - {"weight"})
    if unknown:
        raise DataError("recipe", f"{key}.{unknown[0]}", "is not read with dataset:",
                        "a registry entry says its file, format and columns; keep dataset, dataset_dir, max_dropped")
    name = spec["dataset"]
    if not isinstance(name, str) or "," in name:
        raise DataError("recipe", f"{key}.dataset", f"{name!r} is not one dataset name",
                        "name one entry; to mix several, use mixture: [{dataset: a, weight: 1}, {dataset: b, weight: 1}]")
    folder, written = _registry_dir(spec, base_dir, key)
    if not (folder / INFO_FILE).is_file():
        relative = "" if Path(written).expanduser().is_absolute() else \
            f" (read from the recipe's folder, {Path(base_dir).resolve()})"
        raise DataError(f"{written.rstrip('/')}/{INFO_FILE}", f"{key}.dataset_dir", f"no such file{relative}",
                        f"set dataset_dir to LLaMA-Factory's data folder, the one holding {INFO_FILE}")
    entries = read_registry(folder, written)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.6)
        names = f"did you mean {' or '.join(close)}?" if close else \
            f"use one of {', '.join(sorted(entries)[:8])}{' ...' if len(entries) > 8 else ''}"
        raise DataError(f"{written.rstrip('/')}/{INFO_FILE}", f"{key}.dataset", f"has no entry {name!r}",
                        f"{names} (alignpipe data {written} lists its {len(entries)} entries)")
    return entries[name], folder, written


def _columns(entry: dict, where: str) -> dict:
    """The entry's column map and tags in alignpipe's `columns:` vocabulary."""
    formatting = entry.get("formatting", "alpaca")
    names = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        raise DataError(where, "columns", "must map names to column names", "see LLaMA-Factory's data/README.md")
    out = {}
    for theirs, column in columns.items():
        if theirs in NOT_READ:
            raise DataError(where, f"columns.{theirs}", f"alignpipe does not read {NOT_READ[theirs]}",
                            "use a text-only dataset")
        if theirs not in names:
            raise DataError(where, f"columns.{theirs}", f"is not a {formatting} column",
                            f"use {', '.join(names)}")
        out[names[theirs]] = column
    tags = entry.get("tags") or {}
    if formatting == "sharegpt":
        out.update({t: v for t, v in tags.items() if t in TAG_NAMES})
    return out


def _format(entry: dict, columns: dict, where: str) -> str:
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(where, "formatting", f"{formatting!r} is not alpaca or sharegpt", "use alpaca or sharegpt")
    kto, ranking = "label" in columns, bool(entry.get("ranking"))
    if kto and ranking:
        raise DataError(where, "ranking", "an entry with kto_tag is not ranked pairs", "drop ranking or kto_tag")
    if formatting == "alpaca":
        if not ranking and "instruction" in columns and "output" not in columns and set(columns) <= {"instruction"}:
            columns["text"] = columns.pop("instruction")  # a pretraining entry: its prompt column is the text
            return "text"
        if kto:
            raise DataError(where, "columns.kto_tag", "alignpipe reads kto_tag from sharegpt entries only",
                            "write the data as sharegpt messages with the label column")
        return "alpaca_preference" if ranking else "alpaca"
    if ranking:
        return "sharegpt_preference"
    if kto:
        # kto_messages reads `messages`; the entry's messages column is renamed to that, not to conversations
        columns["messages"] = columns.pop("conversations", "messages")
        return "kto_messages"
    return "sharegpt"


def source_spec(spec: dict, base_dir: Path, key: str) -> dict:
    """The `{path: ...}` / `{hub: ...}` spec that reads what `{dataset: NAME, ...}` names."""
    entry, folder, written = entry_of(spec, base_dir, key)
    where = f"{written.rstrip('/')}/{INFO_FILE}: {spec['dataset']}"
    for field, what in NOT_READ.items():
        if field in entry and not any(k in entry for k in ("file_name", "hf_hub_url")):
            raise DataError(where, field, f"alignpipe does not read {what}", "give the entry a file_name")
    columns = _columns(entry, where)
    out: dict = {"format": _format(entry, columns, where)}
    if columns:
        out["columns"] = columns
    if "file_name" in entry:
        out["path"] = str(folder / entry["file_name"])
    elif "hf_hub_url" in entry:
        out.update(hub=entry["hf_hub_url"], split=entry.get("split") or "train")
        if entry.get("subset"):
            out["subset"] = entry["subset"]
    else:
        raise DataError(where, "file_name", "the entry names no file_name or hf_hub_url", "add file_name")
    if "max_dropped" in spec:
        out["max_dropped"] = spec["max_dropped"]
    return out


def notes(spec: dict, base_dir: Path, key: str) -> list[str]:
    """What each `dataset:` component reads, and the entry's fields alignpipe does not apply (for the screen)."""
    out = []
    for i, c in enumerate(components(spec)):
        if "dataset" not in c:
            continue
        entry, _, written = entry_of(c, base_dir, key)
        read = source_spec(c, base_dir, key)
        renamed = {k: v for k, v in (read.get("columns") or {}).items() if k != v}
        out.append(f"dataset {c['dataset']} of {written}: {read.get('path') or read.get('hub')} as {read['format']}"
                   + (f", columns {renamed}" if renamed else ""))
        out += [f"dataset {c['dataset']}: {field} {entry[field]!r} is not applied (the whole file is read)"
                for field in sorted(NO_EFFECT) if field in entry]
    return out


def expand(spec: dict, base_dir: Path, key: str) -> dict:
    """The spec with every `dataset:` component replaced by the source spec it names (weights kept)."""
    if not isinstance(spec, dict):
        return spec
    if "dataset" in spec:
        return source_spec(spec, base_dir, key)
    mixture = spec.get("mixture")
    if not isinstance(mixture, list) or not any(isinstance(c, dict) and "dataset" in c for c in mixture):
        return spec
    out = []
    for i, c in enumerate(mixture):
        if isinstance(c, dict) and "dataset" in c:
            c = {**source_spec(c, base_dir, f"{key}.mixture[{i}]"), **({"weight": c["weight"]} if "weight" in c else {})}
        out.append(c)
    return {**spec, "mixture": out}


def listing(folder: Path, written: str) -> list[dict]:
    """One row per entry: name, what it reads (file or hub id), formatting, kind of rows, and whether the file is there."""
    rows = []
    for name, entry in read_registry(folder, written).items():
        columns = entry.get("columns") or {}
        ranking = "pairs" if entry.get("ranking") else "kto" if "kto_tag" in columns else \
            "text" if set(columns) == {"prompt"} else "conversations"
        source = entry.get("file_name") or entry.get("hf_hub_url") or next(
            (entry[k] for k in NOT_READ if k in entry), "?")
        where = "file" if "file_name" in entry else "hub" if "hf_hub_url" in entry else "not read"
        present = (folder / entry["file_name"]).exists() if "file_name" in entry else None
        rows.append({"name": name, "source": str(source), "where": where, "formatting": entry.get("formatting", "alpaca"),
                     "rows": ranking, "present": present})
    return rows
